"""The matcher: reads the embedding streams, scores them against the standing queries, decides, and commits
the decision state, the alerts entries of events (start, update, end) and the event records to Redis; and
commits the health events that its health watch (health.py) finds for the streams of its shard.

A plain class (`Matcher(settings, redis_url)`: `step()` for one read-score-commit cycle, `run()` to loop)
that also runs as a restartable Ray actor (`start_matchers`). Scoring is scoring.py's, the decision rule
decision.py's and the silence rule health.py's; this module owns the Redis side. ALERTS.md describes the
decision rule, the state kept in Redis and the delivery guarantees.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase

import numpy as np
import ray
import redis

from ..records import QUERY_MODALITIES, text
from ..redis_layout import (
    ALERTS_CHANNEL,
    ALERTS_STREAM,
    END,
    ENDED,
    EVENTS_INDEX,
    HEALTH_EVENT,
    LAST_ID_FIELD,
    OPEN,
    QUERY_CHANNEL,
    QUERY_EVENT,
    QUERY_VERSION,
    START,
    Alert,
    BadRecord,
    EmbeddingRecord,
    Event,
    decode_embedding,
    dedup_key,
    event_id,
    event_key,
    id_tuple,
    now_id,
    parse_key,
    state_key,
    stream_key,
)
from ..retry import Backoff
from ..stage import StageMetrics, WarnOnce
from .decision import INITIAL_STATE, MAX_EVENT_S, Change, OpenEvent, QueryState, Rules, decide
from .health import HealthWatch
from .queries import read_backgrounds, read_queries
from .records import Query
from .scoring import Baselines, ModalityIndex, build_indexes, entry_problem

log = logging.getLogger(__name__)

DEFAULT_GROUP = "bindstream-matchers"
DEFAULT_CONSUMER = "matcher"
MAX_EVENT_LIMIT_S = 365 * 86400.0  # max_event_s beyond a year of device time is a typo (and must fit in int64 ns)
ONE_BLAS_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# One state change of an event, exactly once per (query, source entry, state): SET NX the dedup key, and only
# if it was not there XADD the alerts entry, PUBLISH it (as JSON with its id) and write the event record: a
# start creates it and indexes it (dropping index members older than the records' TTL); a later change sets
# its fields only while the record exists, so that an expired record never comes back partial.
# KEYS: dedup key, alerts stream, event key, events index. ARGV: dedup ttl s, alerts maxlen, channel, event
# ttl s, event id, index score (the start's wall ms; '' for a later change), index cutoff ms, the number of
# record field/value pairs, those pairs, then the alert's field/value pairs.
EMIT_ALERT = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return false
end
local record_end = 8 + 2 * tonumber(ARGV[8])
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, record_end + 1))
local msg = {id = id}
for i = record_end + 1, #ARGV, 2 do msg[ARGV[i]] = ARGV[i + 1] end
redis.call('PUBLISH', ARGV[3], cjson.encode(msg))
if ARGV[6] ~= '' then
  redis.call('ZADD', KEYS[4], ARGV[6], ARGV[5])
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. ARGV[7])
elseif redis.call('EXISTS', KEYS[3]) == 0 then
  return id
end
redis.call('HSET', KEYS[3], unpack(ARGV, 9, record_end))
redis.call('EXPIRE', KEYS[3], ARGV[4])
return id
"""

# An open event's record extended by windows that made no alerts entry (its end, its windows), while the
# record exists. KEYS: event key. ARGV: event ttl s, then field/value pairs.
GROW_EVENT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 2))
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
"""

UPDATE_FIELDS = ("peak", "peak_source_id", "end_ns", "windows")  # of an event record, written by an update
END_FIELDS = ("state", "ended_ns", "end_ns", "peak", "windows")  # written by an end
GROW_FIELDS = ("end_ns", "windows")  # written by windows that extend an open event (OpenEvent's names too)


@dataclass(frozen=True)
class MatcherSettings:
    """How one matcher reads its shard of the streams, keeps its state and backs off; checked when built."""

    group: str = DEFAULT_GROUP  # consumer group on every embedding stream
    consumer: str = DEFAULT_CONSUMER  # keep it stable across restarts: pending entries are per consumer
    devices: str = "*"  # glob of the devices whose streams this matcher reads
    shard: int = 0  # this matcher reads the streams whose crc32(key) % shards == shard
    shards: int = 1
    start_id: str = field(default_factory=now_id)  # where groups this matcher creates start
    read_count: int = 256  # entries per stream per XREADGROUP
    block_ms: int = 100  # longest XREADGROUP wait
    reload_s: float = 1.0  # query version poll (pub/sub notifications reload at once)
    discover_s: float = 2.0  # SCAN for new streams (new devices)
    dedup_ttl_s: int = 7 * 86400  # life of a bindstream:alerted:* key
    alerts_maxlen: int = 100_000  # approximate (MAXLEN ~)
    event_ttl_s: int = 7 * 86400  # life of a bindstream:event:* record after its last change (and of its index entry)
    max_event_s: float = MAX_EVENT_S  # an event ends this long (device time) after its start; the query stays disarmed
    silence_s: float = 30.0  # a stream whose last entry is this old (server clock) raises a health event
    health_commit: int = 100  # health event changes per MULTI/EXEC (each a Lua call: ~0.2 ms of Redis)
    retry_max_s: float = 2.0  # backoff cap while Redis fails
    state_ttl_s: int = 86_400  # a bindstream:alertstate:* hash expires this long after its stream's last commit
    idle_s: float = 60.0  # a stream without a new entry this long is no longer polled (discovery resumes it)
    max_streams: int = 10_000  # streams polled at once; more with unread entries are refused (counted) meanwhile
    max_idle: int = 100_000  # idle streams whose read position is kept (others are looked up at every discovery)
    scan_count: int = 1_000  # SCAN COUNT of discovery: keys Redis looks at per round trip
    sweep_chunk: int = 1_000  # streams looked at per round trip when discovery checks for unread entries
    max_logged: int = 1_000  # (reason, device or query) pairs warned about in the log; later ones are only counted
    baseline_streams: int = 10_000  # streams whose example-query estimates stay in memory; least recently used go
    autostart: bool = False  # start the run loop's thread in the constructor (actors: also after a restart)

    def __post_init__(self):
        if not 0 <= self.shard < self.shards:
            raise ValueError(f"shard {self.shard} must lie in [0, shards={self.shards})")
        try:
            id_tuple(self.start_id)  # discovery compares stream ids with it
        except ValueError as err:
            raise ValueError(f"start_id {self.start_id!r} must be a stream id: 0 or ms-seq") from err
        for name in (
            "read_count",
            "state_ttl_s",
            "max_streams",
            "max_idle",
            "scan_count",
            "sweep_chunk",
            "baseline_streams",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.idle_s > 0:
            raise ValueError(f"idle_s must be > 0, got {self.idle_s}")
        if not 0 < self.max_event_s <= MAX_EVENT_LIMIT_S:  # NaN fails too
            raise ValueError(f"max_event_s must lie in (0, {MAX_EVENT_LIMIT_S:g}] seconds, got {self.max_event_s}")
        if not 0 < self.silence_s < math.inf or self.event_ttl_s < 1 or self.health_commit < 1:
            raise ValueError(
                f"silence_s ({self.silence_s}) must be finite and > 0, event_ttl_s ({self.event_ttl_s}) and "
                f"health_commit ({self.health_commit}) at least 1"
            )


@dataclass
class StreamState:
    """A stream's decision state: the last entry applied (older ones are replays and are skipped) and
    each query's state. Stored as the hash bindstream:alertstate:{group}:{stream}: field `last_id`, and
    one field per query id."""

    last_id: str = "0-0"
    queries: dict[str, QueryState] = field(default_factory=dict)

    @classmethod
    def decode(cls, raw: dict) -> tuple[StreamState, list]:
        """(the state, the raw names of the fields that do not parse: left out, their queries start afresh)."""
        state, unreadable = cls(), []
        for name, value in raw.items():
            try:
                if text(name) == LAST_ID_FIELD:
                    id_tuple(text(value))
                    state.last_id = text(value)
                else:
                    state.queries[text(name)] = QueryState.decode(text(value))
            except ValueError:
                unreadable.append(name)
        return state, unreadable


@dataclass(frozen=True)
class Emit:
    """One alerts entry, and the fields it writes to its event's record (all of them at a start)."""

    alert: Alert
    record: dict[str, str]


def event_emit(event: Event, state: str, source_id: str, score: float, threshold: float, t0: int, t1: int) -> Emit:
    """The alerts entry of `event`'s change to `state`, made by entry `source_id` (with the score, threshold
    and device times the entry reports), and the fields of the record it writes: all of them at a start, the
    new peak and the event's reach at an update, those and its end at an end."""
    alert = Alert(
        event.device,
        event.query,
        event.query_text,
        event.modality,
        score,
        threshold,
        t0,
        t1,
        event.source,
        source_id,
        event.model,
        event.detected_ns,
        state,
        event.id,
        event.kind,
    )
    return Emit(alert, event.encode(None if state == START else END_FIELDS if state == END else UPDATE_FIELDS))


def query_emit(q: Query, r: EmbeddingRecord, score: float, rules: Rules, c: Change, now_ns: int) -> Emit:
    """The alerts entry of a query event's change `c` at window `r` (of score `score`): a start or an update
    reports the window, an end the whole event and its peak."""
    e, ended = c.event, c.state == END
    record = Event(
        event_id(q.id, r.stream, e.opened_id),
        QUERY_EVENT,
        r.device,
        q.id,
        q.text,
        q.modality,
        r.model,
        r.stream,
        e.start_ns,
        e.end_ns,
        e.peak,
        r.id,
        e.windows,
        ENDED if ended else OPEN,
        detected_ns=now_ns,
        ended_ns=now_ns if ended else 0,
        notify=q.notify,
    )
    threshold = float(rules.threshold[c.query])
    if ended:
        return event_emit(record, END, r.id, e.peak, threshold, e.start_ns, e.end_ns)
    return event_emit(record, c.state, r.id, score, threshold, r.t0, r.t1)


class Matcher:
    """Reads the embedding streams of its shard through a consumer group, scores, decides, and commits
    the new decision state, the events' alerts entries and records, and the acknowledgements in one Redis
    transaction; at each discovery, commits the health events of its streams (`HealthWatch`, health.py)."""

    def __init__(self, settings: MatcherSettings, redis_url: str):
        self.settings = settings
        self.client = redis.Redis.from_url(redis_url)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(QUERY_CHANNEL)
        self.emit = self.client.register_script(EMIT_ALERT)
        self.grow = self.client.register_script(GROW_EVENT)
        self.metrics = StageMetrics("match")
        # polled stream key -> (monotonic time of its last entry or of its join, last id delivered to the group)
        self.active: dict[str, tuple[float, str]] = {}
        self.idle: dict[str, str] = {}  # stream key no longer polled -> last id delivered to the group
        self.pending = True  # first drain this consumer's delivered-but-unacknowledged entries
        self.first_discovery = True  # the first discovery polls every stream, later ones those with news
        self.indexes: dict[tuple[str, str], ModalityIndex] = {}
        self.rules: dict[tuple[str, str], Rules] = {}  # the decision settings of each index's queries
        self.query_ids: set[str] = set()  # of the queries in `indexes`
        self.rejected: dict[tuple[str, str], str] = {}  # (event, query id or model/modality) -> why, at last reload
        self.states: dict[str, StreamState] = {}  # polled stream key -> state
        self.health = HealthWatch(
            self.client,
            settings.group,
            settings.silence_s,
            settings.sweep_chunk,
            settings.max_idle,
            self._in_shard,
            self.metrics,
        )
        self.baselines = Baselines(settings.baseline_streams)  # example queries' running estimates (scoring.py)
        self._warn_once = WarnOnce(log, settings.max_logged)
        self.version: bytes | None = None
        self.next_reload = self.next_discover = 0.0
        self.last_error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if settings.autostart:
            self.start()

    # ----- queries and streams -----

    def reload(self) -> None:
        """Rebuild the score matrices from the queries and backgrounds in Redis. One that does not load is
        left out, counted (`rejected_query` per query id, `rejected_background` per model/modality) and
        logged once while it stays in Redis; every other query keeps working."""
        version = self.client.get(QUERY_VERSION)
        queries, bad = read_queries(self.client)
        backgrounds, bad_backgrounds = read_backgrounds(self.client, {(q.model, q.modality) for q in queries})
        rejected = {("rejected_query", query_id): why for query_id, why in bad.items()}
        rejected |= {
            ("rejected_background", f"{model}/{modality}"): why for (model, modality), why in bad_backgrounds.items()
        }
        for (event, label), why in rejected.items():
            if (event, label) not in self.rejected:
                self.metrics.count(event, label)
                log.warning("%s (%s): %s", event, label, why)
        self.rejected = rejected
        self.indexes = build_indexes(queries, backgrounds)
        self.rules = {
            key: Rules.of([q.decision for q in index.queries], self.settings.max_event_s)
            for key, index in self.indexes.items()
        }
        self.query_ids = {q.id for index in self.indexes.values() for q in index.queries}
        for modality, n in Counter(q.modality for q in queries if q.id not in self.query_ids).items():
            self.metrics.count("no_background", modality, n=n)
        self.version = version
        for stream, state in self.states.items():
            self._drop_fields(stream, state)

    def _drop_fields(self, stream: str, state: StreamState, unreadable: Sequence = ()) -> None:
        """Forget the states of queries no longer active and HDEL them, with the `unreadable` fields."""
        gone = [query_id for query_id in state.queries if query_id not in self.query_ids]
        for query_id in gone:
            del state.queries[query_id]
        if gone or unreadable:
            self.client.hdel(state_key(self.settings.group, stream), *gone, *unreadable)

    def _maybe_reload(self) -> None:
        notified = False
        while self.pubsub.get_message(timeout=0) is not None:
            notified = True
        now = time.monotonic()
        if notified or now >= self.next_reload:
            self.next_reload = now + self.settings.reload_s
            if notified or self.version is None or self.client.get(QUERY_VERSION) != self.version:
                self.reload()

    def _in_shard(self, key: str) -> bool:
        """Whether this matcher reads `key`: the stream of a device matching `devices` (the device as parsed
        from the key: the SCAN pattern for device `a` also returns a device `a:x`'s streams) and of a query
        modality, in this shard."""
        s = self.settings
        try:
            device, modality = parse_key(key)
        except BadRecord:
            return False
        return (
            modality in QUERY_MODALITIES
            and fnmatchcase(device, s.devices)
            and zlib.crc32(key.encode()) % s.shards == s.shard
        )

    def discover(self) -> None:
        """Stop polling the streams without a new entry for `idle_s` (once nothing is pending), then poll
        this shard's streams: all of them at the first discovery after a start, later those with entries
        the group has not read (new devices, idle streams that woke up). At most `max_streams` are polled;
        a stream beyond that is refused (`refused_stream_cap` per device, at each discovery that finds it
        with unread entries) and read once there is room. Then checks the health of every stream of the
        shard, polled or not (`_check_health`)."""
        s = self.settings
        now = time.monotonic()
        if not self.pending:  # pending entries are re-read from the polled streams only
            for key in [k for k, (seen, _) in self.active.items() if now - seen > s.idle_s]:
                self._let_go(key)
        keys = [k for k in self._scan() if k not in self.active and self._in_shard(k)]
        self.idle = {k: self.idle[k] for k in keys if k in self.idle}  # deleted streams are forgotten
        known = list(self.idle)
        unknown = [k for k in keys if k not in self.idle]
        looked = []  # (key, whether the group exists on it, whether it has unread entries, last delivered id)
        for i in range(0, len(known), s.sweep_chunk):
            after = {k: self.idle[k] for k in known[i : i + s.sweep_chunk]}
            found = self._unread(after)
            looked += [(k, True, k in found, position) for k, position in after.items()]
        for i in range(0, len(unknown), s.sweep_chunk):
            looked += self._look(unknown[i : i + s.sweep_chunk])
        for key, joined, unread, position in looked:
            if (unread or self.first_discovery) and len(self.active) < s.max_streams:
                if not joined:
                    try:
                        self.client.xgroup_create(key, s.group, id=s.start_id)
                    except redis.ResponseError as err:
                        if "BUSYGROUP" not in str(err):
                            raise
                self.idle.pop(key, None)
                self.active[key] = (now, position)
                continue
            if unread:
                device = parse_key(key)[0]
                self.metrics.count("refused_stream_cap", device)
                self._warn_once("refused_stream_cap", "", f"{key} and maybe others: {s.max_streams} streams polled")
            if joined:
                self._remember_idle(key, position)
        self.first_discovery = False
        self._check_health(
            {key: position for key, _, _, position in looked} | {k: p for k, (_, p) in self.active.items()},
            {key for key, _, unread, _ in looked if unread},
        )

    def _scan(self) -> list[str]:
        """The stream keys of the devices matching `devices` (a SCAN, `scan_count` keys a round trip); a
        key that is not UTF-8 is no embedding stream."""
        s = self.settings
        out = []
        for key in self.client.scan_iter(match=stream_key(s.devices, "*"), count=s.scan_count, _type="stream"):
            try:
                out.append(key.decode())
            except UnicodeDecodeError:
                continue
        return out

    def _unread(self, after: dict[str, str]) -> set[str]:
        """The keys of `after` (key -> stream id) with an entry after that id: one XREAD, replies only for those."""
        return {text(key) for key, _ in self.client.xread(after, count=1) or []} if after else set()

    def _look(self, keys: list[str]) -> list[tuple[str, bool, bool, str]]:
        """(key, whether the group exists on it, whether it has unread entries, the group's last delivered
        id) for each of the `keys` that is still a stream. Unread: after the last delivered entry (after
        `start_id` where there is no group yet), or, while this consumer may have pending entries, pending
        in the group. Two round trips, whatever the number of keys."""
        s = self.settings
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.xinfo_groups(key)
        joined, pending = set(), set()
        after: dict[str, str] = {}
        for key, groups in zip(keys, pipe.execute(raise_on_error=False)):
            if isinstance(groups, Exception):
                continue  # deleted, or no longer a stream, since the SCAN
            ours = next((g for g in groups if text(g["name"]) == s.group), None)
            after[key] = text(ours["last-delivered-id"]) if ours is not None else s.start_id
            if ours is not None:
                joined.add(key)
                if self.pending and ours["pending"]:
                    pending.add(key)
        found = self._unread({k: v for k, v in after.items() if k not in pending}) | pending
        return [(k, k in joined, k in found, position) for k, position in after.items()]

    def _remember_idle(self, key: str, position: str) -> None:
        """Keep an unpolled stream's last delivered id (at most `max_idle` of them; the others are looked up
        again at each discovery)."""
        if key in self.idle or len(self.idle) < self.settings.max_idle:
            self.idle[key] = position

    def _let_go(self, key: str) -> None:
        """Stop polling an idle stream and drop what is kept of it in memory but its position (its state
        hash stays in Redis until it expires); discovery polls it again once it has a new entry."""
        self._remember_idle(key, self.active.pop(key)[1])
        self.states.pop(key, None)
        device, modality = parse_key(key)
        for (_, index_modality), index in self.indexes.items():
            if index_modality == modality:
                index.forget(device)

    def forget_streams(self) -> None:
        """After a stream or its group vanished: find the streams again, and re-read pending entries."""
        self.active, self.idle, self.states, self.pending, self.first_discovery = {}, {}, {}, True, True
        self.next_discover = 0.0

    # ----- one cycle -----

    def step(self) -> int:
        """Reload queries and discover streams when due, read one batch, score, decide, commit.
        Returns the number of entries read (0: nothing new)."""
        self._maybe_reload()
        now = time.monotonic()
        if now >= self.next_discover:
            self.next_discover = now + self.settings.discover_s
            self.discover()
        if not self.active:
            time.sleep(self.settings.block_ms / 1000)
            return 0
        entries = self._read()
        if entries:
            self._process(entries)
        return len(entries)

    def _read(self) -> list[tuple[str, str, dict | None]]:
        """This consumer's pending entries while there are any (after a restart or a failed commit), then
        new ones."""
        s = self.settings
        if self.pending:
            entries = self._xreadgroup("0", None)
            if entries:
                return entries
            self.pending = False
        return self._xreadgroup(">", s.block_ms)

    def _xreadgroup(self, marker: str, block_ms: int | None) -> list[tuple[str, str, dict | None]]:
        s = self.settings
        reply = self.client.xreadgroup(
            s.group, s.consumer, {k: marker for k in self.active}, count=s.read_count, block=block_ms
        )
        return [(text(key), text(entry_id), f) for key, items in reply or [] for entry_id, f in items]

    def _process(self, entries: list[tuple[str, str, dict | None]]) -> None:
        """Score and decide one batch and commit it. An entry that cannot be used is acknowledged and
        counted (`rejected_{reason}` per device) without touching the others; a failure while deciding one
        stream's entries drops those entries only (`rejected_error`). Counts are applied once the batch
        is committed, so a batch read again after a failed commit is counted once."""
        tally: Counter = Counter()  # (event, label) -> n
        acks: dict[str, list[str]] = defaultdict(list)
        groups: dict[tuple[str, str], list[EmbeddingRecord]] = defaultdict(list)
        now = time.monotonic()
        for key, entry_id, f in entries:
            acks[key].append(entry_id)
            r = self._record(key, entry_id, f, tally)
            if r is not None:
                tally["in", r.modality] += 1
                groups[r.model, r.modality].append(r)
        emits: list[Emit] = []
        changed: dict[str, dict[str, QueryState]] = defaultdict(dict)
        open_events: dict[str, OpenEvent] = {}  # by event id: their records grow
        for (model, modality), records in groups.items():
            index = self.indexes.get((model, modality))
            if index is None:
                tally["no_query", modality] += len(records)
                continue
            fit = []
            for r in records:
                if r.emb.shape[0] == index.dim:
                    fit.append(r)
                else:
                    tally["rejected_wrong_dim", r.device] += 1
                    self._warn_once(
                        "rejected_wrong_dim",
                        r.device,
                        f"{r.stream} {r.id}: dim {r.emb.shape[0]}, the {model} queries have {index.dim}",
                    )
            if not fit:
                continue
            scores = index.scores(fit, self.baselines)  # example queries' estimates, min_dbfs gates
            tally["scored", modality] += len(fit)
            rows: dict[str, list[int]] = defaultdict(list)
            for i, r in enumerate(fit):
                rows[r.stream].append(i)
            for stream, idx in rows.items():
                try:  # the stream states were loaded by _record: no Redis call here
                    new_emits, new_states, new_open = self._decide(
                        index, self.rules[model, modality], [fit[i] for i in idx], scores[idx]
                    )
                except Exception as err:
                    device = fit[idx[0]].device
                    tally["rejected_error", device] += len(idx)
                    self._warn_once("rejected_error", device, f"deciding {stream}: {err!r}")
                    continue
                emits += new_emits
                changed[stream].update(new_states)
                open_events |= new_open
        last_ids = {key: max(ids, key=id_tuple) for key, ids in acks.items()}
        self.active.update((key, (now, last_id)) for key, last_id in last_ids.items())
        self._commit(emits, changed, open_events, last_ids, acks)
        for (event, label), n in tally.items():
            self.metrics.count(event, label, n)

    def _record(self, key: str, entry_id: str, f: dict | None, tally: Counter) -> EmbeddingRecord | None:
        """The entry as a record to score, or None (counted in `tally`): applied before (`replayed`, per
        modality), trimmed while pending (`trimmed`), or unusable, per device (`rejected_malformed`: it does
        not decode; `rejected_bad_time`, `rejected_not_unit`: see entry_problem; `rejected_error`: anything
        else)."""
        device, modality = parse_key(key)
        if id_tuple(entry_id) <= id_tuple(self._stream_state(key).last_id):
            tally["replayed", modality] += 1  # applied before: a redelivery
            return None
        if not f:  # trimmed (MAXLEN) while pending: only its id is left
            tally["trimmed", ""] += 1
            return None
        try:
            r = decode_embedding(key, entry_id, f)
            reason, detail = entry_problem(r), f"{key} {entry_id}: t0 {r.t0} t1 {r.t1}"
        except Exception as err:
            r, reason, detail = None, "malformed" if isinstance(err, BadRecord) else "error", str(err)
        if reason is None:
            return r
        tally[f"rejected_{reason}", device] += 1
        self._warn_once(f"rejected_{reason}", device, detail)
        return None

    def _stream_state(self, stream: str) -> StreamState:
        """A polled stream's state, read from Redis on first use: fields that do not parse are deleted and
        counted (`rejected_state` per device), and so are (uncounted) those of queries no longer active."""
        if stream not in self.states:
            state, unreadable = StreamState.decode(self.client.hgetall(state_key(self.settings.group, stream)))
            if unreadable:
                device = parse_key(stream)[0]
                self.metrics.count("rejected_state", device)
                self._warn_once("rejected_state", device, f"{stream}: unreadable state fields {unreadable}")
            self._drop_fields(stream, state, unreadable)
            self.states[stream] = state
        return self.states[stream]

    def _decide(
        self, index: ModalityIndex, rules: Rules, records: list[EmbeddingRecord], scores: np.ndarray
    ) -> tuple[list[Emit], dict[str, QueryState], dict[str, OpenEvent]]:
        """Run one stream's new records (in stream order) through the decision of every query watching its
        device; returns the alerts entries of its events' state changes, the states that changed, and the
        open events among those by event id."""
        device, stream = records[0].device, records[0].stream
        cols = index.columns(device)
        if not len(cols):
            return [], {}, {}
        known = self._stream_state(stream).queries
        queries = [index.queries[c] for c in cols]
        before = [known.get(q.id, INITIAL_STATE) for q in queries]
        rules, scores = rules[cols], scores[:, cols]
        changed, changes = decide(
            rules, before, scores, [r.t0 for r in records], [r.t1 for r in records], [r.id for r in records]
        )
        now_ns = time.time_ns()
        emits = [
            query_emit(queries[c.query], records[c.window], float(scores[c.window, c.query]), rules, c, now_ns)
            for c in changes
        ]
        open_events = {
            event_id(queries[j].id, stream, st.event.opened_id): st.event
            for j, st in changed.items()
            if st.event is not None
        }
        return emits, {queries[j].id: state for j, state in changed.items()}, open_events

    def _commit(
        self,
        emits: list[Emit],
        changed: dict[str, dict[str, QueryState]],
        open_events: dict[str, OpenEvent],
        last_ids: dict[str, str],
        acks: dict[str, list[str]],
    ) -> None:
        """Decision state (its hash's TTL renewed), the alerts entries with their event records, the records
        of the open events, and the acknowledgements in one MULTI/EXEC: all of a batch's effects or none."""
        s = self.settings
        pipe = self.client.pipeline(transaction=True)
        for stream, last_id in last_ids.items():
            states = {qid: st.encode() for qid, st in changed.get(stream, {}).items()}
            pipe.hset(state_key(s.group, stream), mapping={LAST_ID_FIELD: last_id, **states})
            pipe.expire(state_key(s.group, stream), s.state_ttl_s)
        self._queue_emits(pipe, emits)
        for eid, e in open_events.items():
            grown = [x for name in GROW_FIELDS for x in (name, getattr(e, name))]
            self.grow(keys=[event_key(eid)], args=[s.event_ttl_s, *grown], client=pipe)
        for key, ids in acks.items():
            pipe.xack(key, s.group, *ids)
        results = pipe.execute()
        for stream, last_id in last_ids.items():
            state = self._stream_state(stream)
            state.last_id = last_id
            state.queries.update(changed.get(stream, {}))
        self._count_emits(emits, results[2 * len(last_ids) : 2 * len(last_ids) + len(emits)])

    def _queue_emits(self, pipe, emits: list[Emit]) -> None:
        """EMIT_ALERT for each alerts entry, on `pipe`; a start indexes its event and trims the index."""
        s = self.settings
        cutoff_ms = time.time_ns() // 1_000_000 - s.event_ttl_s * 1000
        for x in emits:
            a = x.alert
            score = a.detected_ns // 1_000_000 if a.state == START else ""
            args = [s.dedup_ttl_s, s.alerts_maxlen, ALERTS_CHANNEL, s.event_ttl_s, a.event, score, cutoff_ms]
            args.append(len(x.record))
            for name, value in (*x.record.items(), *a.fields().items()):
                args += [name, value]
            keys = [dedup_key(a.query, a.source, a.source_id, a.state), ALERTS_STREAM, event_key(a.event), EVENTS_INDEX]
            self.emit(keys=keys, args=args, client=pipe)

    def _count_emits(self, emits: list[Emit], results: list) -> None:
        """Count committed alerts entries: `duplicate_alert` (per modality) for one written before; per
        modality `event_start|update|end` of query events, with `alert` and the latency for their starts; per
        device `health_start|end` of health events."""
        done_ms = time.time_ns() / 1e6
        for x, result in zip(emits, results):
            a = x.alert
            if result is None:
                self.metrics.count("duplicate_alert", a.modality)
            elif a.kind == HEALTH_EVENT:
                self.metrics.count(f"health_{a.state}", a.device)
            else:
                self.metrics.count(f"event_{a.state}", a.modality)
                if a.state == START:
                    self.metrics.count("alert", a.modality)
                    self.metrics.latency((done_ms - id_tuple(a.source_id)[0]) / 1000)

    # ----- device health -----

    def _check_health(self, positions: dict[str, str], unread: set[str]) -> None:
        """Commit the health watch's changes (`HealthWatch.check` of `positions`, the last entries the group
        delivered of each stream, and `unread`, those known to have newer ones): each stream's alerts entry,
        with its silence kept or dropped, in MULTI/EXECs of `health_commit` streams, so that a mass silence
        (a network outage) does not hold Redis in one long one."""
        s = self.settings
        changes = self.health.check(positions, unread)
        for i in range(0, len(changes), s.health_commit):
            chunk = changes[i : i + s.health_commit]
            emits = [event_emit(c.record, c.state, c.source_id, c.score, s.silence_s, c.t0, c.t1) for c in chunk]
            pipe = self.client.pipeline(transaction=True)
            self._queue_emits(pipe, emits)
            self.health.queue(pipe, chunk)
            results = pipe.execute()
            self.health.applied(chunk)
            self._count_emits(emits, results[: len(chunk)])

    # ----- running -----

    def run(self) -> None:
        """`step` until `stop`; errors back off and the unacknowledged entries are read again."""
        backoff = Backoff(self.settings.retry_max_s)
        while not self._stop.is_set():
            try:
                self.step()
                backoff.reset()
            except Exception as err:  # Redis down, or a bad query/background/state record: keep matching
                self.metrics.count("redis_error" if isinstance(err, redis.RedisError) else "error")
                self.last_error = str(err)
                if not isinstance(err, redis.RedisError):
                    log.exception("matching failed; retrying")
                if "NOGROUP" in str(err):
                    self.forget_streams()
                self.pending = True
                backoff.wait(self._stop)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="matcher", daemon=True)
        self._thread.start()

    def stop(self) -> dict:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.pubsub.close()
        return self.stats()

    def stats(self) -> dict:
        return self.metrics.snapshot(
            streams=len(self.active),
            queries=sum(i.m for i in self.indexes.values()),
            pending=self.pending,
            last_error=self.last_error,
        )


def start_matchers(
    settings: MatcherSettings, redis_url: str, count: int = 1, max_restarts: int = -1, num_cpus: float = 0
) -> list:
    """`count` matcher actors, each owning a shard of the streams (consumer `{settings.consumer}-{i}`),
    running from construction and restarted by Ray (up to `max_restarts`, -1: always) with the same
    settings after a crash. Each scores on one core: its BLAS runs one thread (more only add latency)."""
    return [
        ray.remote(Matcher)
        .options(max_restarts=max_restarts, num_cpus=num_cpus, runtime_env={"env_vars": ONE_BLAS_THREAD})
        .remote(
            replace(settings, shard=i, shards=count, consumer=f"{settings.consumer}-{i}", autostart=True), redis_url
        )
        for i in range(count)
    ]
