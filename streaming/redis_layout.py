"""The Redis layout of bindstream (v2): every key and channel name, and how each entry is encoded and decoded.

The one home of the layout; REDIS.md (embedding streams) and ALERTS.md (queries, alert state, alerts)
describe it for clients in any language. It imports neither Ray nor any pipeline stage, so a reader of the
streams needs only redis-py and numpy.

Braces are part of the keys: a Redis Cluster places a key by the text between its first `{` and `}` (its hash
tag), so every key of one device (`{<device>}`) lives in one hash slot, and so does every key of one event
(`{<event>}`) and every key of the notifier (`{bindstream:alerts}`, the slot of `bindstream:alerts` itself): each
script and transaction touches one slot. On a single instance the same keys serve unchanged.

    STREAM bindstream:emb:{<device>}:<modality>   t0 t1 epoch model dtype dim emb [modalities] [dbfs] [reused]
    ZSET   bindstream:embidx:{<device>}:<modality>  the publisher's write index (window keys of the newest entries)
    ZSET   bindstream:streams                     the registry: every embedding stream key, scored by the ms of its
                                                  last write (server clock, never decreasing): how matchers find
                                                  new streams and those with news without SCAN
    HASH   bindstream:query:<id>                  text modality device emb dim model source created
                                                  threshold k n cooldown_s hysteresis notify min_dbfs
                                                  example_min_cos example_z example_min_sd example_memory
                                                  example_warmup
    SET    bindstream:queries                     the ids of the active queries
    INT    bindstream:queries:version             bumped on every change of queries or backgrounds
    PUB    bindstream:queries                     "{add|rm|update} {id}" on every change of a query
    HASH   bindstream:background:<model>:<modality>
                                                  prompts emb dim count logit_scale exclude_cos created
    ZSET   bindstream:matchers:<group>            the live matchers of a group, scored by their last heartbeat (ms)
    STRING bindstream:owner:<group>:{<device>}    the matcher that holds the device's streams (reads and commits
                                                  of any other are refused)
    HASH   bindstream:alertstate:<group>:<stream> last_id, and per query id its decision state (and open event)
    STRING bindstream:alerted:<query>:<stream>:<entry>[:<state>]  an alerts entry was emitted for this entry
                                                  (dedup; starts without the suffix, as before events existed)
    HASH   bindstream:health:<group>:{<device>}   per silent stream of the device: its open health event
    STREAM bindstream:alerts:{<device>}           the device's alerts entries, written by the matcher's commit,
                                                  each with its event record's fields (`record`)
    STREAM bindstream:alerts                      every device's alerts entries, copied in order (the fan-in): one
                                                  entry per event state change (start, update, end); also
                                                  PUBLISHed as JSON on channel bindstream:alerts
    HASH   bindstream:fanin:{bindstream:alerts}   per device, the last entry of its alerts stream copied
    HASH   bindstream:event:{<id>}                one event (class Event): id kind device query query_text modality
                                                  model source start_ns end_ns peak peak_source_id windows state
                                                  detected_ns ended_ns review reviewed_ns notify
    ZSET   bindstream:events                      event ids by their start (wall clock, ms): listing by time
    HASH   bindstream:evidence:{<id>}             what the device sent around the event (audio, frames, IMU rows)
    STREAM bindstream:outbox:{bindstream:alerts}:<sink>  notifications waiting for one sink (at-least-once)
    HASH   bindstream:sinks:{bindstream:alerts}   sink id -> its URL, for every sink that was ever queued to
    HASH   bindstream:searchindex:<model>:<modality>  one shard of the search index: lineage dir host vectors saved_ms
                                                  dim dtype (where its snapshots are, for `bindstream search`)
    STRING bindstream:searchindex:<model>:<modality>:lease  the indexer that keeps the shard now (one at a time)
    GROUP  bindstream-index:<model>               the search index's consumer group on every embedding stream
"""

from __future__ import annotations

import hashlib
import io
import json
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
HEALTH_PREFIX = "bindstream:health"
STREAM_REGISTRY = "bindstream:streams"
MEMBERS_PREFIX = "bindstream:matchers"
OWNER_PREFIX = "bindstream:owner"
NOTIFIER_TAG = "{" + ALERTS_STREAM + "}"  # the hash tag of the notifier's keys: the slot of bindstream:alerts
FANIN_CURSORS = f"bindstream:fanin:{NOTIFIER_TAG}"
OUTBOX_PREFIX = f"bindstream:outbox:{NOTIFIER_TAG}"
SINKS = f"bindstream:sinks:{NOTIFIER_TAG}"
SEARCH_INDEX_PREFIX = "bindstream:searchindex"
INDEX_GROUP_PREFIX = "bindstream-index"
INDEX_CONSUMER = "indexer"  # the one consumer of an index group (a lease keeps a second indexer out)
RECORD_FIELD = "record"  # in a device's alerts entry: its event record's fields to write, as JSON
LAYOUT_VERSION = 2  # REDIS.md "Versions": what changed since v1, and how to move v1 keys
NOTIFY_FIELD = "notify"  # of a query's hash and an event's: its sink URLs, one a line (absent or "": none)
SINK_ID_CHARS = 12  # hex characters of a sink id: 48 bits, no collision among any realistic number of URLs
LAST_ID_FIELD = "last_id"  # in a stream's state hash; every other field is a query id
EMB_DTYPE = "float32"  # the one dtype of entries; stored little-endian ("<f4")
CALIBRATION_PREFIX = "example_"  # a query hash's calibration fields: example_min_cos, example_z, ...

# What a stored hash that does not parse raises (a missing field, text where a number belongs, dim 0,
# bytes that are not UTF-8); each is reported as QueryError for that record only.
PARSE_ERRORS = (KeyError, ValueError, TypeError, IndexError, ArithmeticError)


# ----- keys ----------------------------------------------------------------------------------------------


def tag(name: str) -> str:
    """`name` as a hash tag: the part of a key that places it in a Redis Cluster."""
    return f"{{{name}}}"


def stream_key(device: str, modality: str) -> str:
    """The embedding stream of one device and modality (globs give a SCAN pattern)."""
    return f"{EMB_PREFIX}:{tag(device)}:{modality}"


def index_key(device: str, modality: str) -> str:
    return f"{INDEX_PREFIX}:{tag(device)}:{modality}"


def query_key(query_id: str) -> str:
    return f"{QUERY_PREFIX}:{query_id}"


def background_key(model: str, modality: str) -> str:
    return f"{BACKGROUND_PREFIX}:{model}:{modality}"


def check_group(group: str) -> str:
    """A matcher group's name as it goes into keys; ValueError for braces (they would make a hash tag of it)."""
    if not group or "{" in group or "}" in group:
        raise ValueError(f"a matcher group name must be non-empty and without braces, got {group!r}")
    return group


def state_key(group: str, stream: str) -> str:
    return f"{STATE_PREFIX}:{group}:{stream}"


def members_key(group: str) -> str:
    """The live matchers of a group: member -> its last heartbeat (server ms)."""
    return f"{MEMBERS_PREFIX}:{group}"


def owner_key(group: str, device: str) -> str:
    """Which matcher of `group` holds the device's streams now."""
    return f"{OWNER_PREFIX}:{group}:{tag(device)}"


def device_alerts_key(device: str) -> str:
    """The device's alerts entries, as the matcher's commit writes them (before they are copied to ALERTS_STREAM)."""
    return f"{ALERTS_STREAM}:{tag(device)}"


def dedup_key(query_id: str, stream: str, entry_id: str, state: str) -> str:
    """Marks the alerts entry of one state change made by one window; a start keeps the key of the versions
    before events, so that an upgrade does not repeat an alert."""
    suffix = "" if state == START else f":{state}"
    return f"{DEDUP_PREFIX}:{query_id}:{stream}:{entry_id}{suffix}"


def health_key(group: str, device: str) -> str:
    """The open health events of a device's streams in a matcher group: field stream key, value `encode_silence`."""
    return f"{HEALTH_PREFIX}:{group}:{tag(device)}"


def event_key(event_id: str) -> str:
    return f"{EVENT_PREFIX}:{tag(event_id)}"


def evidence_key(event_id: str) -> str:
    """An event's evidence: in the slot of its record (the evidence writer sets the record's `evidence` field)."""
    return f"{EVIDENCE_PREFIX}:{tag(event_id)}"


def outbox_key(sink_id: str) -> str:
    return f"{OUTBOX_PREFIX}:{sink_id}"


def sink_id(url: str) -> str:
    """A notification sink's id: a short hash of its URL (which may hold a token that no key should show)."""
    return hashlib.sha256(url.encode()).hexdigest()[:SINK_ID_CHARS]


class BadRecord(ValueError):
    """A key or stream entry that does not decode as documented in REDIS.md."""


def parse_key(key: str) -> tuple[str, str]:
    """(device, modality) of a `bindstream:emb:{<device>}:<modality>` key; BadRecord for any other key."""
    prefix, _, rest = key.partition(f"{EMB_PREFIX}:{{")
    device, _, modality = rest.rpartition("}:")
    if prefix or not device or not modality or ":" in modality:
        raise BadRecord(f"not an embedding stream key: {key!r}")
    return device, modality


def id_tuple(entry_id: str) -> tuple[int, int]:
    """A stream id as (ms, seq); ValueError unless it is one."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def now_id() -> str:
    """A stream id at the current time: a consumer group created there skips everything older."""
    return f"{time.time_ns() // 1_000_000}-0"


# ----- the stream registry -------------------------------------------------------------------------------

# The registry's one write, by every writer of an embedding stream once its entries are in: each stream key scored
# by the server's clock in ms, and above every earlier score (by 1/1024 ms when the clock has not moved on, or went
# back): a matcher reads the members scored above the highest score it saw, so every later write is news to it.
# Members older than the retention are dropped. KEYS: the registry. ARGV: retention ms (0: keep all), then the
# stream keys. Returns the score.
REGISTER_STREAMS = """
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local top = redis.call('ZREVRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2]
if top and tonumber(top) >= ms then ms = tonumber(top) + 1 / 1024 end
for first = 2, #ARGV, 1000 do  -- ZADD 1,000 members at a time: Lua's unpack takes at most ~8,000 values
  local scored = {}
  for i = first, math.min(first + 999, #ARGV) do
    scored[#scored + 1] = ms
    scored[#scored + 1] = ARGV[i]
  end
  redis.call('ZADD', KEYS[1], unpack(scored))
end
local keep = tonumber(ARGV[1])
if keep > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%.17g', ms - keep)) end
return string.format('%.17g', ms)
"""


def register_streams(client, keys: Sequence[str], retention_ms: int = 0) -> float:
    """Record in the registry that the streams `keys` were just written (after their entries are in: a reader
    that sees a stream's new score finds its new entries); drop members not written for `retention_ms` (0:
    none). Returns the score given. (EVALSHA, so that a user without EVAL may write: the publisher's ACL.)"""
    return float(client.register_script(REGISTER_STREAMS)(keys=[STREAM_REGISTRY], args=[retention_ms, *keys]))


# ----- the search index ----------------------------------------------------------------------------------


def search_index_key(model: str, modality: str) -> str:
    return f"{SEARCH_INDEX_PREFIX}:{model}:{modality}"


def index_lease_key(model: str, modality: str) -> str:
    return f"{search_index_key(model, modality)}:lease"


def index_group(model: str) -> str:
    """The consumer group of the search index of `model`'s shards: one per model, so that the shards of two
    models reading one stream each see every entry."""
    return f"{INDEX_GROUP_PREFIX}:{model}"


@dataclass
class IndexInfo:
    """HASH bindstream:searchindex:<model>:<modality>: where one shard of the search index keeps its snapshots
    (streaming/index/), written by its indexer at each snapshot and read by `bindstream search`."""

    lineage: str  # names the snapshots of this Redis's data: a directory holding another Redis's is never loaded
    dir: str = ""  # the shard's snapshot directory on `host` ("" until the first snapshot)
    host: str = ""
    vectors: int = 0  # in the last snapshot
    saved_ms: int = 0  # wall clock of the last snapshot
    dim: int = 0
    dtype: str = ""  # how the index stores a vector: f16 or i8

    def encode(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def decode(cls, raw: dict) -> IndexInfo | None:
        """The info a hash holds (None for an empty hash); BadRecord if a field does not parse."""
        f = {text(k): text(v) for k, v in raw.items()}
        if not f:
            return None
        try:
            return cls(
                f["lineage"],
                f.get("dir", ""),
                f.get("host", ""),
                int(f.get("vectors", 0)),
                int(f.get("saved_ms", 0)),
                int(f.get("dim", 0)),
                f.get("dtype", ""),
            )
        except PARSE_ERRORS as err:
            raise BadRecord(f"search index info: {err!r}") from err


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
    reused: int | None = None  # the t0 of the earlier window whose vector this repeats (gated: it did not change)


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
    if e.reused is not None:
        fields["reused"] = e.reused
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
        t0, reused = int(f["t0"]), int(f["reused"]) if "reused" in f else None
        if reused is not None and not 0 <= reused < t0:
            raise BadRecord(f"{stream} {entry_id}: reused {reused} is not the t0 of an earlier window")
        return EmbeddingRecord(
            stream=stream,
            id=text(entry_id),
            device=device,
            modality=modality,
            t0=t0,
            t1=int(f["t1"]),
            model=text(f["model"]),
            emb=np.frombuffer(f["emb"], dtype="<f4").astype(np.float32),
            modalities=tuple(text(f["modalities"]).split(",")) if "modalities" in f else (),
            epoch=int(f.get("epoch", 0)),
            dbfs=dbfs,
            reused=reused,
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


def encode_device_alert(alert: Alert, record: dict[str, str]) -> dict[str, str]:
    """The fields of an entry of a device's alerts stream: the alert's, and the fields it writes to its event's
    record (as JSON in `record`) when it is copied to bindstream:alerts."""
    return {**alert.fields(), RECORD_FIELD: json.dumps(record)}


def decode_device_alert(entry_id, raw: dict) -> tuple[Alert, dict[str, str]]:
    """(the alert, its record's fields) of a device's alerts entry; BadRecord if it does not decode."""
    try:
        record = json.loads(text(raw[RECORD_FIELD.encode()] if RECORD_FIELD.encode() in raw else raw[RECORD_FIELD]))
        if not isinstance(record, dict):
            raise TypeError(f"record is {type(record).__name__}, not an object")
        return Alert.from_entry(entry_id, raw), {str(k): str(v) for k, v in record.items()}
    except PARSE_ERRORS as err:
        raise BadRecord(f"device alerts entry {text(entry_id)}: {err!r}") from err


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


# ----- layout v1 -----------------------------------------------------------------------------------------


def v2_name(key: str) -> str | None:
    """The v2 name of a key of layout v1 that moves (REDIS.md "Versions"), or None: a v2 key, a key that keeps its
    name (queries, backgrounds, bindstream:alerts, bindstream:events) or one left to expire (dedup marks)."""
    kind, _, rest = key.partition(":")[2].partition(":")
    if key.count("{") or not rest:
        return None
    if kind in ("emb", "embidx") and ":" in rest:
        device, _, modality = rest.rpartition(":")
        return (stream_key if kind == "emb" else index_key)(device, modality)
    if kind == "alertstate" and f":{EMB_PREFIX}:" in rest:
        group, _, stream = rest.partition(f":{EMB_PREFIX}:")
        device, _, modality = stream.rpartition(":")
        return state_key(group, stream_key(device, modality))
    if kind in ("event", "evidence") and ":" not in rest:
        return (event_key if kind == "event" else evidence_key)(rest)
    if kind == "outbox" and ":" not in rest:
        return outbox_key(rest)
    return None


def migrate_v1(client) -> dict[str, int]:
    """Move the keys of a v1 layout on a single instance to their v2 names (RENAME keeps a stream's consumer groups
    and every TTL), register the embedding streams, and split v1's health hashes per device; stop the pipeline,
    the matchers and the notifier first. Returns how many keys were `moved`, and how many were `kept` because
    their v2 name exists already."""
    moved = kept = 0
    streams = []
    for raw in list(client.scan_iter(match="bindstream:*", count=1000)):
        key = text(raw)
        new: str | None = SINKS if key == "bindstream:sinks" else v2_name(key)
        if key.startswith(f"{HEALTH_PREFIX}:") and key.count(":") == 2 and client.type(key) == b"hash":
            for field, value in client.hgetall(key).items():
                if stream := v2_name(text(field)):
                    client.hset(health_key(key.rpartition(":")[2], parse_key(stream)[0]), stream, value)
            client.delete(key)
            moved += 1
            continue
        if new is None:
            continue
        if client.renamenx(key, new):
            moved += 1
            if new.startswith(f"{EMB_PREFIX}:"):
                streams.append(new)
        else:
            kept += 1
    for i in range(0, len(streams), 1000):
        register_streams(client, streams[i : i + 1000])
    return {"moved": moved, "kept": kept}
