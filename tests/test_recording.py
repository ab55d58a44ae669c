"""MCAP recordings and replay: the format read back with the `mcap` reader, files cut short, retention, the
`device record` and `replay` commands, and `run --record` on a real pipeline (Ray, redis-server, ZeroMQ; the
`tiny` model, RANDOM weights) replayed into a fresh one."""

import base64
import json
import os
import subprocess
import sys
import time
from collections import Counter

import cv2
import jsonschema
import msgpack
import numpy as np
import pytest
import redis
import zmq
from click.testing import CliRunner
from mcap.reader import make_reader
from mcap.records import Chunk, Message
from mcap.stream_reader import StreamReader, breakup_chunk

from sensors.mcap_format import Recording
from sensors.protocol import NS_PER_S, decode, encode_header
from sensors.recorder import MIB, Recorder, RecordingSettings, Replay
from sensors.simulator import SimulatedWearable
from streaming.cli import main
from streaming.pipeline import ConfigError, Pipeline, PipelineConfig
from streaming.stage import Counts
from streaming.subscriber import read_all
from streaming.windowing import REPLAY

from .conftest import endpoint, wait_for

pytestmark = pytest.mark.timeout(300)
START_NS = 1_000 * NS_PER_S
MODALITIES = ("vision", "audio", "depth", "thermal", "imu")


def wire(messages) -> list[list[bytes]]:
    return [[msgpack.packb(h), p] for h, p in messages]


def other_kinds(device: str) -> list[list[bytes]]:
    """One message of each sensor format the simulator does not send (raw and PNG camera, float mic, ...)."""
    png = cv2.imencode(".png", np.zeros((2, 4, 3), np.uint8))[1].tobytes()
    t = START_NS + 7 * NS_PER_S
    return [
        [encode_header(device, "camera", 900, t, encoding="raw", shape=[2, 4, 3]), bytes(range(24))],
        [encode_header(device, "camera", 901, t + 1, encoding="png"), png],
        [
            encode_header(device, "mic", 902, t, rate=16_000, channels=2, dtype="float32"),
            np.ones((8, 2), "<f4").tobytes(),
        ],
        [encode_header(device, "depth", 903, t, dtype="float32", shape=[2, 3]), np.ones((2, 3), "<f4").tobytes()],
        [encode_header(device, "thermal", 904, t, dtype="uint8", shape=[3, 2]), bytes(6)],
    ]


def record(folder, messages, settings=None, tag="test", rx_ns=None) -> Recorder:
    recorder = Recorder(folder, settings or RecordingSettings(), tag=tag, source="tests/test_recording.py")
    for i, frames in enumerate(messages):
        assert recorder.put(decode(frames), frames, time.time_ns() if rx_ns is None else rx_ns[i])
    recorder.close()
    return recorder


def read_with_mcap(path):
    """(summary, [(topic, schema, channel metadata, message fields, log time)], {metadata name: [records]})."""
    with open(path, "rb") as f:
        reader = make_reader(f)
        summary = reader.get_summary()
        messages = [
            (channel.topic, schema, channel.metadata, json.loads(message.data), message.log_time)
            for schema, channel, message in reader.iter_messages()
        ]
        metadata: dict[str, list[dict]] = {}
        for m in reader.iter_metadata():
            metadata.setdefault(m.name, []).append(m.metadata)
    return summary, messages, metadata


# --- the format --------------------------------------------------------------------------------------------


def test_mcap_round_trip_channels_schemas_counts_and_exact_bytes(tmp_path):
    sent = wire(SimulatedWearable("rec-1", 3, start_ns=START_NS).messages(1.0)) + other_kinds("rec-1")
    sent += wire(SimulatedWearable("rec-2", 4, start_ns=START_NS).messages(0.2))
    recorder = record(tmp_path, sent)
    (path,) = tmp_path.iterdir()
    assert recorder.counts == {"recorded": len(sent), "recording_files": 1}

    summary, messages, metadata = read_with_mcap(path)
    headers = [msgpack.unpackb(h) for h, _ in sent]
    counts: Counter = Counter()
    for channel_id, n in summary.statistics.channel_message_counts.items():
        counts[summary.channels[channel_id].topic] += n
    # one channel per device and sensor (and per schema: rec-1's camera sent JPEG, PNG and raw frames)
    assert counts == Counter(f"/{h['device']}/{h['sensor']}" for h in headers)
    assert {c.message_encoding for c in summary.channels.values()} == {"json"}
    schemas = {(summary.channels[i].topic, summary.schemas[c.schema_id].name) for i, c in summary.channels.items()}
    assert schemas == {
        *((f"/{d}/camera", "foxglove.CompressedImage") for d in ("rec-1", "rec-2")),
        ("/rec-1/camera", "foxglove.RawImage"),
        *((f"/{d}/{s}", "foxglove.RawImage") for d in ("rec-1", "rec-2") for s in ("depth", "thermal")),
        *((f"/{d}/mic", "foxglove.RawAudio") for d in ("rec-1", "rec-2")),
        *((f"/{d}/imu", "bindstream.Imu") for d in ("rec-1", "rec-2")),
    }
    assert {s.encoding for s in summary.schemas.values()} == {"jsonschema"}

    assert len(messages) == len(sent)
    for (topic, schema, channel_meta, fields, _), (header, payload), h in zip(messages, sent, headers):
        jsonschema.validate(fields, json.loads(schema.data))
        assert base64.b64decode(fields["bindstream_header"]) == header and base64.b64decode(fields["data"]) == payload
        assert fields["timestamp"] == {"sec": h["t_ns"] // NS_PER_S, "nsec": h["t_ns"] % NS_PER_S}
        assert topic == f"/{h['device']}/{h['sensor']}" and channel_meta["device"] == h["device"]
    by_kind: dict = {}
    for topic, schema, _, fields, _ in messages:
        by_kind.setdefault((topic, schema.name), fields)  # the first of each
    compressed = {m[3]["format"] for m in messages if m[1].name == "foxglove.CompressedImage"}
    assert compressed == {"jpeg", "png"}  # one channel for both: one schema
    assert {k: by_kind["/rec-1/depth", "foxglove.RawImage"][k] for k in ("width", "height", "encoding", "step")} == {
        "width": 640,
        "height": 480,
        "encoding": "16UC1",
        "step": 1280,
    }
    raw = by_kind["/rec-1/camera", "foxglove.RawImage"]
    assert (raw["width"], raw["height"], raw["encoding"], raw["step"]) == (4, 2, "rgb8", 12)
    audio = by_kind["/rec-1/mic", "foxglove.RawAudio"]
    assert (audio["format"], audio["sample_rate"], audio["number_of_channels"]) == ("pcm-s16", 48_000, 1)

    (session,) = metadata["bindstream.session"]
    assert session["source"] == "tests/test_recording.py" and session["protocol_version"] == "1"
    assert session["bindstream_version"] and session["session_start"].startswith("20")
    devices = {m["device"]: json.loads(m["sensors"]) for m in metadata["bindstream.device"]}
    assert set(devices) == {"rec-1", "rec-2"}
    assert devices["rec-2"]["depth"]["resolution"] == "640x480" and devices["rec-2"]["depth"]["frames_per_s"] == 30
    assert devices["rec-1"]["imu"]["rate"] == "800" and devices["rec-1"]["mic"]["messages"] == 50 + 1

    recording = Recording(path)
    assert [m.frames for m in recording.messages()] == sent and recording.complete


def chunk_ends(path) -> list[tuple[int, int]]:
    """(end offset, messages) of each chunk of a complete file, in file order."""
    with open(path, "rb") as f:
        indexes = make_reader(f).get_summary().chunk_indexes
    with open(path, "rb") as f:
        chunks = [r for r in StreamReader(f, emit_chunks=True).records if isinstance(r, Chunk)]
    sizes = [sum(isinstance(r, Message) for r in breakup_chunk(c)) for c in chunks]
    return [(i.chunk_start_offset + i.chunk_length, n) for i, n in zip(indexes, sizes)]


def test_a_file_cut_short_replays_up_to_its_last_complete_chunk(tmp_path, pull):
    sent = wire(SimulatedWearable("cut-1", 5, start_ns=START_NS).messages(1.0))
    record(tmp_path / "whole", sent, RecordingSettings(chunk_bytes=2 * MIB))
    (path,) = (tmp_path / "whole").iterdir()
    ends = chunk_ends(path)
    assert len(ends) >= 4, ends
    size = path.stat().st_size
    (end_1, _), (end_2, _) = ends[1], ends[2]
    offsets = [4, 100, ends[0][0], (end_1 + end_2) // 2, end_2, end_2 + 5, ends[-1][0] - 1, size - 10]
    for offset in offsets:
        cut = tmp_path / f"cut-{offset}.mcap"
        cut.write_bytes(path.read_bytes()[:offset])
        expected = sent[: sum(n for end, n in ends if end <= offset)]
        recording = Recording(cut)
        assert [m.frames for m in recording.messages()] == expected, offset
        assert recording.complete is False
        replay = Replay([cut])
        assert replay.play(endpoint(pull), speed=None) == len(expected)
        assert [[f.bytes for f in pull.recv_multipart(copy=False)] for _ in expected] == expected
        assert replay.truncated == [cut]


def test_retention_deletes_the_oldest_files_beyond_the_budget_and_age(tmp_path):
    settings = RecordingSettings(max_file_bytes=3 * MIB, max_total_bytes=8 * MIB, chunk_bytes=MIB, max_age_s=3600)
    stale = tmp_path / "test-20200101T000000000000Z-0000.mcap"
    stale.write_bytes(b"x")
    other = tmp_path / "other-20200101T000000000000Z-0000.mcap"  # another recorder's: not this budget's
    other.write_bytes(b"x")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    sent = wire(SimulatedWearable("ret-1", 6, start_ns=START_NS).messages(1.5))
    assert sum(len(h) + len(p) for h, p in sent) > 3 * settings.max_total_bytes  # many files' worth
    recorder = record(tmp_path, sent, settings)
    files = sorted(tmp_path.glob("test-*.mcap"))
    made = recorder.counts["recording_files"]
    assert made >= 5 and not stale.exists() and other.exists()
    assert recorder.counts["recording_deleted"] == made + 1 - len(files)
    assert [int(p.stem.rsplit("-", 1)[1]) for p in files] == list(range(made - len(files), made))  # the newest
    assert sum(p.stat().st_size for p in files) <= settings.max_total_bytes + settings.chunk_bytes
    kept = [m.frames for m in Replay(files).messages()]
    assert kept and kept == sent[-len(kept) :]  # the latest messages


def test_a_full_queue_leaves_the_message_out_of_the_recording_and_counts_it(tmp_path):
    by_sensor = {decode(f).sensor: f for f in wire(SimulatedWearable("q-1", 1, start_ns=START_NS).messages(0.1))}
    imu, depth = by_sensor["imu"], by_sensor["depth"]
    recorder = Recorder(tmp_path, RecordingSettings(queue_bytes=sum(map(len, imu))), tag="q", source="test")
    assert recorder.put(decode(depth), depth, 1) is False  # more than the queue holds: left out, never waited for
    assert recorder.put(decode(imu), imu, 2) is True
    recorder.close()
    assert recorder.counts["dropped_recording"] == 1 and recorder.counts["recorded"] == 1
    (path,) = tmp_path.iterdir()
    assert [m.frames for m in Recording(path).messages()] == [imu]


def test_a_folder_that_cannot_be_written_leaves_messages_out_until_it_can(tmp_path):
    imu = [[encode_header("disk", "imu", k, START_NS + k, rate=100), bytes(24)] for k in range(2)]
    folder = tmp_path / "recordings"
    recorder = Recorder(folder, RecordingSettings(retry_s=0.2), tag="d", source="test")
    folder.rmdir()
    folder.write_bytes(b"")  # a file where the folder was: no recording can begin
    recorder.put(decode(imu[0]), imu[0], 1)
    wait_for(lambda: recorder.counts["dropped_recording_error"] == 1, 10, "the failed write to be counted")
    folder.unlink()
    time.sleep(0.3)  # past retry_s: the next message tries a new file
    recorder.put(decode(imu[1]), imu[1], 2)
    recorder.close()
    assert recorder.counts["recorded"] == 1 and recorder.counts["recording_files"] == 1
    (path,) = folder.iterdir()
    assert [m.frames for m in Recording(path).messages()] == [imu[1]]


def test_replay_is_paced_by_the_receive_times(tmp_path, pull):
    sent = [[encode_header("pace", "imu", k, START_NS + k, rate=100), bytes(24)] for k in range(4)]
    record(tmp_path, sent, rx_ns=[k * 100_000_000 for k in range(4)])  # received 100 ms apart
    start = time.monotonic()
    assert Replay([tmp_path]).play(endpoint(pull), speed=2.0) == 4
    assert time.monotonic() - start >= 0.14  # 300 ms of receive time at 2x: paced, not sent at once
    assert [[f.bytes for f in pull.recv_multipart(copy=False)] for _ in sent] == sent  # device clocks kept


def test_replay_merges_files_that_overlap_in_time(tmp_path):
    """Two ingest endpoints record at once: replay interleaves their files by receive time, each in its order."""
    a = [[encode_header("a", "imu", k, START_NS + k, rate=100), bytes(24)] for k in range(6)]
    b = [[encode_header("b", "imu", k, START_NS + k, rate=100), bytes(24)] for k in range(6)]
    record(tmp_path, a[:3], tag="tcp-a", rx_ns=[10, 30, 50])
    record(tmp_path, a[3:], tag="tcp-a", rx_ns=[70, 90, 110])  # a second file of the same series
    record(tmp_path, b, tag="tcp-b", rx_ns=[20, 40, 60, 80, 100, 120])
    merged = list(Replay([tmp_path]).messages())
    assert [m.rx_ns for m in merged] == list(range(10, 130, 10))
    assert [m.frames for m in merged] == [x for pair in zip(a, b) for x in pair]


def test_recording_settings_come_from_the_pipeline_config_and_are_checked():
    config = PipelineConfig.from_dict({"record": "rec", "recording": {"max_file_bytes": MIB, "fsync": False}})
    assert config.record == "rec" and config.recording == RecordingSettings(max_file_bytes=MIB, fsync=False)
    for table, words in (
        ({"max_total_bytes": MIB, "max_file_bytes": 2 * MIB}, "must be at least max_file_bytes"),
        ({"compression": "gzip"}, "compression must be one of zstd, lz4, none"),
        ({"flush_s": 0}, "flush_s must be a number over 0"),
        ({"max_fil_bytes": 1}, "did you mean 'max_file_bytes'"),
    ):
        with pytest.raises(ConfigError, match=words):
            PipelineConfig.from_dict({"recording": table})


# --- the commands ------------------------------------------------------------------------------------------


def test_device_record_and_replay_commands(tmp_path, pull):
    probe = zmq.Context.instance().socket(zmq.PULL)
    record_port = probe.bind_to_random_port("tcp://127.0.0.1")  # a free port for the recorder
    probe.close(linger=0)
    folder = tmp_path / "recordings"
    sent = wire(SimulatedWearable("cmd-1", 2, start_ns=START_NS).messages(0.3))
    recorder = subprocess.Popen(
        [sys.executable, "-m", "sensors", "record", str(folder), "--bind", f"tcp://127.0.0.1:{record_port}"]
        + ["--count", str(len(sent))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{record_port}")
    push.send_multipart([b"\xc1 not msgpack", b"x"])  # invalid: not recorded
    for frames in sent:
        push.send_multipart(frames)
    out, err = recorder.communicate(timeout=120)
    push.close(linger=0)
    assert recorder.returncode == 0, err
    assert f"recorded {len(sent)} messages" in out and "rejected_malformed" in out

    runner = CliRunner()
    result = runner.invoke(main, ["replay", str(folder), "--as-fast-as-possible", "--endpoint", endpoint(pull)])
    assert result.exit_code == 0, result.output
    assert f"replayed {len(sent)} messages from 1 files" in result.output
    assert [[f.bytes for f in pull.recv_multipart(copy=False)] for _ in sent] == sent

    both = runner.invoke(main, ["replay", str(folder), "--speed", "2", "--as-fast-as-possible"])
    assert both.exit_code != 0 and "exclude each other" in both.output
    (tmp_path / "not.mcap").write_bytes(b"hello world")
    alien = runner.invoke(main, ["replay", str(tmp_path / "not.mcap"), "--endpoint", endpoint(pull)])
    assert alien.exit_code == 1 and "is not an MCAP file" in alien.output


# --- run --record, then replay into a fresh pipeline -------------------------------------------------------


def hostile(device: str, good: list[list[bytes]]) -> list[list[bytes]]:
    """Messages ingest rejects: too large, not msgpack, NaN rows, an invalid device id."""
    imu_header = next(h for h in (msgpack.unpackb(f[0]) for f in good) if h["sensor"] == "imu")
    nan_rows = np.full((40, 6), np.nan, np.float32).tobytes()
    return [
        [encode_header(device, "camera", 10_000, START_NS, encoding="jpeg"), bytes(8 * MIB + 1)],
        [b"\xc1 not msgpack", b"x"],
        [msgpack.packb({**imu_header, "seq": 10_001}), nan_rows],
        [msgpack.packb({**imu_header, "device": "bad:id"}), bytes(24)],
    ]


def run_pipeline(redis_url: str, messages: list[list[bytes]] | None, replay_folder=None, **config) -> list[dict]:
    """Start a pipeline, feed it `messages` (or replay `replay_folder`) until ingest took them all, drain it;
    returns its final stats."""
    pipeline = Pipeline(
        PipelineConfig(ingest=["tcp://127.0.0.1:*"], model="tiny", matchers=0, overload=REPLAY, **config),
        redis_url,
        "tiny",
    )
    try:
        (ingest,) = pipeline.start()
        if replay_folder is not None:
            expected = Replay([replay_folder]).play(ingest, speed=None)
        else:
            push = zmq.Context.instance().socket(zmq.PUSH)
            push.connect(ingest)
            for frames in messages or []:
                push.send_multipart(frames)
            push.close(linger=-1)
            expected = len(messages or [])

        def taken():
            counts = Counts.of(pipeline.stats()["ingest"][0])
            return counts.get("in") + counts.get("rejected_") == expected

        wait_for(taken, 120, "ingest to take every message")
        return pipeline.drain()["ingest"]
    finally:
        pipeline.kill()


def windows(redis_url: str, device: str) -> dict[tuple[str, str, int], np.ndarray]:
    """(device, modality, t0) -> embedding of every published entry of `device`."""
    return {(r.device, r.modality, r.t0): r.emb for r in read_all(redis.Redis.from_url(redis_url), device)}


def test_run_record_then_replay_into_a_fresh_pipeline_gives_the_live_windows(ray_local, redis_server, tmp_path):
    device = "rec-live"
    good = wire(SimulatedWearable(device, 8, start_ns=START_NS).messages(6.0))
    bad = hostile(device, good)
    live_feed = good[:40] + bad + good[40:]
    folder = tmp_path / "recordings"
    settings = RecordingSettings(max_file_bytes=24 * MIB, chunk_bytes=4 * MIB)  # a few files, to be merged
    live = run_pipeline(redis_server.url, live_feed, record=str(folder), recording=settings)
    counts = Counts.of(*live)
    assert counts.get("in") == len(good) and counts.get("rejected_") == len(bad)
    assert counts.get("recorded", device) == len(good) and counts.get("dropped_recording") == 0
    files = sorted(folder.iterdir())
    assert len(files) == counts.get("recording_files") >= 2
    recorded = [m.frames for m in Replay(files).messages()]
    assert recorded == good  # what ingest accepted, byte for byte, and nothing it rejected
    live_windows = windows(redis_server.url, device)
    assert {m for _, m, _ in live_windows} >= set(MODALITIES)

    fresh = redis_server.url.rsplit("/", 1)[0] + "/1"  # another database: a fresh Redis for the replay
    redis.Redis.from_url(fresh).flushdb()
    replayed = run_pipeline(fresh, None, replay_folder=folder)
    assert Counts.of(*replayed).get("in") == len(good) and Counts.of(*replayed).get("rejected_") == 0
    again = windows(fresh, device)
    assert set(again) == set(live_windows)
    for key, emb in again.items():  # the same bytes in, the same embeddings out (tiny: RANDOM weights, fixed seed)
        np.testing.assert_allclose(emb, live_windows[key], atol=1e-5, err_msg=str(key))


def test_omitted_frames_are_recorded_and_read_back_as_sent(tmp_path):
    """A wearable omitting the frames no window uses (PROTOCOL.md): its header-only frames are recorded, valid
    for the Foxglove schemas, and read back byte for byte."""
    from streaming.windowing import WindowingConfig

    wearable = SimulatedWearable("rec-3", 5, start_ns=START_NS, sampling=WindowingConfig().frame_sampling())
    sent = wire(wearable.messages(1.0))
    assert any(not payload for _, payload in sent)
    record(tmp_path, sent)
    (path,) = tmp_path.iterdir()
    _, messages, _ = read_with_mcap(path)
    for _, schema, _, fields, _ in messages:
        jsonschema.validate(fields, json.loads(schema.data))
    recording = Recording(path)
    assert [m.frames for m in recording.messages()] == sent and recording.complete
