"""End to end with real parts: a simulated wearable -> ZeroMQ on loopback -> Ray actors -> redis-server."""

from collections import Counter

import msgpack
import numpy as np
import pytest
import redis
import zmq

import encoders
from sensors.protocol import decode
from sensors.simulator import SimulatedWearable
from streaming.pipeline import Pipeline, PipelineConfig
from streaming.stage import Counts
from streaming.subscriber import read_all
from streaming.windowing import SECOND, Windower

from .conftest import wait_for

SECONDS = 12
START_NS = 1_000 * SECOND  # on the 1 s grid, so the first window starts with the stream
DEVICE = "glasses-1"
OMITTING = "glasses-omitting"  # sends the frames no window uses as omitted (PROTOCOL.md section 5)


def send_all(endpoint: str, messages) -> int:
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.connect(endpoint)
    n = 0
    for header, payload in messages:
        push.send_multipart([msgpack.packb(header), payload])
        n += 1
    push.close(linger=-1)
    return n


@pytest.fixture(scope="module")
def pipeline_run(ray_local, redis_server):
    messages = list(SimulatedWearable(DEVICE, seed=7, start_ns=START_NS).messages(SECONDS))
    config = PipelineConfig(ingest=["tcp://127.0.0.1:*"], model="tiny", max_wait_ms=20)
    omitting = SimulatedWearable(OMITTING, seed=7, start_ns=START_NS, sampling=config.windowing.frame_sampling())
    pipeline = Pipeline(config, redis_server.url, "tiny")
    (endpoint,) = pipeline.start()
    sent = send_all(endpoint, messages) + send_all(endpoint, omitting.messages(SECONDS))
    wait_for(
        lambda: (
            sum(
                Counts.of(pipeline.stats()["ingest"][0]).get("in", m)
                for m in ("vision", "audio", "depth", "thermal", "imu")
            )
            == sent
        ),
        60,
        "ingest to take all",
    )
    final = pipeline.drain()
    pipeline.kill()
    client = redis.Redis.from_url(redis_server.url)
    records = read_all(client, DEVICE)
    return messages, records, final, read_all(client, OMITTING)


def test_exact_windows_per_modality_and_bounds(pipeline_run):
    _, records, _, _ = pipeline_run
    by_modality = {}
    for r in records:
        by_modality.setdefault(r.modality, []).append((r.t0, r.t1))
    two_s = [(START_NS + k * SECOND, START_NS + k * SECOND + 2 * SECOND) for k in range(SECONDS - 1)]
    imu = [(START_NS + k * 2_500_000_000, START_NS + k * 2_500_000_000 + 5 * SECOND) for k in range(3)]
    for modality in ("vision", "audio", "depth", "thermal", "fused"):
        assert sorted(by_modality[modality]) == two_s, modality
    assert sorted(by_modality["imu"]) == imu


def test_published_embeddings_equal_offline_encoder(pipeline_run):
    messages, records, _, _ = pipeline_run
    windower = Windower()
    windows = []
    for header, payload in messages:
        windows += windower.add(decode([msgpack.packb(header), payload]))
    encoder = encoders.load("tiny", device="cpu")
    offline = {(w.modality, w.t0): encoder.embed(w.modality, w.data[None])[0] for w in windows}
    published = {(r.modality, r.t0): r for r in records if r.modality != "fused"}
    assert set(published) == set(offline)
    for key, record in published.items():
        np.testing.assert_allclose(record.emb, offline[key], atol=1e-4, err_msg=str(key))
    # fused: the renormalised sum of the vision, audio, depth and thermal embeddings of the same window
    for r in records:
        if r.modality == "fused":
            assert r.modalities == ("vision", "audio", "depth", "thermal")
            total = sum(offline[m, r.t0] for m in r.modalities)
            np.testing.assert_allclose(r.emb, total / np.linalg.norm(total), atol=1e-4)


def test_records_decode_as_documented(pipeline_run, redis_server):
    client = redis.Redis.from_url(redis_server.url)
    key = f"bindstream:emb:{{{DEVICE}}}:audio"  # the braces are part of the key: its hash tag (REDIS.md)
    entry_id, fields = client.xrange(key, count=1)[0]
    assert set(fields) >= {b"t0", b"t1", b"model", b"dtype", b"dim", b"emb"}
    assert fields[b"dtype"] == b"float32" and fields[b"model"] == b"tiny"
    vec = np.frombuffer(fields[b"emb"], dtype="<f4")
    assert vec.shape == (int(fields[b"dim"]),)
    assert abs(np.linalg.norm(vec) - 1) < 1e-5
    assert int(fields[b"t1"]) - int(fields[b"t0"]) == 2 * SECOND


def test_drain_reports_no_drops(pipeline_run):
    _, _, final, _ = pipeline_run
    for stage in final.values():
        for actor in stage:
            assert not [e for e in Counts.of(actor).events() if e.startswith(("dropped", "rejected"))], actor


def test_a_device_omitting_unused_frames_gets_the_embeddings_of_sending_them_all(pipeline_run):
    """The same wearable sending every frame's pixels (offline here) and leaving out the frames no window uses
    (through the pipeline: most skipped, some sent omitted to keep the frames within the largest gap): the same
    windows, embeddings within the parity tolerance; ingest counted the omitted frames it got."""
    _, _, final, records = pipeline_run
    windower = Windower()
    windows = []
    for header, payload in SimulatedWearable(OMITTING, seed=7, start_ns=START_NS).messages(SECONDS):
        windows += windower.add(decode([msgpack.packb(header), payload]))
    encoder = encoders.load("tiny", device="cpu")
    offline = {(w.modality, w.t0): encoder.embed(w.modality, w.data[None])[0] for w in windows}
    published = {(r.modality, r.t0): r.emb for r in records if r.modality != "fused"}
    assert published.keys() == offline.keys()
    for key, emb in published.items():
        np.testing.assert_allclose(emb, offline[key], atol=1e-4, err_msg=str(key))
    sampling = PipelineConfig().windowing.frame_sampling()
    sent = list(SimulatedWearable(OMITTING, seed=7, start_ns=START_NS, sampling=sampling).messages(SECONDS))
    omitted = Counter(h["sensor"] for h, _ in sent if h.get("omitted"))
    frames = Counter(h["sensor"] for h, _ in sent)
    for sensor in ("camera", "depth"):  # of 30 fps, one frame a second used, some 4 to 6 sent omitted
        assert 3 * SECONDS <= omitted[sensor] <= 7 * SECONDS and frames[sensor] <= 8 * SECONDS, sensor
    ingest = Counts.of(final["ingest"][0])
    assert [ingest.get("omitted", m) for m in ("vision", "depth", "thermal")] == [
        omitted[s] for s in ("camera", "depth", "thermal")
    ]


def bad_messages(device: str, good: list) -> list[list[bytes]]:
    """One message per fault the ingest and windowing stages must drop and count."""
    imu = next(h for h, _ in good if h["sensor"] == "imu")
    mic_header, mic_payload = [(h, p) for h, p in good if h["sensor"] == "mic"][10]
    pack = msgpack.packb
    nan_imu = np.full((40, 6), np.nan, np.float32).tobytes()
    return [
        [b"\xc1 not msgpack", b"x"],
        [pack({**imu, "sensor": "sonar"}), b"x" * 24],
        [pack({**imu, "v": 2}), b"x" * 24],
        [pack({k: v for k, v in imu.items() if k != "t_ns"}), b"x" * 24],
        [pack({**imu, "seq": 10**6}), b"x" * 25],  # not a whole number of rows
        [
            pack(
                {
                    "v": 1,
                    "device": device,
                    "sensor": "depth",
                    "seq": 0,
                    "t_ns": 1,
                    "dtype": "uint16",
                    "shape": [4096, 4096],
                }
            ),
            b"xx",
        ],  # declares 32 MiB, carries 2 bytes
        [pack({**imu, "seq": 10**6 + 1}), nan_imu],
        [pack(mic_header), mic_payload],  # a duplicate of a message already sent
    ]


def test_bad_input_is_dropped_counted_and_loses_nothing(ray_local, redis_server):
    device = "glasses-bad"
    good = list(SimulatedWearable(device, seed=11, start_ns=START_NS).messages(5))
    # the clock of the mic goes back once: a valid message with a fresh seq but an old time
    mics = [h for h, _ in good if h["sensor"] == "mic"]
    backwards = ({**mics[-1], "seq": mics[-1]["seq"] + 1, "t_ns": START_NS}, bytes(960 * 2))
    frames = [[msgpack.packb(h), p] for h, p in good]
    frames[200:200] = bad_messages(device, good)
    frames.append([msgpack.packb(backwards[0]), backwards[1]])
    config = PipelineConfig(ingest=["tcp://127.0.0.1:*"], model="tiny", max_wait_ms=20, matchers=0)
    pipeline = Pipeline(config, redis_server.url, "tiny")
    (endpoint,) = pipeline.start()
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(endpoint)
    for message in frames:
        push.send_multipart(message)
    push.close(linger=-1)
    wait_for(
        lambda: Counts.of(*pipeline.stats()["window"]).get("in") == len(good) + 2,
        60,
        "the valid messages to reach windowing",
    )
    final = pipeline.drain()
    pipeline.kill()
    ingest = Counts.of(final["ingest"][0])
    assert ingest.get("rejected_malformed", "unknown") == 1
    assert ingest.get("rejected_bad_version", "unknown") == 1  # a header of another version is not read further
    for reason in ("unknown_sensor", "missing_key", "non_finite"):
        assert ingest.get(f"rejected_{reason}", device) == 1, reason
    assert ingest.get("rejected_payload_size", device) == 2  # 25 bytes of IMU; 2 bytes declared as 4096 x 4096
    window = Counts.of(final["window"][0])
    assert window.get("dropped_seq_replay", device) == 1
    assert window.get("dropped_clock_backwards", device) == 1
    # nothing accepted was lost: every window of the good stream was published
    windower = Windower()
    expected = set()
    for header, payload in good:
        expected |= {(w.modality, w.t0) for w in windower.add(decode([msgpack.packb(header), payload]))}
    published = {
        (r.modality, r.t0) for r in read_all(redis.Redis.from_url(redis_server.url), device) if r.modality != "fused"
    }
    assert published == expected
