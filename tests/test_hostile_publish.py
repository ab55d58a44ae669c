"""Publisher, embedder and process lifecycle under hostile input and faults, with real parts: redis-server
processes, local Ray, the tiny encoder, ZeroMQ, subprocesses killed with SIGKILL."""

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import ray
import redis

from sensors.simulator import SimulatedWearable
from streaming.embedder import Embedder, EmbedderSettings
from streaming.pipeline import Pipeline, PipelineConfig
from streaming.publisher import Publisher, PublisherSettings, unit_rows
from streaming.records import Embedding, Window
from streaming.redis_layout import stream_key
from streaming.redis_server import RedisServer
from streaming.stage import Counts
from streaming.subscriber import read_all
from streaming.windowing import SECOND

from .attacks import START_NS
from .conftest import wait_for
from .test_pipeline import send_all

pytestmark = pytest.mark.timeout(120)

DIM = 64  # the tiny model's
IMU_SHAPE = (6, 2000)  # the IMU encoder's input: 6 channels x 2000 steps


def embedding(device: str, modality: str, k: int, vec: np.ndarray | None = None, epoch: int = 0) -> Embedding:
    """The k-th window's embedding of a device and modality (a random unit vector unless given)."""
    if vec is None:
        vec = np.random.default_rng(k).standard_normal(DIM).astype(np.float32)
        vec /= np.linalg.norm(vec)
    t0 = START_NS + k * SECOND
    now = time.time_ns()
    return Embedding(device, modality, t0, t0 + 2 * SECOND, vec, "tiny", now, now, epoch=epoch)


def entries_per_window(url: str, device: str = "*") -> Counter:
    """How many entries Redis holds per (device, modality, epoch, t0)."""
    return Counter((r.device, r.modality, r.epoch, r.t0) for r in read_all(redis.Redis.from_url(url), device))


def counts(stats: dict, event: str, label: str | None = None) -> int:
    return Counts.of(stats).get(event, label)


# ---------------------------------------------------------------------------------------------------
# Exactly one entry per window across refused writes, lost replies and restarts
# ---------------------------------------------------------------------------------------------------


def test_redis_refusing_writes_mid_stream_leaves_exactly_one_entry_per_window(ray_local):
    """maxmemory reached with noeviction while batches are being written, then raised: every window is
    in Redis once. (A plain pipeline writes part of the refused batch, and the whole batch again later.)"""
    windows = [embedding(f"dev-{d}", m, k) for k in range(150) for d in range(4) for m in ("audio", "imu")]
    with RedisServer() as server:
        admin = redis.Redis.from_url(server.url)
        publisher = Publisher(PublisherSettings(server.url, max_batch=64, retry_max_s=0.1, fused_wait_s=0.2))
        publisher.push(windows[:200])
        wait_for(lambda: counts(publisher.stats(), "out") >= 200, 20, "the first windows in Redis")
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", admin.info("memory")["used_memory"] + 100_000)
        publisher.push(windows[200:])
        wait_for(lambda: counts(publisher.stats(), "redis_error"), 20, "Redis to refuse writes")
        time.sleep(0.5)  # a few more refused retries
        admin.config_set("maxmemory", 0)
        final = publisher.drain(30)
        stored = entries_per_window(server.url)
    expected = {(e.device, e.modality, 0, e.t0) for e in windows}
    expected |= {(e.device, "fused", 0, e.t0) for e in windows if e.modality == "audio"}
    assert set(stored) == expected  # none lost
    assert max(stored.values()) == 1, [k for k, n in stored.items() if n > 1][:5]
    assert counts(final, "redis_error") > 0
    assert counts(final, "out") == len(expected)
    assert not Counts.of(final).events("dropped"), final["counts"]


def test_a_reply_lost_after_the_write_adds_no_second_entry(ray_local):
    """redis-server stopped (SIGSTOP) with a batch in its socket: the publisher times out and retries on
    new connections; once continued, Redis runs every copy it received. One entry per window remains."""
    batch = [embedding("lost-reply", "imu", k) for k in range(1, 40)]
    with RedisServer() as server:
        publisher = Publisher(PublisherSettings(server.url, redis_timeout_s=0.5, retry_max_s=0.2))
        publisher.push([embedding("lost-reply", "imu", 0)])
        wait_for(lambda: counts(publisher.stats(), "out") == 1, 20, "the first window in Redis")
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            publisher.push(batch)
            wait_for(lambda: counts(publisher.stats(), "redis_error") >= 2, 20, "replies to time out")
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        final = publisher.drain(30)
        stored = entries_per_window(server.url)
    assert sorted(stored) == sorted(("lost-reply", "imu", 0, e.t0) for e in [embedding("lost-reply", "imu", 0)] + batch)
    assert max(stored.values()) == 1
    assert counts(final, "already_in_redis", "lost-reply") > 0  # the retry found what the lost try added
    assert counts(final, "out") == 1 + len(batch)  # each window counted once


def test_a_restarted_publisher_adds_nothing_twice_and_a_clobbered_key_drops_only_its_own(ray_local, redis_server):
    settings = PublisherSettings(redis_server.url)
    first = [embedding("restart", "imu", k) for k in range(5)]
    before = Publisher(settings)
    before.push(first)
    before.drain()
    client = redis.Redis.from_url(redis_server.url)
    client.set(stream_key("clobbered", "imu"), "not a stream")
    after = Publisher(settings)  # as Ray restarts it: the same settings (run), nothing in memory
    after.push(first + [embedding("restart", "imu", 5)] + [embedding("clobbered", "imu", k) for k in range(3)])
    final = after.drain()
    stored = entries_per_window(redis_server.url, "restart")
    assert sorted(stored) == [("restart", "imu", 0, START_NS + k * SECOND) for k in range(6)]
    assert max(stored.values()) == 1
    assert counts(final, "already_in_redis", "restart") == 5
    assert counts(final, "dropped_wrong_type", "clobbered") == 3
    # another run may repeat (epoch, t0): its entries are new entries (as a device's new session's are)
    other_run = Publisher(PublisherSettings(redis_server.url))
    other_run.push(first[:1])
    other_run.drain()
    assert entries_per_window(redis_server.url, "restart")["restart", "imu", 0, START_NS] == 2


# ---------------------------------------------------------------------------------------------------
# Nothing non-finite or non-unit is published
# ---------------------------------------------------------------------------------------------------


def test_unit_rows_renormalises_small_errors_and_names_bad_rows():
    rows = np.array([[0.6, 0.8001], [np.nan, 1.0], [np.inf, 0.0], [0.0, 0.0], [3.0, 4.0]], np.float32)
    unit, reasons = unit_rows(rows, 0.99, 1.01)
    assert reasons == [None, "non_finite", "non_finite", "bad_norm", "bad_norm"]
    assert abs(np.linalg.norm(unit[0]) - 1) < 1e-6


def test_fused_sum_that_cancels_out_is_not_published(ray_local, redis_server):
    v = embedding("cancel", "vision", 0).emb
    publisher = Publisher(PublisherSettings(redis_server.url, fused_wait_s=0.1))
    publisher.push(
        [
            embedding("cancel", "vision", 0, v),
            embedding("cancel", "audio", 0, -v),
            embedding("cancel", "vision", 1, v),
            embedding("cancel", "audio", 1, v),
        ]
    )
    final = publisher.drain()
    fused = [r for r in read_all(redis.Redis.from_url(redis_server.url), "cancel") if r.modality == "fused"]
    assert [r.t0 for r in fused] == [START_NS + SECOND]  # window 0 summed to zero: not published
    assert abs(np.linalg.norm(fused[0].emb) - 1) < 1e-6
    assert counts(final, "rejected_bad_norm", "cancel") == 1


@pytest.fixture(scope="module")
def tiny_embedder(ray_local, redis_server):
    """An embedder in this process (the tiny model on the CPU) handing over to a real publisher actor."""
    publisher = ray.remote(Publisher).remote(PublisherSettings(redis_server.url))

    def make(**settings) -> Embedder:
        return Embedder(
            EmbedderSettings(**{"model": "tiny", "device": "cpu", "max_wait_ms": 1, **settings}), [publisher]
        )

    yield make
    ray.kill(publisher)


def imu_window(device: str, k: int, data: np.ndarray) -> Window:
    t0 = START_NS + k * 2_500_000_000
    return Window(device, "imu", t0, t0 + 5 * SECOND, data.astype(np.float32), time.time_ns())


def test_non_finite_encoder_output_is_dropped_and_counted_under_the_device(tiny_embedder, redis_server):
    """IMU rows of +-3e38 (finite float32) come out of the encoder as NaN; batched with a good device's
    window, only the bad rows are dropped, counted under their device."""
    rng = np.random.default_rng(0)
    huge = np.where(rng.random(IMU_SHAPE) < 0.5, -3e38, 3e38)
    embedder = tiny_embedder(max_batch=8)
    assert not np.isfinite(embedder.encoder.embed("imu", huge[None].astype(np.float32))).all()  # the fault is real
    embedder.push(
        [
            imu_window("calm", 0, rng.standard_normal(IMU_SHAPE)),
            imu_window("loud", 0, huge),
            imu_window("calm", 1, rng.standard_normal(IMU_SHAPE)),
            imu_window("loud", 1, huge),
        ]
    )
    final = embedder.drain()
    assert counts(final, "rejected_non_finite", "loud") == 2
    assert counts(final, "rejected_non_finite", "calm") == 0
    client = redis.Redis.from_url(redis_server.url)
    wait_for(lambda: len(read_all(client, "calm")) == 2, 20, "the good device's windows in Redis")
    assert read_all(client, "loud") == []
    for r in read_all(client, "calm"):
        assert np.isfinite(r.emb).all() and abs(np.linalg.norm(r.emb) - 1) < 1e-5


def test_queue_full_drops_are_counted_under_the_device_that_lost_the_window(tiny_embedder):
    """A flood from one device pushes a quiet device's queued window out: the quiet device's counter shows it."""
    # no batch is taken before drain (8 windows or 60 s), so the queue's contents are known exactly
    embedder = tiny_embedder(max_batch=8, max_wait_ms=60_000, queue_capacity=2)
    noise = np.zeros(IMU_SHAPE)
    calls = [threading.Thread(target=embedder.push, args=([imu_window("quiet", 0, noise)],))]
    calls[0].start()
    wait_for(lambda: embedder.queue.size == 1, 10, "the quiet device's window queued")
    flood = [imu_window("flood", k, noise) for k in range(3)]  # 3 more: room for 1, so 2 go, oldest first
    calls.append(threading.Thread(target=embedder.push, args=(flood,)))
    calls[1].start()
    wait_for(lambda: counts(embedder.stats(), "dropped_queue_full", "flood") > 0, 10, "the flood queued")
    final = embedder.drain()
    for call in calls:
        call.join()
    assert counts(final, "dropped_queue_full", "quiet") == 1
    assert counts(final, "dropped_queue_full", "flood") == 1


# ---------------------------------------------------------------------------------------------------
# Process lifecycle: the embedded redis-server and the drain deadline
# ---------------------------------------------------------------------------------------------------

OWNER = """
import time
from streaming.redis_server import RedisServer
server = RedisServer().start()
print(server.process.pid, server.dir, flush=True)
time.sleep(120)
"""


def gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped by whoever adopted it counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux only")
def test_embedded_redis_dies_with_its_owner_and_its_folder_goes_at_the_next_start():
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1]
    )
    pid, folder = owner.stdout.readline().split()
    pid, folder = int(pid), Path(folder)
    assert not gone(pid) and folder.is_dir()
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    wait_for(lambda: gone(pid), 5, "the redis-server to exit with its owner")
    with RedisServer() as server:
        assert not folder.exists()  # a dead owner's folder is removed by the next server
        assert server.dir.is_dir()


def test_drain_gives_up_at_its_deadline_and_counts_what_was_left(ray_local, redis_server):
    """Embedders far slower than the input and a 2 s drain deadline: the drain returns by its stated bound
    (deadline + `drain_report_s`), long before the backlog it gave up on would have taken, and every window cut
    is published or counted as dropped."""
    device = "drain-deadline"
    wearable = SimulatedWearable(device, seed=21, start_ns=START_NS)
    # no fused entries: exact accounts. ~119 windows at 1 s each of embedding: a backlog of minutes, however
    # slowly a loaded machine windows them before the drain begins
    imu = [(h, p) for h, p in wearable.messages(300) if h["sensor"] == "imu"]
    config = PipelineConfig(
        ingest=["tcp://127.0.0.1:*"],
        max_batch=1,
        max_wait_ms=1,
        embedder_throttle_ms=1000,
        drain_timeout_s=2.0,
        drain_report_s=5.0,
        matchers=0,
    )
    pipeline = Pipeline(config, redis_server.url, "tiny")
    (endpoint,) = pipeline.start()
    sent = send_all(endpoint, imu)
    wait_for(lambda: Counts.of(*pipeline.stats()["window"]).get("in") == sent, 60, "windowing to take every message")
    began = time.monotonic()
    final = pipeline.drain()
    elapsed = time.monotonic() - began
    pipeline.kill()
    given_up = {s: sum(counts(a, "dropped_drain_timeout", device) for a in final[s]) for s in ("window", "embed")}
    bound = config.drain_timeout_s + config.drain_report_s
    # what it gave up on would have taken a throttled second each, far more than the drain did; most of it never
    # left the windowing actor (dropped there at the deadline, not refused by the embedders one call at a time)
    assert sum(given_up.values()) * config.embedder_throttle_ms / 1000 > bound, given_up
    assert given_up["window"] > given_up["embed"], given_up
    assert elapsed < bound, elapsed
    assert not any(a.get("unfinished") for stage in final.values() for a in stage), final
    cut = sum(counts(a, "out") for a in final["window"])
    dropped = sum(
        counts(a, e)
        for s in ("window", "embed", "publish")
        for a in final[s]
        for e in ("dropped_overload", "dropped_queue_full", "dropped_drain_timeout")
    )
    published = len(read_all(redis.Redis.from_url(redis_server.url), device))
    assert published == counts(final["publish"][0], "out")
    assert published + dropped == cut, (published, dropped, cut)
