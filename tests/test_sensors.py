"""Simulator and publishers, over real loopback ZeroMQ sockets (recordings: tests/test_recording.py)."""

import hashlib
import importlib.util
import subprocess
import time
from collections import Counter, defaultdict

import cv2
import msgpack
import numpy as np
import pytest
import zmq

from sensors import (
    DevicePublisher,
    ImuRecording,
    Rejected,
    SimulatedWearable,
    decode,
    decode_image,
    encode_header,
    load_frames,
    publish_camera,
    publish_frames,
    publish_imu,
    publish_microphone,
    simulate,
)
from sensors.simulator import COMMON_KEYS

from .conftest import RECV_TIMEOUT_MS, endpoint

pytestmark = pytest.mark.timeout(60)

NS = 1_000_000_000
PER_SECOND = {"camera": 30, "mic": 50, "imu": 20, "depth": 30, "thermal": 9}


def receive(sock: zmq.Socket, count: int) -> list[list[bytes]]:
    return [[f.bytes for f in sock.recv_multipart(copy=False)] for _ in range(count)]


def fields_of(header: dict) -> dict:
    return {k: v for k, v in header.items() if k not in COMMON_KEYS}


# --- simulator ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_seconds():
    return list(SimulatedWearable("sim-000", 7, start_ns=5 * NS).messages(2.0))


def test_simulator_is_deterministic(two_seconds):
    again = list(SimulatedWearable("sim-000", 7, start_ns=5 * NS).messages(2.0))
    assert [h for h, _ in again] == [h for h, _ in two_seconds]
    assert all(a == b for (_, a), (_, b) in zip(again, two_seconds))


def test_simulator_content_depends_on_seed_device_and_elapsed_time_only(two_seconds):
    def digests(messages):
        return [hashlib.sha256(payload).hexdigest() for _, payload in messages]

    shifted = list(SimulatedWearable("sim-000", 7, start_ns=123).messages(2.0))
    assert digests(shifted) == digests(two_seconds)
    assert [h["t_ns"] - 123 for h, _ in shifted] == [h["t_ns"] - 5 * NS for h, _ in two_seconds]
    other_seed = SimulatedWearable("sim-000", 8, start_ns=0).messages(0.1)
    other_device = SimulatedWearable("sim-001", 7, start_ns=0).messages(0.1)
    for other in (other_seed, other_device):
        assert all(a != b for a, b in zip(digests(other), digests(two_seconds)))


def test_simulator_rates(two_seconds):
    assert Counter(h["sensor"] for h, _ in two_seconds) == {
        "camera": 60,
        "mic": 100,
        "imu": 40,
        "depth": 60,
        "thermal": 18,
    }


def test_simulator_timestamps_and_seq(two_seconds):
    times = [h["t_ns"] for h, _ in two_seconds]
    assert times == sorted(times)
    by_sensor = defaultdict(list)
    for h, _ in two_seconds:
        by_sensor[h["sensor"]].append(h)
    for sensor, headers in by_sensor.items():
        assert [h["seq"] for h in headers] == list(range(len(headers)))
        assert [h["t_ns"] for h in headers] == [5 * NS + k * NS // PER_SECOND[sensor] for k in range(len(headers))]


def test_simulator_messages_pass_decode(two_seconds):
    for h, payload in two_seconds:
        msg = decode([msgpack.packb(h), payload])
        assert (msg.device, msg.sensor, msg.seq, msg.t_ns) == (h["device"], h["sensor"], h["seq"], h["t_ns"])
    last = {h["sensor"]: decode([msgpack.packb(h), p]) for h, p in two_seconds}
    assert decode_image(last["camera"]).shape == (480, 640, 3)
    assert last["mic"].payload.shape == (960, 1) and last["mic"].end_ns() - last["mic"].t_ns == 20_000_000
    assert last["imu"].payload.shape == (40, 6) and 8 < last["imu"].payload[:, 2].mean() < 11.5  # gravity on z
    depth = last["depth"].payload
    assert depth.shape == (480, 640) and depth.dtype == np.uint16 and 500 < np.median(depth[depth > 0]) < 4500
    thermal_c = (last["thermal"].payload.astype(float) - 27315) / 100
    assert thermal_c.shape == (120, 160) and 19 < np.median(thermal_c) < 22 and 30 < thermal_c.max() < 37


def test_simulate_sends_everything_without_dropping(pull):
    stats = simulate(endpoint(pull), devices=2, seconds=0.5, seed=3, realtime=False)
    expected = {"camera": 15, "mic": 25, "imu": 10, "depth": 15, "thermal": 5}
    assert stats.sent == {"sim-000": expected, "sim-001": expected}
    assert stats.dropped == {"sim-000": {}, "sim-001": {}}
    seqs = defaultdict(list)
    for _ in range(stats.total_sent):
        msg = decode(pull.recv_multipart(copy=False))
        seqs[msg.device, msg.sensor].append(msg.seq)
    assert all(s == list(range(expected[sensor])) for (_, sensor), s in seqs.items()) and len(seqs) == 10
    local = list(SimulatedWearable("sim-001", 3, start_ns=0).messages(0.5))
    assert len(local) == sum(expected.values())


def test_simulate_realtime_follows_the_wall_clock(pull):
    stats = simulate(endpoint(pull), devices=1, seconds=0.4, realtime=True)
    assert 0.3 < stats.wall_s < 2.0
    assert stats.sent["sim-000"] == {"camera": 12, "mic": 20, "imu": 8, "depth": 12, "thermal": 4}


# --- publisher ---------------------------------------------------------------------------------


def test_publisher_sends_exact_frames(pull):
    rows = np.arange(12, dtype="<f4").reshape(2, 6)
    with DevicePublisher(endpoint(pull), "pub-1") as pub:
        assert pub.send("imu", 100, rows.tobytes(), rate=200)
        assert pub.send("imu", 110, rows, rate=200)
        assert pub.send("thermal", 120, np.zeros((2, 3), np.uint8))
    received = receive(pull, 3)
    assert received[0] == [encode_header("pub-1", "imu", 0, 100, rate=200), rows.tobytes()]
    assert received[1] == [encode_header("pub-1", "imu", 1, 110, rate=200), rows.tobytes()]
    assert received[2] == [encode_header("pub-1", "thermal", 0, 120, dtype="uint8", shape=[2, 3]), bytes(6)]
    assert (
        pub.sent == {"imu": 2, "thermal": 1} and not pub.dropped and pub.bytes_sent == sum(map(len, sum(received, [])))
    )


def test_publisher_validates_before_sending(pull):
    with DevicePublisher(endpoint(pull), "pub-1") as pub:
        with pytest.raises(Rejected, match="non_finite"):
            pub.send("imu", 0, np.full((1, 6), np.nan), rate=100)
        pub.send("imu", 1, np.zeros((1, 6)), rate=100)
    assert decode(pull.recv_multipart(copy=False)).seq == 0  # a refused message does not use up a seq
    with pytest.raises(ValueError):
        DevicePublisher(endpoint(pull), "bad id")


def _rebind(sock: zmq.Socket, ep: str) -> None:
    """Bind again once the previous unbind has released the port (it is released asynchronously)."""
    deadline = time.monotonic() + 2
    while True:
        try:
            return sock.bind(ep)
        except zmq.ZMQError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def test_queue_buffers_while_disconnected_and_drops_show_as_gaps():
    ctx = zmq.Context()
    try:
        pull = ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)
        # Below the kernel's ephemeral range: a reconnecting client cannot end up connected to itself.
        port = pull.bind_to_random_port("tcp://127.0.0.1", min_port=20000, max_port=30000)
        ep = f"tcp://127.0.0.1:{port}"
        pull.unbind(ep)  # the ingest server is down
        pub = DevicePublisher(ep, "pub-1", sndhwm=2, context=ctx)
        results = [pub.send("imu", i, np.zeros((1, 6)), rate=100) for i in range(10)]
        queued = pub.sent["imu"]
        assert results == [True] * queued + [False] * (10 - queued) and 1 <= queued <= 4
        assert pub.dropped["imu"] == 10 - queued
        _rebind(pull, ep)  # the server comes back; ZeroMQ reconnects by itself
        assert [decode(pull.recv_multipart(copy=False)).seq for _ in range(queued)] == list(range(queued))
        pub.block = True
        pub.send("imu", 10, np.zeros((1, 6)), rate=100)
        assert decode(pull.recv_multipart(copy=False)).seq == 10  # the gap tells the receiver what was lost
        pub.close(linger_ms=0)
    finally:
        ctx.destroy(linger=0)


# --- file and array publishers -----------------------------------------------------------------


def test_imu_csv_publishes_rows_at_the_inferred_rate(pull, tmp_path):
    rng = np.random.default_rng(0)
    t = 3.0 + np.arange(250) / 100 + rng.uniform(-2e-4, 2e-4, 250)  # 100 Hz with jitter
    keep = np.r_[0:120, 130:250]  # 100 ms of rows missing
    values = rng.normal(0, 1, (250, 6))
    path = tmp_path / "imu.csv"
    np.savetxt(path, np.column_stack([t, values])[keep], delimiter=",", header="t,ax,ay,az,gx,gy,gz", comments="")
    recording = ImuRecording.from_csv(path)
    assert recording.rate == 100
    with DevicePublisher(endpoint(pull), "imu-1") as pub:
        count = publish_imu(pub, recording, chunk_s=0.05, realtime=False)
    msgs = [decode(pull.recv_multipart(copy=False)) for _ in range(count)]
    assert {m.rate for m in msgs} == {100} and [m.seq for m in msgs] == list(range(count))
    assert [len(m.payload) for m in msgs] == [5] * 24 + [5] * 24  # chunks restart after the gap
    np.testing.assert_array_equal(np.concatenate([m.payload for m in msgs]), values[keep].astype(np.float32))
    starts = np.round(t[keep][::5] * NS).astype(np.int64)
    assert [m.t_ns for m in msgs] == starts.tolist()


def test_depth_and_thermal_frames_from_files(pull, tmp_path):
    stack = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5) * 100
    np.save(tmp_path / "depth.npy", stack)
    thermal_dir = tmp_path / "thermal"
    thermal_dir.mkdir()
    for i in range(2):  # LLVIP-style 8-bit images, stored as 3-channel JPEG-like colour files
        cv2.imwrite(str(thermal_dir / f"{i:04d}.png"), np.full((6, 8, 3), 50 * i, np.uint8))
    with DevicePublisher(endpoint(pull), "cam-1") as pub:
        assert publish_frames(pub, "depth", load_frames(tmp_path / "depth.npy"), 10, start_ns=NS, realtime=False) == 3
        assert publish_frames(pub, "thermal", load_frames(thermal_dir), 9, start_ns=0, realtime=False) == 2
    depth = [decode(pull.recv_multipart(copy=False)) for _ in range(3)]
    assert [m.t_ns for m in depth] == [NS, NS + 100_000_000, NS + 200_000_000]
    np.testing.assert_array_equal(np.stack([m.payload for m in depth]), stack)
    thermal = [decode(pull.recv_multipart(copy=False)) for _ in range(2)]
    assert [(m.dtype, m.shape, int(m.payload.max())) for m in thermal] == [("uint8", (6, 8), 0), ("uint8", (6, 8), 50)]
    assert thermal[1].t_ns == NS // 9


def test_camera_file_is_sent_as_jpeg_with_file_timestamps(pull, tmp_path):
    path = str(tmp_path / "clip.avi")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 25, (64, 48))
    for i in range(8):
        writer.write(np.full((48, 64, 3), (0, 0, 30 * i), np.uint8))  # BGR: red ramps up
    writer.release()
    with DevicePublisher(endpoint(pull), "cam-1") as pub:
        assert publish_camera(pub, path, quality=95, max_frames=5, realtime=False) == 5
    msgs = [decode(pull.recv_multipart(copy=False)) for _ in range(5)]
    assert {(m.encoding, m.shape) for m in msgs} == {("jpeg", (48, 64, 3))}
    assert np.diff([m.t_ns for m in msgs]).tolist() == [40_000_000] * 4
    red = [int(decode_image(m)[..., 0].mean()) for m in msgs]
    assert all(abs(r - 30 * i) < 6 for i, r in enumerate(red))


@pytest.mark.skipif(importlib.util.find_spec("sounddevice") is not None, reason="sounddevice is installed")
def test_microphone_without_sounddevice_says_how_to_install(pull):
    with DevicePublisher(endpoint(pull), "mic-1") as pub, pytest.raises(ImportError, match=r"bindstream\[mic\]"):
        publish_microphone(pub, seconds=0.1)


def test_bindstream_simulate_leaves_out_the_frames_the_default_windows_do_not_use(pull):
    """The command as a user runs it: by default its wearables send the used frames whole, a few omitted and skip
    the rest (a lower frame rate, PROTOCOL.md section 5); `--all-frames` sends every frame's pixels."""
    received = {}
    for flags in ([], ["--all-frames"]):
        command = ["bindstream", "simulate", "--fast", "--seconds", "3", "--endpoint", endpoint(pull), *flags]
        out = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
        sent = int(out.split()[1])
        messages = [decode(pull.recv_multipart(copy=False)) for _ in range(sent)]
        frames = [m for m in messages if m.sensor in ("camera", "depth", "thermal")]
        received[tuple(flags)] = (sent, sum(m.payload.nbytes for m in frames), Counter(m.sensor for m in frames))
        assert "MB)" in out
    (sent, pixels, frames), (all_sent, all_pixels, all_frames) = received[()], received[("--all-frames",)]
    assert all_frames == {"camera": 90, "depth": 90, "thermal": 27}
    assert frames["camera"] < 30 and frames["depth"] < 30 and sent < all_sent
    assert pixels < all_pixels / 10
