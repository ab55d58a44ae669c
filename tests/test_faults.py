"""Faults with real processes: an embedder killed mid-stream, Redis stopped for 5 s, ingest killed, a device program
that exits as soon as it has closed."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import zmq
from zmq.utils.monitor import recv_monitor_message

from sensors.protocol import decode
from sensors.publisher import DevicePublisher
from sensors.simulator import SimulatedWearable
from streaming.pipeline import Pipeline, PipelineConfig
from streaming.redis_server import RedisServer, free_port
from streaming.stage import Counts
from streaming.windowing import SECOND

from .attacks import START_NS, expected_windows, published_keys, send_paced
from .conftest import wait_for

pytestmark = pytest.mark.timeout(240)


def ingested(pipeline) -> int:
    return Counts.of(*pipeline.stats()["window"]).get("in")


def test_killed_embedder_restarts_and_every_window_arrives_exactly_once(ray_local, redis_server):
    device = "kill-embedder"
    messages = list(SimulatedWearable(device, seed=3, start_ns=START_NS).messages(10))
    pipeline = Pipeline(PipelineConfig(ingest=["tcp://127.0.0.1:*"], max_wait_ms=20), redis_server.url, "tiny")
    (endpoint,) = pipeline.start()
    sender = threading.Thread(target=send_paced, args=(endpoint, messages, 3.0))
    sender.start()
    wait_for(lambda: len(published_keys(redis_server.url, device)) >= 4, 60, "first embeddings")
    ray.kill(pipeline.stages["embed"][0], no_restart=False)
    sender.join()
    wait_for(lambda: ingested(pipeline) == len(messages), 60, "ingest to pass everything on")
    final = pipeline.drain()
    pipeline.kill()
    expected = expected_windows(messages)
    # the embedder drained is the restarted one: it saw only the windows sent (or re-sent) after the kill
    assert count(final, "embed", "in") < len(expected)
    keys = published_keys(redis_server.url, device)
    assert len(keys) == len(set(keys)), "a window was published twice"
    assert set(keys) == expected


def test_redis_outage_within_the_buffer_loses_nothing(ray_local):
    device = "redis-outage"
    messages = list(SimulatedWearable(device, seed=4, start_ns=START_NS).messages(10))
    server = RedisServer(extra_args=("--appendonly", "yes")).start()
    try:
        pipeline = Pipeline(PipelineConfig(ingest=["tcp://127.0.0.1:*"], max_wait_ms=20), server.url, "tiny")
        (endpoint,) = pipeline.start()
        sender = threading.Thread(target=send_paced, args=(endpoint, messages, 1.0))
        sender.start()
        wait_for(lambda: len(published_keys(server.url, device)) >= 2, 60, "first embeddings")
        server.stop(keep_data=True)
        time.sleep(5)
        server.start()
        sender.join()
        wait_for(lambda: ingested(pipeline) == len(messages), 60, "ingest to pass everything on")
        final = pipeline.drain()
        pipeline.kill()
        keys = published_keys(server.url, device)
        assert set(keys) == expected_windows(messages)
        publish = Counts.of(final["publish"][0])
        assert publish.get("redis_error") > 0  # the outage was seen, and ridden out
        assert not publish.events("dropped")
    finally:
        server.stop()


def test_killed_ingest_comes_back_on_its_endpoint_and_loss_is_counted(ray_local, redis_server):
    device = "kill-ingest"
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    pipeline = Pipeline(PipelineConfig(ingest=[endpoint], max_wait_ms=20), redis_server.url, "tiny")
    pipeline.start()
    wearable = SimulatedWearable(device, seed=5, start_ns=START_NS)
    publisher = DevicePublisher(endpoint, device, block=False, linger_ms=30_000)  # close: until the queue is sent
    began, t_first = time.monotonic(), START_NS
    killed = False
    for header, payload in wearable.messages(8):
        delay = (header["t_ns"] - t_first) / 1e9 - (time.monotonic() - began)
        if delay > 0:
            time.sleep(delay)
        if not killed and header["t_ns"] - t_first > 2 * SECOND:
            paused = time.monotonic()
            first_pid = ingest_pid(pipeline)
            monitor = publisher.socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
            ray.kill(pipeline.stages["ingest"][0], no_restart=False)
            killed = True
            # a restart can take many seconds on a busy machine; the device sends on once it is linked to the new
            # ingest (its reconnect back-off adds up to RECONNECT_IVL_MAX), and at its pace: a stream that ended
            # while its queue was full would end with drops that no later message reveals as a gap
            wait_for(lambda old=first_pid: ingest_pid(pipeline) not in (None, old), 120, "the ingest actor's restart")
            wait_linked(publisher, monitor, 60)
            began += time.monotonic() - paused
        fields = {k: v for k, v in header.items() if k not in ("v", "device", "sensor", "seq", "t_ns")}
        publisher.send(header["sensor"], header["t_ns"], payload, **fields)
    publisher.close()
    issued = sum(publisher.sent.values()) + sum(publisher.dropped.values())  # every seq number used

    def accounted() -> int:  # seq numbers that reached windowing, or that it counted lost
        window = Counts.of(*pipeline.stats()["window"])
        return window.get("in") + window.get("dropped_seq_lost", device)

    wait_for(lambda: accounted() >= issued, 60, f"windowing to account for the {issued} messages the device issued")
    final = pipeline.drain()
    pipeline.kill()
    window = Counts.of(final["window"][0])
    received, lost = window.get("in"), window.get("dropped_seq_lost", device)
    # each message reached windowing or, as what the dead ingest held, shows as a counted gap; none twice
    assert received + lost == issued, f"{received} received + {lost} counted lost, {issued} issued"
    late = [t0 for _, t0 in published_keys(redis_server.url, device) if t0 >= START_NS + 4 * SECOND]
    assert late, "the pipeline did not resume after the ingest restart"


def wait_linked(publisher: DevicePublisher, monitor: zmq.Socket, timeout_s: float) -> None:
    """Wait until the device's socket has a new connection (its ZMTP handshake done), seen on `monitor`, which
    this closes (the publisher's close waits for every socket of its context)."""
    try:
        assert monitor.poll(timeout_s * 1000), "the device did not reconnect to the restarted ingest"
        recv_monitor_message(monitor)
    finally:
        publisher.socket.disable_monitor()
        monitor.close(linger=0)


def test_a_device_program_that_closes_and_exits_delivers_its_queue():
    """close() returns once the queue is sent (up to the linger): a program that exits then loses nothing. Here the
    server is down while the device sends, and comes back only once the device program is closing."""
    count = 20
    program = (
        "import sys\n"
        "from sensors.publisher import DevicePublisher\n"
        "publisher = DevicePublisher(sys.argv[1], 'exits', linger_ms=60_000)\n"
        f"for seq in range({count}):\n"
        "    publisher.send('imu', seq * 50_000_000, bytes(40 * 6 * 4), rate=800)\n"
        "print('closing', flush=True)\n"
        "publisher.close()\n"
    )
    ctx = zmq.Context()
    try:
        pull = ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.RCVTIMEO, 10_000)
        # below the kernel's ephemeral range: a reconnecting client cannot end up connected to itself
        port = pull.bind_to_random_port("tcp://127.0.0.1", min_port=20000, max_port=30000)
        device_endpoint = f"tcp://127.0.0.1:{port}"
        pull.unbind(device_endpoint)  # the server is down
        root = Path(__file__).resolve().parents[1]
        device = subprocess.Popen(
            [sys.executable, "-c", program, device_endpoint], cwd=root, stdout=subprocess.PIPE, text=True
        )
        try:
            assert device.stdout is not None and device.stdout.readline() == "closing\n"
            pull.bind(device_endpoint)  # the server comes back
            received = []
            for _ in range(count):
                try:
                    received.append(decode(pull.recv_multipart(copy=False)).seq)
                except zmq.Again:
                    break
            assert device.wait(30) == 0
        finally:
            device.kill()
        assert received == list(range(count)), "the device program exited with its queue unsent"
    finally:
        ctx.destroy(linger=0)


def ingest_pid(pipeline) -> int | None:
    """The ingest actor's process id; None while it restarts (ray.kill returns before the actor dies)."""
    try:
        return ray.get(pipeline.stages["ingest"][0].__ray_call__.remote(lambda _: os.getpid()), timeout=60)
    except ray.exceptions.ActorUnavailableError:
        return None


def count(stats: dict, stage: str, event: str, label: str | None = None) -> int:
    return Counts.of(*stats[stage]).get(event, label)


def window_accounts(final: dict) -> tuple[int, int, int]:
    """(windows cut, windows published, windows dropped for overload) over a run's final stats."""
    cut = count(final, "window", "out")
    dropped = count(final, "window", "dropped_overload") + count(final, "embed", "dropped_queue_full")
    published = count(final, "publish", "out") - count(final, "publish", "out", "fused")
    return cut, published, dropped


def test_overload_drops_the_oldest_windows_and_accounts_for_every_one(ray_local, redis_server):
    """Embedders slower than the input: windows are dropped (oldest first, counted), none vanish."""
    config = PipelineConfig(
        ingest=["tcp://127.0.0.1:*"], max_batch=1, max_wait_ms=1, embedder_throttle_ms=150, window_backlog=8
    )
    pipeline = Pipeline(config, redis_server.url, "tiny")
    (endpoint,) = pipeline.start()
    from sensors.simulator import simulate

    simulate(endpoint, devices=3, seconds=6, seed=9, realtime=True)
    time.sleep(0.5)
    final = pipeline.drain()
    pipeline.kill()
    cut, published, dropped = window_accounts(final)
    assert dropped > 0, "the embedders kept up: no overload happened"
    assert published + dropped == cut
    assert final["window"][0]["queue"] == 0


def test_replay_policy_blocks_instead_of_dropping(ray_local, redis_server):
    device = "replay"
    messages = list(SimulatedWearable(device, seed=10, start_ns=START_NS).messages(5))
    config = PipelineConfig(
        ingest=["tcp://127.0.0.1:*"], max_batch=2, max_wait_ms=1, embedder_throttle_ms=50, overload="block"
    )
    pipeline = Pipeline(config, redis_server.url, "tiny")
    (endpoint,) = pipeline.start()
    send_paced(endpoint, messages, speed=100.0)
    wait_for(lambda: ingested(pipeline) == len(messages), 60, "ingest to pass everything on")
    final = pipeline.drain()
    pipeline.kill()
    assert count(final, "window", "dropped_overload") == 0
    assert set(published_keys(redis_server.url, device)) == expected_windows(messages)


def test_embedders_scale_with_the_backlog_and_back(ray_local, redis_server):
    """Embedders too slow for the input: a second one is added; idle again, it is drained and removed."""
    config = PipelineConfig(
        ingest=["tcp://127.0.0.1:*"],
        max_batch=1,
        max_wait_ms=1,
        embedder_throttle_ms=300,
        window_backlog=8,
        embedders=1,
        embedders_max=2,
        scale_down_after_s=0.5,
        matchers=0,
    )
    pipeline = Pipeline(config, redis_server.url, "tiny")
    (endpoint,) = pipeline.start()
    from sensors.simulator import simulate

    sender = threading.Thread(target=simulate, kwargs=dict(endpoint=endpoint, devices=2, seconds=6, seed=12))
    sender.start()
    wait_for(lambda: pipeline.autoscale() == 2, 60, "a second embedder while the backlog is full")
    sender.join()
    wait_for(lambda: pipeline.autoscale() == 1, 60, "the extra embedder to be removed once idle")
    final = pipeline.drain()
    pipeline.kill()
    cut, published, dropped = window_accounts(final)
    assert published + dropped == cut  # scaling up and down lost no window unaccounted
