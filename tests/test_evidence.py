"""Evidence kept where the windows are cut: the raw buffer's bounds, the writer against a real redis-server, and
end to end through the real pipeline (real ZeroMQ, real local Ray, the `tiny` model: RANDOM weights)."""

from __future__ import annotations

import io
import json
import threading
import time
import wave

import numpy as np
import pytest
import redis

from sensors.images import encode_jpeg
from sensors.protocol import IMU_COLUMNS, SensorMessage
from sensors.publisher import DevicePublisher
from streaming.evidence import ITEM_OVERHEAD_BYTES, EvidenceSettings, EvidenceWriter, RawBuffer
from streaming.pipeline import ConfigError, Pipeline, PipelineConfig
from streaming.redis_layout import (
    ALERTS_CHANNEL,
    ALERTS_STREAM,
    AUDIO_CHANNELS,
    AUDIO_PCM,
    AUDIO_RATE,
    AUDIO_T0,
    END,
    EVIDENCE_FIELD,
    IMU_CSV,
    MISSING,
    UPDATE,
    Alert,
    Event,
    event_id,
    event_key,
    evidence_key,
    frame_field,
    parse_frame_field,
    pcm16,
    pcm_wav,
    stream_key,
)
from streaming.stage import Counts
from streaming.windowing import SECOND, WindowingConfig

from .conftest import wait_for

RATE = 48_000
CHUNK = 960  # 20 ms
IMU_RATE, IMU_CHUNK = 800, 40


def mic(device: str, k: int, samples: np.ndarray, start_ns: int = 0) -> SensorMessage:
    """Chunk k of `samples` (20 ms each) as the mic message ingest would pass on."""
    chunk = samples[k * CHUNK : (k + 1) * CHUNK].reshape(-1, 1)
    dtype = "int16" if chunk.dtype == np.int16 else "float32"
    return SensorMessage(
        device, "mic", k, start_ns + k * CHUNK * SECOND // RATE, chunk, rate=RATE, channels=1, dtype=dtype
    )


def frame(device: str, k: int, t_ns: int, jpeg: bytes) -> SensorMessage:
    return SensorMessage(device, "camera", k, t_ns, np.frombuffer(jpeg, np.uint8), encoding="jpeg")


def jpegs(n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [encode_jpeg(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), 80).tobytes() for _ in range(n)]


class Counter:
    """Counts from several threads (StageMetrics' job in the stage)."""

    def __init__(self):
        self.counts = Counts()
        self._lock = threading.Lock()

    def __call__(self, event: str, label: str = "", n: int = 1) -> None:
        with self._lock:
            self.counts.add(event, label, n)

    def get(self, event: str, label: str | None = None) -> int:
        with self._lock:
            return self.counts.get(event, label)


# ----- the raw buffer ----------------------------------------------------------------------------------------


def test_the_buffer_keeps_buffer_s_of_device_time_and_knows_what_aged_out():
    counts = Counter()
    buffer = RawBuffer(EvidenceSettings(buffer_s=3.0), counts)
    samples = np.arange(10 * RATE, dtype=np.int16)
    for k in range(500):  # 10 s
        buffer.add(mic("d", k, samples))
    kept, gone = buffer.take("d", "mic", 0, 20 * SECOND)
    assert kept[0].t_ns == 7 * SECOND and kept[-1].end_ns() == 10 * SECOND  # the last 3 s, no more, no less
    assert gone  # what was before 7 s is no longer buffered
    assert buffer.take("d", "mic", 7 * SECOND, 8 * SECOND) == (kept[:50], False)
    assert buffer.take("other", "mic", 0, SECOND) == ([], False)  # not a device of this buffer: nothing, no loss
    assert counts.get("evidence_evicted") == 0  # ageing out is what the buffer is for, not a drop
    # the buffer holds copies: the received message's memory (Ray's) can go
    first = kept[0].payload
    assert not np.shares_memory(first, samples) and first[0, 0] == samples[7 * RATE]


def test_the_byte_bound_cuts_the_device_s_oldest_messages_and_counts_them():
    chunk_bytes = CHUNK * 2 + ITEM_OVERHEAD_BYTES
    image = jpegs(1, 0)[0]
    counts = Counter()
    buffer = RawBuffer(EvidenceSettings(buffer_bytes=100 * chunk_bytes), counts)
    samples = np.zeros(10 * RATE, np.int16)
    for k in range(500):
        buffer.add(mic("d", k, samples))
        if k % 50 == 25:  # a frame each second, at k * 20 ms + 0.5 s
            buffer.add(frame("d", k, k * CHUNK * SECOND // RATE, image))
    frame_bytes = len(image) + ITEM_OVERHEAD_BYTES
    assert buffer.nbytes() <= 100 * chunk_bytes
    chunks, chunks_gone = buffer.take("d", "mic", 0, 20 * SECOND)
    frames, frames_gone = buffer.take("d", "camera", 0, 20 * SECOND)
    assert chunks_gone and frames_gone
    assert buffer.nbytes() == len(chunks) * chunk_bytes + len(frames) * frame_bytes
    assert counts.get("evidence_evicted", "d") == 500 + 10 - len(chunks) - len(frames)  # every cut counted
    assert chunks[-1].end_ns() == 10 * SECOND and [f.t_ns for f in frames][-1] == 9_500_000_000  # the newest stay
    assert all(f.t_ns >= chunks[0].t_ns - 20_000_000 for f in frames)  # the oldest went first, whatever the sensor


def test_the_device_bound_evicts_the_least_recently_seen_device_and_counts_its_messages():
    counts = Counter()
    buffer = RawBuffer(EvidenceSettings(max_devices=2), counts)
    samples = np.zeros(RATE, np.int16)
    for k in range(3):
        buffer.add(mic("a", k, samples))
    for k in range(5):
        buffer.add(mic("b", k, samples))
    buffer.add(mic("a", 3, samples))  # a is seen again: b is now the least recent
    buffer.add(mic("c", 0, samples))
    assert buffer.sensors("b") == [] and buffer.sensors("a") == ["mic"] and buffer.sensors("c") == ["mic"]
    assert counts.counts.labels("evidence_evicted") == {"b": 5}


def test_a_new_session_of_a_sensor_starts_its_buffer_afresh():
    buffer = RawBuffer(EvidenceSettings(), Counter())
    samples = np.zeros(RATE, np.int16)
    for k in range(10):
        buffer.add(mic("d", k, samples, start_ns=100 * SECOND), epoch=0)
    for k in range(3):  # the device restarted: its clock begins again
        buffer.add(mic("d", k, samples), epoch=1)
    kept, gone = buffer.take("d", "mic", 0, 200 * SECOND)
    assert [m.t_ns for m in kept] == [0, 20_000_000, 40_000_000] and not gone


# ----- encodings and settings ----------------------------------------------------------------------------------


def test_audio_becomes_int16_pcm_and_a_wav_and_frames_are_named_by_time():
    assert pcm16(np.array([[1234], [-5]], np.int16)).tolist() == [[1234], [-5]]  # int16 as it came
    floats = np.array([[0.5], [-1.0], [1.0], [2.0], [-7.0]], np.float32)
    assert pcm16(floats).tolist() == [[16384], [-32767], [32767], [32767], [-32767]]  # scaled, clipped
    pcm = np.arange(-300, 300, dtype="<i2").reshape(-1, 2)  # stereo, interleaved
    with wave.open(io.BytesIO(pcm_wav(pcm.tobytes(), 16_000, 2))) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (2, 2, 16_000, 300)
        assert np.frombuffer(w.readframes(300), "<i2").reshape(-1, 2).tolist() == pcm.tolist()
    assert frame_field("camera", 1500, "jpeg") == "frame:camera:1500.jpg"
    assert parse_frame_field(frame_field("depth", 7, None)) == ("depth", 7, "npy")
    assert parse_frame_field(b"audio.pcm") is None and parse_frame_field("frame:camera:x.jpg") is None


def test_settings_out_of_range_are_refused_in_one_line():
    with pytest.raises(ValueError, match="buffer_s must be above 0"):
        EvidenceSettings(buffer_s=0)
    assert EvidenceSettings(preroll_s=0).preroll_s == 0
    with pytest.raises(ValueError, match="max_devices must be an integer, got 2.5"):
        EvidenceSettings(max_devices=2.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"\[evidence\]: evidence_max_bytes must be an integer"):
        PipelineConfig.from_dict({"evidence": {"evidence_max_bytes": "8M"}})
    with pytest.raises(ConfigError, match="did you mean 'buffer_s'"):
        PipelineConfig.from_dict({"evidence": {"buffer_secs": 10}})
    assert PipelineConfig.from_dict({"evidence": {"buffer_s": 10}}).evidence.buffer_s == 10


# ----- the writer, against a real redis-server -----------------------------------------------------------------


def emit(client: redis.Redis, alert: Alert) -> str:
    """What the matcher's EMIT_ALERT does: XADD the entry, PUBLISH it as JSON with its id."""
    entry_id = client.xadd(ALERTS_STREAM, alert.fields()).decode()
    client.publish(ALERTS_CHANNEL, json.dumps({"id": entry_id, **alert.fields()}))
    return entry_id


def start_event(client: redis.Redis, device: str, query: str, t0: int, t1: int) -> Alert:
    """An open event's record (as the matcher writes it) and the `start` entry of its first window [t0, t1)."""
    source, source_id = stream_key(device, "audio"), f"{t0 // SECOND}-0"
    event = event_id(query, source, source_id)
    record = Event(event, "query", device, query, "a test signal", "audio", "tiny", source, t0, t1, 0.9, source_id, 1)
    client.hset(event_key(event), mapping=record.encode())
    client.expire(event_key(event), 3600)
    return Alert(
        device,
        query,
        "a test signal",
        "audio",
        0.9,
        0.5,
        t0,
        t1,
        source,
        source_id,
        "tiny",
        time.time_ns(),
        event=event,
    )


def later(alert: Alert, state: str, t0: int, t1: int) -> Alert:
    return Alert(**{**alert.__dict__, "state": state, "t0": t0, "t1": t1, "id": ""})


def subscribers(client: redis.Redis) -> int:
    return client.pubsub_numsub(ALERTS_CHANNEL)[0][1]


@pytest.fixture
def writer_for(redis_server):
    writers = []

    def make(settings: EvidenceSettings) -> tuple[EvidenceWriter, Counter]:
        counts = Counter()
        writers.append(EvidenceWriter(settings, redis_server.url, counts))
        wait_for(lambda: subscribers(redis.Redis.from_url(redis_server.url)) >= 1, 10, "the writer to subscribe")
        return writers[-1], counts

    yield make
    for writer in writers:
        writer.stop()


def fill(buffer: RawBuffer, device: str, seconds: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    """Float32 audio, IMU rows and a JPEG frame each second (at k + 0.5 s) of `seconds` from device time 0."""
    rng = np.random.default_rng(seed)
    audio = rng.uniform(-1.2, 1.2, seconds * RATE).astype(np.float32)  # some beyond full scale: clipped
    imu = rng.normal(0, 1, (seconds * IMU_RATE, 6)).astype(np.float32)
    images = jpegs(seconds, seed)
    for k in range(seconds * 50):
        buffer.add(mic(device, k, audio))
    for k in range(seconds * IMU_RATE // IMU_CHUNK):
        rows = imu[k * IMU_CHUNK : (k + 1) * IMU_CHUNK]
        buffer.add(SensorMessage(device, "imu", k, k * IMU_CHUNK * SECOND // IMU_RATE, rows, rate=IMU_RATE))
    for k, image in enumerate(images):
        buffer.add(frame(device, k, k * SECOND + SECOND // 2, image))
    return audio, imu, images


def test_the_writer_appends_each_state_change_and_points_the_event_at_its_evidence(writer_for, redis_server):
    client = redis.Redis.from_url(redis_server.url)
    writer, counts = writer_for(EvidenceSettings(preroll_s=1.0, evidence_ttl_s=600))
    audio, imu, images = fill(writer.buffer, "w-1", 8, seed=1)
    start = start_event(client, "w-1", "q-writer", 2 * SECOND, 4 * SECOND)
    key = evidence_key(start.event)
    emit(client, start)
    wait_for(lambda: client.exists(key), 10, "the start's evidence")
    fields = client.hgetall(key)
    assert int(fields[AUDIO_T0.encode()]) == SECOND  # the pre-roll: t0 - 1 s
    assert np.frombuffer(fields[AUDIO_PCM.encode()], "<i2").tolist() == pcm16(audio[RATE : 4 * RATE]).tolist()
    emit(client, later(start, UPDATE, 3 * SECOND, 5 * SECOND))
    emit(client, later(start, END, 2 * SECOND, 6_500_000_000))
    wait_for(lambda: counts.get("evidence_written", "w-1") == 3, 10, "the update's and the end's evidence")
    fields = {k.decode(): v for k, v in client.hgetall(key).items()}
    # appended without a gap or an overlap: exactly [t0 - pre-roll, the end's t1)
    pcm = np.frombuffer(fields[AUDIO_PCM], "<i2")
    assert pcm.tolist() == pcm16(audio[RATE : 6 * RATE + RATE // 2]).ravel().tolist()
    assert (int(fields[AUDIO_RATE]), int(fields[AUDIO_CHANNELS])) == (RATE, 1)
    lines = fields[IMU_CSV].decode().splitlines()
    assert lines[0] == ",".join(("t_ns", *IMU_COLUMNS))
    rows = np.array([[float(v) for v in line.split(",")] for line in lines[1:]])
    first, last = IMU_RATE, 6 * IMU_RATE + IMU_RATE // 2
    assert rows[:, 0].tolist() == [i * SECOND // IMU_RATE for i in range(first, last)]
    assert np.array_equal(rows[:, 1:].astype(np.float32), imu[first:last])  # float32 values, exactly
    frames = {name: value for name, value in fields.items() if parse_frame_field(name)}
    assert frames == {frame_field("camera", k * SECOND + SECOND // 2, "jpeg"): images[k] for k in range(1, 6)}
    assert MISSING not in fields and counts.get("evidence_missing") == 0
    assert 0 < client.ttl(key) <= 600
    assert client.hget(event_key(start.event), EVIDENCE_FIELD).decode() == key


def test_the_writer_catches_up_on_alerts_published_while_its_channel_was_lost(writer_for, redis_server):
    client = redis.Redis.from_url(redis_server.url)
    writer, counts = writer_for(EvidenceSettings(preroll_s=0.0))
    audio, _, _ = fill(writer.buffer, "w-2", 6, seed=2)
    first = start_event(client, "w-2", "q-first", SECOND, 2 * SECOND)
    emit(client, first)
    wait_for(lambda: client.exists(evidence_key(first.event)), 10, "the first event's evidence")
    second = start_event(client, "w-2", "q-second", 3 * SECOND, 4 * SECOND)
    pipe = client.pipeline(transaction=True)  # the writer's channel is cut, and the alert published, at once
    pipe.client_kill_filter(_type="pubsub")
    pipe.xadd(ALERTS_STREAM, second.fields())
    pipe.publish(ALERTS_CHANNEL, json.dumps(second.fields()))
    assert pipe.execute()[2] == 0  # nobody heard it
    key = evidence_key(second.event)
    wait_for(lambda: client.exists(key), 20, "the missed event's evidence, read from the alerts stream")
    pcm = np.frombuffer(client.hget(key, AUDIO_PCM), "<i2")
    assert pcm.tolist() == pcm16(audio[3 * RATE : 4 * RATE]).ravel().tolist()
    assert counts.get("evidence_redis_error") >= 1  # the lost channel, counted


def test_an_event_stops_growing_at_evidence_max_bytes_and_bad_alerts_are_counted(writer_for, redis_server):
    client = redis.Redis.from_url(redis_server.url)
    writer, counts = writer_for(EvidenceSettings(preroll_s=0.0, evidence_max_bytes=int(3.5 * RATE * 2)))
    samples = np.zeros(8 * RATE, np.int16)
    for k in range(8 * 50):
        writer.buffer.add(mic("w-3", k, samples))
    start = start_event(client, "w-3", "q-big", 0, 3 * SECOND)  # 3 s of audio: 288,000 bytes, within the bound
    emit(client, start)
    emit(client, later(start, END, 0, 6 * SECOND))  # 3 s more: beyond it
    other = start_event(client, "elsewhere", "q-other", 0, SECOND)  # a device another windowing actor serves
    emit(client, other)
    client.publish(ALERTS_CHANNEL, b"not json")
    client.publish(ALERTS_CHANNEL, json.dumps({**start.fields(), "id": "9-0", "state": "maybe"}))
    wait_for(lambda: counts.get("evidence_rejected") == 2, 10, "the bad alerts to be counted")
    wait_for(lambda: counts.get("evidence_written") == 1, 10, "the start's evidence")
    assert counts.get("evidence_truncated", "w-3") == 1
    assert client.hstrlen(evidence_key(start.event), AUDIO_PCM) == 3 * RATE * 2  # nothing added beyond
    assert not client.exists(evidence_key(other.event))


# ----- end to end: a device, the pipeline, the evidence ---------------------------------------------------------

START_NS = 1_000 * SECOND
SECONDS = 14
FPS = 10
DEVICE = "evidence-1"
BUFFER_S, PREROLL_S = 8.0, 2.0


def test_the_pipeline_keeps_what_the_device_sent_around_an_event(ray_local, redis_server):
    client = redis.Redis.from_url(redis_server.url)
    rng = np.random.default_rng(12)
    audio = rng.integers(-20_000, 20_000, SECONDS * RATE, dtype=np.int16)  # seeded noise
    images = jpegs(SECONDS * FPS, seed=12)
    evidence = EvidenceSettings(buffer_s=BUFFER_S, preroll_s=PREROLL_S, evidence_ttl_s=3600)
    config = PipelineConfig(ingest=["tcp://127.0.0.1:*"], model="tiny", max_wait_ms=20, matchers=0, evidence=evidence)
    pipeline = Pipeline(config, redis_server.url, "tiny")
    try:
        (endpoint,) = pipeline.start()
        messages = [(START_NS + k * CHUNK * SECOND // RATE, "mic", k) for k in range(SECONDS * 50)]
        messages += [(START_NS + k * SECOND // FPS, "camera", k) for k in range(SECONDS * FPS)]
        with DevicePublisher(endpoint, DEVICE, block=True, linger_ms=-1) as device:
            for t_ns, sensor, k in sorted(messages):
                if sensor == "mic":
                    device.send("mic", t_ns, audio[k * CHUNK : (k + 1) * CHUNK], rate=RATE)
                else:
                    device.send("camera", t_ns, images[k], encoding="jpeg")
        wait_for(lambda: Counts.of(*pipeline.stats()["window"]).get("in") == len(messages), 60, "windowing to take all")
        wait_for(lambda: subscribers(client) >= 1, 30, "the evidence writer to subscribe")

        # an event from 1009 s: its start, then its end at 1013 s; with the pre-roll, [1007 s, 1013 s) is kept
        t0, t1, end_t1 = START_NS + 9 * SECOND, START_NS + 11 * SECOND, START_NS + 13 * SECOND
        start = start_event(client, DEVICE, "q-e2e", t0, t1)
        key = evidence_key(start.event)
        emit(client, start)
        wait_for(lambda: client.hexists(key, AUDIO_PCM), 30, "the start's evidence")
        first = int(client.hget(key, AUDIO_T0))
        assert first == t0 - int(PREROLL_S * SECOND)
        emit(client, later(start, END, t0, end_t1))
        want = audio[(first - START_NS) * RATE // SECOND : (end_t1 - START_NS) * RATE // SECOND]
        wait_for(lambda: client.hstrlen(key, AUDIO_PCM) == 2 * len(want), 30, "the end's evidence")
        fields = {k.decode(): v for k, v in client.hgetall(key).items()}
        pcm = np.frombuffer(fields[AUDIO_PCM], "<i2")
        assert np.corrcoef(pcm, want)[0, 1] > 0.999 and np.array_equal(pcm, want)  # sample for sample
        # the frames its vision windows sampled (the only ones ingest forwards with pixels), as sent
        camera = WindowingConfig().frame_sampling()["camera"]
        sampled = {
            START_NS + k * SECOND // FPS: images[k]
            for k in range(SECONDS * FPS)
            if camera.takes(START_NS + (k - 1) * SECOND // FPS if k else None, START_NS + k * SECOND // FPS)
        }
        frames = {parse_frame_field(name): value for name, value in fields.items() if parse_frame_field(name)}
        assert frames == {("camera", t, "jpg"): jpeg for t, jpeg in sampled.items() if first <= t < end_t1}
        assert len(frames) == 6 and MISSING not in fields  # 1007.5 ... 1012.5 s
        assert 0 < client.ttl(key) <= 3600
        assert client.hget(event_key(start.event), EVIDENCE_FIELD).decode() == key

        # an event from 1001 s: only the last 8 s are buffered, so its media is listed as missing, not an error
        early = start_event(client, DEVICE, "q-early", START_NS + SECOND, START_NS + 3 * SECOND)
        emit(client, early)
        wait_for(lambda: client.hexists(evidence_key(early.event), MISSING), 30, "the early event's evidence")
        assert client.hgetall(evidence_key(early.event)) == {MISSING.encode(): b"audio,camera"}
        window = Counts.of(*pipeline.stats()["window"])
        assert window.labels("evidence_missing") == {DEVICE: 2}
        assert window.get("evidence_written", DEVICE) == 3 and window.get("evidence_error") == 0
    finally:
        pipeline.drain()
        pipeline.kill()
