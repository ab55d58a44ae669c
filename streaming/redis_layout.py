"""The Redis layout of bindstream (v1): every key and channel name, and how each entry is encoded and decoded.

The one home of the layout; REDIS.md (embedding streams) and ALERTS.md (queries, alert state, alerts)
describe it for clients in any language. It imports neither Ray nor any pipeline stage, so a reader of the
streams needs only redis-py and numpy.

    STREAM bindstream:emb:{device}:{modality}     t0 t1 epoch model dtype dim emb [modalities]
    ZSET   bindstream:embidx:{device}:{modality}  the publisher's write index (window keys of the newest entries)
    HASH   bindstream:query:{id}                  text modality device emb dim model source created
                                                  threshold k n cooldown_s hysteresis
    SET    bindstream:queries                     the ids of the active queries
    INT    bindstream:queries:version             bumped on every change of queries or backgrounds
    PUB    bindstream:queries                     "{add|rm|update} {id}" on every change of a query
    HASH   bindstream:background:{model}:{modality}
                                                  prompts emb dim count logit_scale exclude_cos created
    HASH   bindstream:alertstate:{group}:{stream} last_id, and per query id its decision state
    STRING bindstream:alerted:{query}:{stream}:{entry}  an alert was emitted for this entry (dedup)
    STREAM bindstream:alerts                      one entry per event state change (start, update, end); also
                                                  PUBLISHed as JSON on channel bindstream:alerts
    HASH   bindstream:event:{id}                  one event: what fired, when, its peak, its state, its review
    ZSET   bindstream:events                      event ids by their start (wall clock, ms): listing by time
    HASH   bindstream:evidence:{event}            what the device sent around the event (audio, frames, IMU rows)
    STREAM bindstream:outbox:{sink}               notifications waiting for one sink (at-least-once delivery)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from .alerts.records import Background, Decision, Query, QueryError
from .records import Embedding, text

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
LAST_ID_FIELD = "last_id"  # in a stream's state hash; every other field is a query id
EMB_DTYPE = "float32"  # the one dtype of v1; stored little-endian ("<f4")

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


def dedup_key(query_id: str, stream: str, entry_id: str) -> str:
    return f"{DEDUP_PREFIX}:{query_id}:{stream}:{entry_id}"


def event_key(event_id: str) -> str:
    return f"{EVENT_PREFIX}:{event_id}"


def evidence_key(event_id: str) -> str:
    return f"{EVIDENCE_PREFIX}:{event_id}"


def outbox_key(sink_id: str) -> str:
    return f"{OUTBOX_PREFIX}:{sink_id}"


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
        **encode_decision(q.decision),
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
            source=text(f["source"]),
            id=query_id,
            created=float(f["created"]),
        )
    except PARSE_ERRORS as err:
        raise QueryError(f"query {query_id!r} is malformed: {err}") from err


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
