"""The Redis layout of bindstream (v1): every key and channel name, and how each entry is encoded and decoded.

The one home of the layout; REDIS.md (embedding streams) and ALERTS.md (queries, alert state, alerts)
describe it for clients in any language. It imports neither Ray nor any pipeline stage, so a reader of the
streams needs only redis-py and numpy.

    STREAM bindstream:emb:{device}:{modality}     t0 t1 epoch model dtype dim emb [modalities] [dbfs]
    ZSET   bindstream:embidx:{device}:{modality}  the publisher's write index (window keys of the newest entries)
    HASH   bindstream:query:{id}                  text modality device emb dim model source created
                                                  threshold k n cooldown_s hysteresis notify min_dbfs
                                                  example_min_cos example_z example_min_sd example_memory
                                                  example_warmup
    SET    bindstream:queries                     the ids of the active queries
    INT    bindstream:queries:version             bumped on every change of queries or backgrounds
    PUB    bindstream:queries                     "{add|rm|update} {id}" on every change of a query
    HASH   bindstream:background:{model}:{modality}
                                                  prompts emb dim count logit_scale exclude_cos created
    HASH   bindstream:alertstate:{group}:{stream} last_id, and per query id its decision state (and open event)
    STRING bindstream:alerted:{query}:{stream}:{entry}[:{state}]  an alerts entry was emitted for this entry
                                                  (dedup; starts without the suffix, as before events existed)
    HASH   bindstream:health:{group}              per silent stream of the group's shards: its open health event
    STREAM bindstream:alerts                      one entry per event state change (start, update, end); also
                                                  PUBLISHed as JSON on channel bindstream:alerts
    HASH   bindstream:event:{id}                  one event (class Event): id kind device query query_text modality
                                                  model source start_ns end_ns peak peak_source_id windows state
                                                  detected_ns ended_ns review reviewed_ns notify
    ZSET   bindstream:events                      event ids by their start (wall clock, ms): listing by time
    HASH   bindstream:evidence:{event}            what the device sent around the event (audio, frames, IMU rows)
    STREAM bindstream:outbox:{sink}               notifications waiting for one sink (at-least-once delivery)
    HASH   bindstream:sinks                       sink id -> its URL, for every sink that was ever queued to
"""

from __future__ import annotations

import hashlib
import io
import math
import time
import wave
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from .alerts.records import Background, Calibration, Decision, Query, QueryError
from .records import FRAME_SENSORS, SENSOR_MODALITY, Embedding, text

EMB_PREFIX = "bindstream:emb"
INDEX_PREFIX = "bindstream:embidx"
QUERY_PREFIX = "bindstream:query"
QUERY_SET = "bindstream:queries"
QUERY_CHANNEL = "bindstream:queries"
QUERY_VERSION = "bindstream:queries:version"
BACKGROUND_PREFIX = "bindstream:background"
STATE_PREFIX = "bindstream:alertstate"
DEDUP_PREFIX = "bindstream:alerted"
ALERTS_STREAM = "bindstream:alerts"
ALERTS_CHANNEL = "bindstream:alerts"
EVENT_PREFIX = "bindstream:event"
EVENTS_INDEX = "bindstream:events"
EVIDENCE_PREFIX = "bindstream:evidence"
OUTBOX_PREFIX = "bindstream:outbox"
HEALTH_PREFIX = "bindstream:health"
SINKS = "bindstream:sinks"
NOTIFY_FIELD = "notify"  # of a query's hash and an event's: its sink URLs, one a line (absent or "": none)
SINK_ID_CHARS = 12  # hex characters of a sink id: 48 bits, no collision among any realistic number of URLs
LAST_ID_FIELD = "last_id"  # in a stream's state hash; every other field is a query id
EMB_DTYPE = "float32"  # the one dtype of v1; stored little-endian ("<f4")
CALIBRATION_PREFIX = "example_"  # a query hash's calibration fields: example_min_cos, example_z, ...

# What a stored hash that does not parse raises (a missing field, text where a number belongs, dim 0,
# bytes that are not UTF-8); each is reported as QueryError for that record only.
PARSE_ERRORS = (KeyError, ValueError, TypeError, IndexError, ArithmeticError)


# ----- keys ----------------------------------------------------------------------------------------------


def stream_key(device: str, modality: str) -> str:
    """The embedding stream of one device and modality (globs give a SCAN pattern)."""
    return f"{EMB_PREFIX}:{device}:{modality}"


def index_key(device: str, modality: str) -> str:
    return f"{INDEX_PREFIX}:{device}:{modality}"


def query_key(query_id: str) -> str:
    return f"{QUERY_PREFIX}:{query_id}"


def background_key(model: str, modality: str) -> str:
    return f"{BACKGROUND_PREFIX}:{model}:{modality}"


def state_key(group: str, stream: str) -> str:
    return f"{STATE_PREFIX}:{group}:{stream}"


def dedup_key(query_id: str, stream: str, entry_id: str, state: str) -> str:
    """Marks the alerts entry of one state change made by one window; a start keeps the key of the versions
    before events, so that an upgrade does not repeat an alert."""
    suffix = "" if state == START else f":{state}"
    return f"{DEDUP_PREFIX}:{query_id}:{stream}:{entry_id}{suffix}"


def health_key(group: str) -> str:
    """The open health events of a matcher group's streams: field stream key, value `encode_silence`."""
    return f"{HEALTH_PREFIX}:{group}"


def event_key(event_id: str) -> str:
    return f"{EVENT_PREFIX}:{event_id}"


def evidence_key(event_id: str) -> str:
    return f"{EVIDENCE_PREFIX}:{event_id}"


def outbox_key(sink_id: str) -> str:
    return f"{OUTBOX_PREFIX}:{sink_id}"


def sink_id(url: str) -> str:
    """A notification sink's id: a short hash of its URL (which may hold a token that no key should show)."""
    return hashlib.sha256(url.encode()).hexdigest()[:SINK_ID_CHARS]


class BadRecord(ValueError):
    """A key or stream entry that does not decode as documented in REDIS.md."""


def parse_key(key: str) -> tuple[str, str]:
    """(device, modality) of a `bindstream:emb:{device}:{modality}` key; BadRecord for any other key."""
    prefix, _, rest = key.partition(f"{EMB_PREFIX}:")
    device, _, modality = rest.rpartition(":")
    if prefix or not device or not modality:
        raise BadRecord(f"not an embedding stream key: {key!r}")
    return device, modality


def id_tuple(entry_id: str) -> tuple[int, int]:
    """A stream id as (ms, seq); ValueError unless it is one."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def now_id() -> str:
    """A stream id at the current time: a consumer group created there skips everything older."""
    return f"{time.time_ns() // 1_000_000}-0"


# ----- embedding entries ---------------------------------------------------------------------------------


@dataclass
class EmbeddingRecord:
    """One entry of an embedding stream, decoded."""

    stream: str
    id: str
    device: str
    modality: str
    t0: int
    t1: int
    model: str
    emb: np.ndarray  # (dim,) float32, unit norm
    modalities: tuple[str, ...] = ()  # fused records: the modalities summed
    epoch: int = 0  # the device's session (entries written before the field existed: 0)
    dbfs: float | None = None  # audio entries: the window's RMS loudness in dBFS (entries without the field: None)


def encode_embedding(e: Embedding) -> dict:
    """The fields of an embedding's stream entry."""
    fields = {
        "t0": e.t0,
        "t1": e.t1,
        "epoch": e.epoch,
        "model": e.model,
        "dtype": EMB_DTYPE,
        "dim": e.emb.shape[0],
        "emb": np.ascontiguousarray(e.emb, dtype="<f4").tobytes(),
    }
    if e.members:
        fields["modalities"] = ",".join(e.members)
    if e.dbfs is not None:
        fields["dbfs"] = round(e.dbfs, 2)
    return fields


def decode_embedding(stream: str, entry_id, fields: dict) -> EmbeddingRecord:
    """Decode one stream entry (fields as bytes or str keys); BadRecord if it is malformed."""
    f = {text(k): v for k, v in fields.items()}
    try:
        dtype = text(f["dtype"])
        dim = int(f["dim"])
        if dtype != EMB_DTYPE:
            raise BadRecord(f"{stream} {entry_id}: dtype {dtype!r}, expected {EMB_DTYPE}")
        if len(f["emb"]) != 4 * dim:
            raise BadRecord(f"{stream} {entry_id}: emb has {len(f['emb'])} bytes, expected {4 * dim}")
        device, modality = parse_key(stream)
        dbfs = float(f["dbfs"]) if "dbfs" in f else None
        if dbfs is not None and not math.isfinite(dbfs):
            raise BadRecord(f"{stream} {entry_id}: dbfs {dbfs} is not a loudness")
        return EmbeddingRecord(
            stream=stream,
            id=text(entry_id),
            device=device,
            modality=modality,
            t0=int(f["t0"]),
            t1=int(f["t1"]),
            model=text(f["model"]),
            emb=np.frombuffer(f["emb"], dtype="<f4").astype(np.float32),
            modalities=tuple(text(f["modalities"]).split(",")) if "modalities" in f else (),
            epoch=int(f.get("epoch", 0)),
            dbfs=dbfs,
        )
    except (KeyError, ValueError, TypeError) as err:
        if isinstance(err, BadRecord):
            raise
        raise BadRecord(f"{stream} {entry_id}: {err!r}") from err


# ----- queries and backgrounds ---------------------------------------------------------------------------


def _vectors(raw: bytes, dim: int, count: int, what: str) -> np.ndarray:
    """(count, dim) float32 from `count * dim` little-endian floats; QueryError for any other size."""
    if dim < 1 or len(raw) != 4 * dim * count:
        raise QueryError(f"{what}: {len(raw)} bytes of emb are not {count} vector(s) of dim {dim}")
    return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(count, dim)


def encode_decision(d: Decision) -> dict:
    return {"threshold": d.threshold, "k": d.k, "n": d.n, "cooldown_s": d.cooldown_s, "hysteresis": d.hysteresis}


def encode_query(q: Query) -> dict:
    """The fields of a query's hash."""
    return {
        "text": q.text,
        "modality": q.modality,
        "device": q.device,
        "model": q.model,
        "source": q.source,
        "emb": np.ascontiguousarray(q.emb, dtype="<f4").tobytes(),
        "dim": q.emb.shape[0],
        "created": q.created,
        NOTIFY_FIELD: encode_notify(q.notify),
        **encode_decision(q.decision),
        **{CALIBRATION_PREFIX + k: v for k, v in asdict(q.calibration).items()},
        "min_dbfs": "" if q.min_dbfs is None else q.min_dbfs,
    }


def decode_query(query_id: str, raw: dict) -> Query:
    """The query a hash holds, checked as `alert add` checks it; QueryError if it is missing or malformed."""
    f = {text(k): v for k, v in raw.items()}
    if not f:
        raise QueryError(f"no query {query_id!r}")
    try:
        decision = Decision(
            float(f["threshold"]), int(f["k"]), int(f["n"]), float(f["cooldown_s"]), float(f["hysteresis"])
        )
        return Query(
            text=text(f["text"]),
            modality=text(f["modality"]),
            model=text(f["model"]),
            emb=_vectors(f["emb"], int(f["dim"]), 1, query_id)[0],
            device=text(f["device"]),
            decision=decision,
            calibration=decode_calibration(f),
            min_dbfs=float(f["min_dbfs"]) if text(f.get("min_dbfs", "")) else None,
            source=text(f["source"]),
            id=query_id,
            created=float(f["created"]),
            notify=decode_notify(f.get(NOTIFY_FIELD, b"")),
        )
    except PARSE_ERRORS as err:
        raise QueryError(f"query {query_id!r} is malformed: {err}") from err


def decode_calibration(f: dict) -> Calibration:
    """A query hash's calibration; fields it lacks (hashes written before they existed) take the defaults."""
    kinds = {CALIBRATION_PREFIX + x.name: (x.name, int if x.type == "int" else float) for x in fields(Calibration)}
    values: dict[str, Any] = {name: kind(f[key]) for key, (name, kind) in kinds.items() if key in f}
    return Calibration(**values)


def encode_notify(urls) -> str:
    return "\n".join(urls)


def decode_notify(raw) -> tuple[str, ...]:
    """The sink URLs of a `notify` field (None or empty: none); hashes written before it existed have none."""
    return tuple(url for url in text(raw or b"").split("\n") if url)


def encode_background(bg: Background) -> dict:
    return {
        "prompts": "\n".join(bg.prompts),
        "emb": np.ascontiguousarray(bg.emb, dtype="<f4").tobytes(),
        "dim": bg.emb.shape[1],
        "count": len(bg.prompts),
        "logit_scale": bg.logit_scale,
        "exclude_cos": bg.exclude_cos,
        "created": time.time(),
    }


def decode_background(model: str, modality: str, raw: dict) -> Background | None:
    """The background a hash holds (None for an empty hash); QueryError if it is malformed."""
    f = {text(k): v for k, v in raw.items()}
    if not f:
        return None
    key = background_key(model, modality)
    try:
        prompts = tuple(text(f["prompts"]).split("\n"))
        return Background(
            model,
            modality,
            prompts,
            _vectors(f["emb"], int(f["dim"]), len(prompts), key),
            float(f["logit_scale"]),
            float(f["exclude_cos"]),
        )
    except PARSE_ERRORS as err:
        raise QueryError(f"{key} is malformed: {err}") from err


# ----- alerts --------------------------------------------------------------------------------------------


START, UPDATE, END = "start", "update", "end"  # an event's state changes, one alerts entry each
QUERY_EVENT, HEALTH_EVENT = "query", "health"  # a standing query fired; a device's sensor went silent (or back)


@dataclass
class Alert:
    """One entry of `bindstream:alerts`: an event opened (`start`: the window that fired), reached a new peak
    (`update`: that window), or closed (`end`: t0..t1 the whole event, score its peak). Entries written
    before events existed decode as `start` entries without an event id."""

    device: str
    query: str  # query id
    query_text: str
    modality: str
    score: float  # calibrated score (softmax share) of the window that fired
    threshold: float
    t0: int  # the window's bounds, device clock, ns
    t1: int
    source: str  # embedding stream key
    source_id: str  # entry id in it
    model: str
    detected_ns: int  # wall clock when the matcher decided
    state: str = START  # START | UPDATE | END
    event: str = ""  # the event's id (bindstream:event:{event})
    kind: str = QUERY_EVENT  # QUERY_EVENT | HEALTH_EVENT
    id: str = ""  # entry id in the alerts stream, once read back

    def fields(self) -> dict[str, str]:
        """The entry's fields (the id is Redis's)."""
        return {k: str(v) for k, v in asdict(self).items() if k != "id"}

    @classmethod
    def from_entry(cls, entry_id, raw: dict) -> Alert:
        """Decode an entry of the alerts stream; unknown fields are ignored (newer writers may add some)."""
        f = {text(k): text(v) for k, v in raw.items()}
        types = {x.name: x.type for x in fields(cls)}
        values: dict[str, Any] = {
            k: (float(v) if types[k] == "float" else int(v) if types[k] == "int" else v)
            for k, v in f.items()
            if k in types
        }
        return cls(**values, id=text(entry_id))


# ----- events --------------------------------------------------------------------------------------------

OPEN, ENDED = "open", "ended"  # an event record's state
REVIEWS = ("none", "confirmed", "false_positive")  # a person's verdict on an event ("none": not reviewed)
CONFIRMED, FALSE_POSITIVE = REVIEWS[1:]  # the verdicts a person gives (`bindstream event ack`, `false-positive`)
HEALTH_QUERY = "health"  # the `query` of health events (query ids are 8 hex characters, never this)
EVENT_ID_CHARS = 16  # hex characters of an event id: 64 bits


def event_id(query_id: str, stream: str, entry_id: str) -> str:
    """An event's id: a hash of its query (HEALTH_QUERY for a health event), its stream and the entry that
    opened it, so that a commit replayed after a failure names the same event."""
    return hashlib.sha256(f"{query_id}\n{stream}\n{entry_id}".encode()).hexdigest()[:EVENT_ID_CHARS]


@dataclass
class Event:
    """One event's record, HASH bindstream:event:{id}: a query's event (a window fired; it ends when the query
    re-arms or after the matcher's max_event_s) or a health event (a stream fell silent; it ends when its
    entries flow again). Device times are the device clock's, wall times the matcher's."""

    id: str
    kind: str  # QUERY_EVENT | HEALTH_EVENT
    device: str
    query: str  # the query id; HEALTH_QUERY for health events
    query_text: str
    modality: str
    model: str
    source: str  # embedding stream key
    start_ns: int  # device time: the opening window's t0 (health: the last window's t1 before the silence)
    end_ns: int  # device time: t1 of the last window at or above threshold (health: t0 of the first one after)
    peak: float  # highest score (health: seconds of silence, by the entry ids)
    peak_source_id: str  # entry id of the peak's window (health: the last entry before the silence)
    windows: int  # windows at or above threshold while open (health: 0)
    state: str = OPEN  # OPEN | ENDED
    detected_ns: int = 0  # wall clock of the start
    ended_ns: int = 0  # wall clock of the end; 0 while open
    review: str = REVIEWS[0]  # one of REVIEWS
    reviewed_ns: int = 0  # wall clock of the last review; 0: none
    notify: tuple[str, ...] = ()  # the query's sink URLs when it started (health events: none)

    def encode(self, names: Sequence[str] | None = None) -> dict[str, str]:
        """The record's fields, or those `names` (a KeyError for a name that is not one)."""
        values = {k: str(v) for k, v in asdict(self).items()} | {NOTIFY_FIELD: encode_notify(self.notify)}
        return values if names is None else {name: values[name] for name in names}

    @classmethod
    def decode(cls, raw: dict) -> Event:
        """The event a hash holds; BadRecord if a field is missing or does not parse, or a state, kind or review
        is not one of the documented values."""
        f = {text(k): text(v) for k, v in raw.items()}
        try:
            values: dict[str, Any] = {}
            for x in fields(cls):
                value = f[x.name]
                values[x.name] = {"int": int, "float": float}.get(str(x.type), str)(value)
            values[NOTIFY_FIELD] = decode_notify(f[NOTIFY_FIELD])
            event = cls(**values)
        except PARSE_ERRORS as err:
            raise BadRecord(f"event record {f.get('id', '?')!r}: {err!r}") from err
        if event.state not in (OPEN, ENDED) or event.kind not in (QUERY_EVENT, HEALTH_EVENT):
            raise BadRecord(f"event record {event.id!r}: state {event.state!r}, kind {event.kind!r}")
        if event.review not in REVIEWS:
            raise BadRecord(f"event record {event.id!r}: review {event.review!r} is not one of {REVIEWS}")
        return event


def encode_silence(last_id: str, start_ns: int) -> str:
    """A field of bindstream:health:{group}: the last entry before the silence, and its window's t1."""
    return f"{last_id} {start_ns}"


def decode_silence(value) -> tuple[str, int]:
    """(last entry id, start_ns) of an `encode_silence` value; ValueError for anything else."""
    last_id, start = text(value).split(" ")
    id_tuple(last_id)
    return last_id, int(start)


# ----- evidence ------------------------------------------------------------------------------------------

# HASH bindstream:evidence:{event}: what the device sent from the event's opening window less the pre-roll to
# its end, written by streaming/evidence.py (ALERTS.md, "Evidence"); its fields:
EVIDENCE_FIELD = "evidence"  # in the event's hash: the key of its evidence hash
AUDIO_PCM = "audio.pcm"  # int16 little-endian, channels interleaved: one timeline from audio_t0_ns (holes silent)
AUDIO_RATE, AUDIO_CHANNELS, AUDIO_T0 = "audio_rate", "audio_channels", "audio_t0_ns"  # Hz, count, device ns
IMU_CSV = "imu.csv"  # a header line, then a row per sample: t_ns,ax,ay,az,gx,gy,gz
MISSING = "missing"  # comma-separated kinds (`evidence_kind`) of which some data was no longer buffered
FRAME_PREFIX = "frame"  # frame:{sensor}:{t_ns}.{ext}: a frame a window sampled
FRAME_EXTENSIONS = {"jpeg": "jpg", "png": "png"}  # the payload as received; raw arrays are stored as .npy
NPY = "npy"
PCM_FULL_SCALE = 32767  # float samples (full scale 1) times this: +1.0 fits int16, as -1.0 does


def evidence_kind(sensor: str) -> str:
    """What `missing` calls a sensor's data: the field it goes to (audio, imu, or the frame sensor's name)."""
    return sensor if sensor in FRAME_SENSORS else SENSOR_MODALITY[sensor]


def frame_field(sensor: str, t_ns: int, encoding: str | None) -> str:
    return f"{FRAME_PREFIX}:{sensor}:{t_ns}.{FRAME_EXTENSIONS.get(encoding or '', NPY)}"


def parse_frame_field(name) -> tuple[str, int, str] | None:
    """(sensor, t_ns, extension) of a frame field; None for any other field."""
    prefix, _, rest = text(name).partition(":")
    sensor, _, stamp = rest.partition(":")
    t_ns, _, ext = stamp.partition(".")
    if prefix != FRAME_PREFIX or not sensor or not t_ns.isdigit() or not ext:
        return None
    return sensor, int(t_ns), ext


def pcm16(samples: np.ndarray) -> np.ndarray:
    """Mic samples as little-endian int16: int16 as they are, float clipped to [-1, 1] and scaled."""
    if samples.dtype != np.int16:
        samples = np.round(np.clip(samples, -1.0, 1.0) * PCM_FULL_SCALE)
    return samples.astype("<i2", copy=False)


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as a .npy file (`np.load(io.BytesIO(value))` reads it back)."""
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def pcm_wav(pcm: bytes, rate: int, channels: int) -> bytes:
    """A 16-bit PCM WAV file of `audio.pcm` (little-endian int16 is WAV's own sample format)."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return out.getvalue()


def evidence_audio_s(size: int, rate: int, channels: int) -> float:
    """Seconds of `size` bytes of an evidence hash's `audio.pcm` at `audio_rate` Hz, `audio_channels` channels;
    ValueError unless they are whole int16 frames at a rate and a channel count above 0."""
    if rate < 1 or channels < 1 or size % (2 * channels):
        raise ValueError(f"{size} bytes are no whole int16 frames of {channels} channel(s) at {rate} Hz")
    return size / (2 * channels * rate)


def evidence_wav(pcm: bytes, rate: int, channels: int) -> tuple[bytes, float]:
    """An evidence hash's audio as a WAV file, and its seconds; ValueError as `evidence_audio_s`."""
    seconds = evidence_audio_s(len(pcm), rate, channels)
    return pcm_wav(pcm, rate, channels), seconds


# ----- notification outboxes -----------------------------------------------------------------------------

ALERT_ID_FIELD = "alert_id"  # in an outbox entry: the id of the alerts entry it copies (its own id differs)


def encode_outbox(alert: Alert) -> dict[str, str]:
    """The fields of an outbox entry: the alerts entry's, and its id."""
    return {**alert.fields(), ALERT_ID_FIELD: alert.id}


def decode_outbox(raw: dict) -> Alert:
    """The alert an outbox entry carries, its `id` the alerts entry's; BadRecord if it does not decode."""
    f = {text(k): v for k, v in raw.items()}
    try:
        return Alert.from_entry(f[ALERT_ID_FIELD], f)
    except PARSE_ERRORS as err:
        raise BadRecord(f"outbox entry: {err!r}") from err
