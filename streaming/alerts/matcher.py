"""The matcher: reads the embedding streams of the devices it owns, scores them against the standing queries,
decides, and commits the decision state and the alerts entries of events (start, update, end) to Redis; copies
those entries to the cluster-wide alerts stream (fanin.py); and commits the health events that its health watch
(health.py) finds for its streams.

A plain class (`Matcher(settings, redis_url)`: `step()` for one read-score-commit cycle, `run()` to loop) that also
runs as a restartable Ray actor (`start_matchers`). Scoring is scoring.py's, the decision rule decision.py's, the
silence rule health.py's, and which matcher reads which device shards.py's; this module owns the Redis side of a
matcher. It works the same on one Redis and on a Redis Cluster: every script touches one device, or several of
one hash slot. ALERTS.md describes the decision rule, the state kept in Redis and the delivery guarantees.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase

import msgpack
import numpy as np
import ray
import redis

from ..records import QUERY_MODALITIES, text
from ..redis_access import connect, run_scripts, slot_groups
from ..redis_layout import (
    END,
    ENDED,
    HEALTH_EVENT,
    LAST_ID_FIELD,
    OPEN,
    QUERY_CHANNEL,
    QUERY_EVENT,
    QUERY_VERSION,
    START,
    STREAM_REGISTRY,
    Alert,
    BadRecord,
    EmbeddingRecord,
    Event,
    check_group,
    decode_embedding,
    dedup_key,
    device_alerts_key,
    encode_device_alert,
    encode_silence,
    event_id,
    event_key,
    health_key,
    id_tuple,
    now_id,
    owner_key,
    parse_key,
    state_key,
)
from ..retry import repeat_until_stopped
from ..stage import StageMetrics, WarnOnce
from .decision import INITIAL_STATE, MAX_EVENT_S, Change, OpenEvent, QueryState, Rules, decide
from .fanin import FanIn
from .health import HealthChange, HealthWatch
from .queries import read_backgrounds, read_queries
from .records import Query
from .scoring import Baselines, ModalityIndex, build_indexes, entry_problem
from .shards import CLAIM, READ, Membership, read_reply, stream_entries

log = logging.getLogger(__name__)

DEFAULT_GROUP = "bindstream-matchers"
DEFAULT_CONSUMER = "matcher"
MAX_EVENT_LIMIT_S = 365 * 86400.0  # max_event_s beyond a year of device time is a typo (and must fit in int64 ns)
ONE_BLAS_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# The commit of one batch's effects for the devices of one hash slot, each device's part only if this matcher
# holds its token (else 0 for it): per stream its decision state (HSET, TTL renewed) and the XACK of what was read;
# per alerts entry, exactly once per (query, source entry, state), SET NX of its dedup key and, if it was not set,
# the XADD to the device's alerts stream; the fields of its health hash (value '': deleted); the token's TTL
# renewed. The first write of a device is checked: one Redis refuses (out of memory: nothing of the script ran;
# a key of another type) leaves the device out with the error text. KEYS per device: token, alerts stream, health
# hash, per stream (stream, state hash), per alerts entry its dedup key. ARGV: one MessagePack array (one argument
# to encode, not ~16 per device), {group, member, state ttl s, dedup ttl s, alerts maxlen, devices}, a device
# {streams, entries, health fields}, a stream {its state's field/value pairs, the ids to acknowledge}, an entry its
# field/value pairs, a health field {field, value}. Returns, packed with MessagePack, per device 0, the error text,
# or per entry its id in the device's alerts stream (false: emitted before).
COMMIT = """
local p = cmsgpack.unpack(ARGV[1])
local group, member, state_ttl, dedup_ttl, maxlen = p[1], p[2], p[3], p[4], p[5]
local out, k = {}, 1
for _, device in ipairs(p[6]) do
  local streams, emits, fields = device[1], device[2], device[3]
  local token, alerts, health, first = KEYS[k], KEYS[k + 1], KEYS[k + 2], k + 3
  k = first + 2 * #streams + #emits
  local held, failed, ids = redis.call('GET', token) == member, nil, {}
  local function write(...)
    if held and not failed then
      local r = redis.pcall(...)
      if type(r) == 'table' and r.err then failed = r.err end
      return r
    end
  end
  for s, stream in ipairs(streams) do
    local key, state = KEYS[first + 2 * s - 2], KEYS[first + 2 * s - 1]
    write('HSET', state, unpack(stream[1]))
    write('EXPIRE', state, state_ttl)
    if #stream[2] > 0 then write('XACK', key, group, unpack(stream[2])) end
  end
  for e, entry in ipairs(emits) do
    if write('SET', KEYS[first + 2 * #streams + e - 1], '1', 'NX', 'EX', dedup_ttl) then
      ids[#ids + 1] = write('XADD', alerts, 'MAXLEN', '~', maxlen, '*', unpack(entry))
      write('EXPIRE', alerts, dedup_ttl)
    else
      ids[#ids + 1] = false
    end
  end
  for _, f in ipairs(fields) do
    if f[2] == '' then write('HDEL', health, f[1]) else write('HSET', health, f[1], f[2]) end
  end
  write('EXPIRE', token, state_ttl)
  if not held then
    out[#out + 1] = 0
  elseif failed then
    out[#out + 1] = failed
  else
    out[#out + 1] = ids
  end
end
return cmsgpack.pack(out)
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
    """How one matcher reads the streams of the devices it owns, keeps its state and backs off; checked when
    built."""

    group: str = DEFAULT_GROUP  # consumer group on every embedding stream; the matchers sharing the streams
    consumer: str = DEFAULT_CONSUMER  # this matcher's name in the group: unique, and stable across restarts
    devices: str = "*"  # glob of the devices whose streams this matcher reads
    start_id: str = field(default_factory=now_id)  # where groups this matcher creates start
    read_count: int = 256  # entries per stream per read
    batch_entries: int = 4_096  # entries per step in all (one per stream at least): a step's time and memory
    # wait after a step that read nothing: an idle matcher polls the registry this often, and an entry written
    # meanwhile waits up to this long (a step that read entries is followed at once: no wait under load)
    block_ms: int = 50
    reload_s: float = 1.0  # query version poll (pub/sub notifications reload at once)
    discover_s: float = 2.0  # heartbeat, membership, idle streams, health; every polled stream is read then
    member_ttl_s: float = 10.0  # a matcher silent this long leaves its group: the others take its devices
    dedup_ttl_s: int = 7 * 86400  # life of a bindstream:alerted:* key
    alerts_maxlen: int = 100_000  # of bindstream:alerts, approximate (MAXLEN ~)
    device_alerts_maxlen: int = 1_000  # of each bindstream:alerts:{<device>}, approximate: alerts not yet copied
    event_ttl_s: int = 7 * 86400  # life of a bindstream:event:* record after its last change (and of its index entry)
    max_event_s: float = MAX_EVENT_S  # an event ends this long (device time) after its start; the query stays disarmed
    silence_s: float = 30.0  # a stream whose last entry is this old (server clock) raises a health event
    health_commit: int = 100  # devices whose health changes one script commits (each change ~0.2 ms of Redis)
    retry_max_s: float = 2.0  # backoff cap while Redis fails
    state_ttl_s: int = 86_400  # a state hash, and a device's token, expire this long after the device's last commit
    idle_s: float = 60.0  # a stream without a new entry this long is no longer polled (its next entry brings it back)
    max_streams: int = 10_000  # streams polled at once; more with unread entries are refused (counted) meanwhile
    max_idle: int = 100_000  # idle streams whose read position is kept (and whose health is watched)
    sweep_chunk: int = 1_000  # devices per read or commit script, streams per health script
    max_logged: int = 1_000  # (reason, device or query) pairs warned about in the log; later ones are only counted
    baseline_streams: int = 10_000  # streams whose example-query estimates stay in memory; least recently used go
    autostart: bool = False  # start the run loop's thread in the constructor (actors: also after a restart)

    def __post_init__(self):
        check_group(self.group)
        try:
            id_tuple(self.start_id)  # discovery compares stream ids with it
        except ValueError as err:
            raise ValueError(f"start_id {self.start_id!r} must be a stream id: 0 or ms-seq") from err
        for name in (
            "read_count",
            "batch_entries",
            "state_ttl_s",
            "max_streams",
            "max_idle",
            "sweep_chunk",
            "baseline_streams",
            "device_alerts_maxlen",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.idle_s > 0 or not self.member_ttl_s > self.discover_s:
            raise ValueError(
                f"idle_s ({self.idle_s}) must be > 0, member_ttl_s ({self.member_ttl_s}) > discover_s "
                f"({self.discover_s}): a member heartbeats at every discovery"
            )
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


@dataclass
class DeviceCommit:
    """What one commit writes for one device: per stream its state fields and the ids to acknowledge, its alerts
    entries, and the fields of its health hash (None: deleted)."""

    streams: dict[str, tuple[dict[str, str], list[str]]] = field(default_factory=dict)
    emits: list[Emit] = field(default_factory=list)
    silences: dict[str, str | None] = field(default_factory=dict)


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
    """Reads the embedding streams of the devices it owns (shards.py) through a consumer group, scores, decides,
    and commits per device, in one script per hash slot, the new decision state, the events' alerts entries and
    the acknowledgements; copies the alerts entries to bindstream:alerts (fanin.py); at each discovery, commits
    the health events of its streams (`HealthWatch`, health.py)."""

    def __init__(self, settings: MatcherSettings, redis_url: str):
        s = self.settings = settings
        self.client = connect(redis_url)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(QUERY_CHANNEL)
        self.claim = self.client.register_script(CLAIM)
        self.read = self.client.register_script(READ)
        self.commit = self.client.register_script(COMMIT)
        self.grow = self.client.register_script(GROW_EVENT)
        self.metrics = StageMetrics("match")
        self.members = Membership(self.client, s.group, s.consumer, int(s.member_ttl_s * 1000))
        self.fanin = FanIn(self.client, s.alerts_maxlen, s.event_ttl_s, s.read_count, self.metrics)
        self.cursor = 0.0  # the highest registry score read: news are the streams scored above it
        # polled stream key -> (monotonic time of its last entry or of its join, last id delivered to the group)
        self.active: dict[str, tuple[float, str]] = {}
        self.idle: dict[str, str] = {}  # stream key no longer polled -> last id delivered to the group
        self.waiting: dict[str, None] = {}  # idle streams with unread entries, refused for want of room
        self.retry: set[str] = set()  # polled streams to read at the next step: a full read, or a failed commit
        self.held: set[str] = set()  # devices whose token this matcher took
        self.lost: dict[
            str, float
        ] = {}  # device whose token another took -> when (monotonic): not taken back for discover_s
        self.rebalance_due = True  # read the whole registry at the next discovery (first, and after a change)
        self.grows: list[tuple[str, OpenEvent]] = []  # open events to extend once the batch's alerts are copied
        self.indexes: dict[tuple[str, str], ModalityIndex] = {}
        self.rules: dict[tuple[str, str], Rules] = {}  # the decision settings of each index's queries
        self.query_ids: set[str] = set()  # of the queries in `indexes`
        self.rejected: dict[tuple[str, str], str] = {}  # (event, query id or model/modality) -> why, at last reload
        self.states: dict[str, StreamState] = {}  # polled stream key -> state
        self.health = HealthWatch(self.client, s.group, s.silence_s, s.sweep_chunk, s.max_idle, self.metrics)
        self.baselines = Baselines(s.baseline_streams)  # example queries' running estimates (scoring.py)
        self._warn_once = WarnOnce(log, s.max_logged)
        self.version: bytes | None = None
        self.next_reload = self.next_discover = 0.0
        self.last_error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if s.autostart:
            self.start()

    # ----- queries -----

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

    # ----- devices and streams -----

    def _mine(self, key: str) -> str | None:
        """The device of `key` when this matcher reads it: the stream of a query modality, of a device matching
        `devices` that this matcher owns in its view of the group; else None."""
        try:
            device, modality = parse_key(key)
        except BadRecord:
            return None
        if modality in QUERY_MODALITIES and fnmatchcase(device, self.settings.devices) and self.members.owns(device):
            return device
        return None

    def discover(self) -> None:
        """Heartbeat; after a change of the group's members (and at the first discovery) find this matcher's
        streams in the registry, let go of the devices it no longer owns and take the new ones; stop polling the
        streams without a new entry for `idle_s` (once none has a batch to read again); poll the refused streams
        there is room for now; then check the health of every stream it knows, polled or not (`_check_health`)."""
        s = self.settings
        now = time.monotonic()
        self.lost = {d: t for d, t in self.lost.items() if now - t < s.discover_s}
        if self.members.refresh() or self.rebalance_due:
            self.metrics.count("rebalance")
            self._rebalance()
        if not self.retry:  # streams of a batch to read again stay polled
            for key in [k for k, (seen, _) in self.active.items() if now - seen > s.idle_s]:
                self._let_go(key)
        for key in list(self.waiting):
            if len(self.active) >= s.max_streams:
                break
            self._poll(key, self.idle.pop(key, "0-0"), now)
        self._check_health({k: p for k, (_, p) in self.active.items()} | self.idle, set(self.waiting))

    def _rebalance(self) -> None:
        """Read the whole registry: let go of the devices this matcher no longer owns, take those it owns now."""
        self.rebalance_due, self.lost = False, {}
        rows = self.client.zrange(STREAM_REGISTRY, 0, -1, withscores=True)
        self.cursor = max([self.cursor, *(score for _, score in rows)])
        known = {parse_key(k)[0] for k in [*self.active, *self.idle]} | self.held
        self._drop_devices({d for d in known if not self.members.owns(d)})
        mine: dict[str, list[str]] = defaultdict(list)
        for raw, _ in rows:
            key = raw.decode(errors="replace")
            device = self._mine(key)
            if device is not None and key not in self.active and key not in self.idle:
                mine[device].append(key)
        self._claim(mine)

    def _news(self) -> set[str]:
        """The polled streams of this matcher with entries written since the last look (the registry's members
        scored above `cursor`); streams new to it (a new device, a device it took) are taken first, and idle ones
        that got an entry polled again, or refused (`refused_stream_cap`) while `max_streams` are."""
        rows = self.client.zrangebyscore(STREAM_REGISTRY, f"({self.cursor!r}", "+inf", withscores=True)
        news, fresh = set(), defaultdict(list)
        now = time.monotonic()
        for raw, score in rows:
            self.cursor = max(self.cursor, score)
            key = raw.decode(errors="replace")
            device = self._mine(key)
            if device is None:
                continue
            if key in self.active:
                news.add(key)
            elif key in self.idle and device in self.held:
                if self._poll(key, self.idle[key], now):
                    news.add(key)
            elif now - self.lost.get(device, -math.inf) >= self.settings.discover_s:
                fresh[device].append(key)
        return news | self._claim(fresh)

    def _claim(self, streams: dict[str, list[str]]) -> set[str]:
        """Take the token of each device and its streams (shards.CLAIM: the pending entries of the group move to
        this matcher); returns the streams it polls now (those with unread or pending entries, while there is
        room). A device taken may hold alerts entries not copied yet (fanin.py): they are copied next."""
        s = self.settings
        devices = [d for d, keys in streams.items() if keys]
        calls = [
            (
                self.claim,
                [owner_key(s.group, d), *streams[d]],
                [s.group, s.consumer, s.start_id, s.state_ttl_s, s.read_count],
            )
            for d in devices
        ]
        polled, now = set(), time.monotonic()
        failed = None
        for device, result in zip(devices, run_scripts(self.client, calls)):
            if isinstance(result, Exception):
                failed = failed or result
                continue
            if device not in self.held:
                self.held.add(device)
                self.fanin.due.add(device)
                self.metrics.count("device_taken")
            for key, found in zip(streams[device], result):
                self.states.pop(key, None)  # another matcher may have committed since: read the state afresh
                if found is None:  # no such stream (any more)
                    self.active.pop(key, None)
                    self.idle.pop(key, None)
                    continue
                position, unread = text(found[0]), bool(found[1])
                if unread and self._poll(key, position, now):
                    polled.add(key)
                elif key not in self.active:
                    self._remember_idle(key, position)
        if failed is not None:
            raise failed
        return polled

    def _poll(self, key: str, position: str, now: float) -> bool:
        """Poll `key` (last delivered id `position`) if there is room, else keep it waiting and count
        `refused_stream_cap`; whether it is polled."""
        if key in self.active:
            return True
        if len(self.active) >= self.settings.max_streams:
            if key not in self.waiting:
                self.metrics.count("refused_stream_cap", parse_key(key)[0])
                self._warn_once("refused_stream_cap", "", f"{key} and maybe others: {len(self.active)} streams polled")
            self.waiting[key] = None
            self._remember_idle(key, position)
            return False
        self.waiting.pop(key, None)
        self.idle.pop(key, None)
        self.active[key] = (now, position)
        return True

    def _remember_idle(self, key: str, position: str) -> None:
        """Keep an unpolled stream's last delivered id (at most `max_idle` of them; a stream forgotten comes back
        with its next entry)."""
        if key in self.idle or len(self.idle) < self.settings.max_idle:
            self.idle[key] = position

    def _let_go(self, key: str) -> None:
        """Stop polling an idle stream and drop what is kept of it in memory but its position (its state
        hash stays in Redis until it expires); its next entry brings it back."""
        self._remember_idle(key, self.active.pop(key)[1])
        self.states.pop(key, None)
        device, modality = parse_key(key)
        for (_, index_modality), index in self.indexes.items():
            if index_modality == modality:
                index.forget(device)

    def _drop_devices(self, devices: set[str]) -> None:
        """Forget devices another matcher reads now: their streams, their states, tokens and health (one pass
        over what is kept, however many devices go)."""
        if not devices:
            return
        for key in [k for k in [*self.active, *self.idle, *self.waiting] if parse_key(k)[0] in devices]:
            if key in self.active:
                self._let_go(key)
            self.idle.pop(key, None)
            self.waiting.pop(key, None)
            self.retry.discard(key)
        self.held -= devices
        self.fanin.due -= devices
        self.health.forget(devices)

    def _lose(self, devices: set[str]) -> None:
        """Another matcher took these devices' tokens: let them go, and look at the group's members at the next
        step (a member came, most likely). Their news are not taken for `discover_s` (unless the members change),
        so that two views of the group do not take a device from each other at every step."""
        if not devices:
            return
        self._drop_devices(devices)
        self.lost |= dict.fromkeys(devices, time.monotonic())
        self.next_discover = 0.0
        self.metrics.count("device_lost", n=len(devices))

    # ----- one cycle -----

    def step(self) -> int:
        """Reload queries and discover when due, read the polled streams with news (all of them after a
        discovery), score, decide, commit, copy the alerts entries. Returns the number of entries read (0:
        nothing new; the step then waits `block_ms`, or until `stop`)."""
        self._maybe_reload()
        now = time.monotonic()
        keys = set(self.retry)
        if now >= self.next_discover:
            self.next_discover = now + self.settings.discover_s
            self.discover()
            keys |= set(self.active)
        keys |= self._news()
        entries = self._read(keys)
        if entries:
            self._process(entries)
        self.fanin.copy()
        self._grow()
        if not entries:
            self._stop.wait(self.settings.block_ms / 1000)
        return len(entries)

    def _read(self, keys: set[str]) -> list[tuple[str, str, dict | None]]:
        """One READ per hash slot of the devices of `keys` (polled streams) and `sweep_chunk` devices: each
        stream's pending entries of this consumer, then new ones, `read_count` at most, and `batch_entries` in all
        (each stream one at least, a script its share by its streams; streams beyond `batch_entries` wait for the
        next step); a stream that may have more is read again at the next step. A device whose token another took
        is let go (`_lose`); a stream whose group or key vanished sends the matcher back to the registry."""
        s = self.settings
        by_device: dict[str, list[str]] = defaultdict(list)
        polled = sorted(k for k in keys if k in self.active)
        polled, later = polled[: s.batch_entries], polled[s.batch_entries :]  # one entry a stream at least
        for key in polled:
            by_device[parse_key(key)[0]].append(key)
        tokens = {owner_key(s.group, d): d for d in by_device}
        calls, order = [], []
        for group in slot_groups(self.client, tokens, s.sweep_chunk):
            devices = [tokens[t] for t in group]
            keys_of = [k for d in devices for k in (owner_key(s.group, d), *by_device[d])]
            counts = [len(by_device[d]) for d in devices]
            budget = s.batch_entries * sum(counts) // len(polled)
            calls.append((self.read, keys_of, [s.group, s.consumer, s.read_count, budget, *counts]))
            order.append(devices)
        out: list[tuple[str, str, dict | None]] = []
        failed = None
        self.retry = set(later)
        lost: set[str] = set()
        for devices, result in zip(order, run_scripts(self.client, calls)):
            if isinstance(result, Exception):
                failed = failed or result
                continue
            for device, got in zip(devices, read_reply(result)):
                if got == 0:
                    lost.add(device)
                    continue
                for key, read in zip(by_device[device], got):
                    if read == 0:
                        self.rebalance_due, self.next_discover = True, 0.0
                        self.active.pop(key, None)
                        continue
                    more, entries = read
                    out += [(key, entry_id, fields) for entry_id, fields in stream_entries(entries)]
                    if more:
                        self.retry.add(key)
        self._lose(lost)
        if failed is not None:
            self.retry = set(keys) & set(self.active)
            raise failed
        return out

    def _process(self, entries: list[tuple[str, str, dict | None]]) -> None:
        """Score and decide one batch and commit it. An entry that cannot be used is acknowledged and
        counted (`rejected_{reason}` per device) without touching the others; a failure while deciding one
        stream's entries drops those entries only (`rejected_error`). Counts are applied per device once its
        part of the batch is committed, so a batch read again after a failed commit is counted once."""
        tallies: dict[str, Counter] = defaultdict(Counter)  # device -> (event, label) -> n
        acks: dict[str, list[str]] = defaultdict(list)
        groups: dict[tuple[str, str], list[EmbeddingRecord]] = defaultdict(list)
        now = time.monotonic()
        for key, entry_id, f in entries:
            acks[key].append(entry_id)
            tally = tallies[parse_key(key)[0]]
            r = self._record(key, entry_id, f, tally)
            if r is not None:
                tally["in", r.modality] += 1
                groups[r.model, r.modality].append(r)
        emits: dict[str, list[Emit]] = defaultdict(list)  # by device
        changed: dict[str, dict[str, QueryState]] = defaultdict(dict)
        open_events: dict[str, list[tuple[str, OpenEvent]]] = defaultdict(list)  # by device: (event id, event)
        for (model, modality), records in groups.items():
            index = self.indexes.get((model, modality))
            if index is None:
                for r in records:
                    tallies[r.device]["no_query", modality] += 1
                continue
            fit = []
            for r in records:
                if r.emb.shape[0] == index.dim:
                    fit.append(r)
                else:
                    tallies[r.device]["rejected_wrong_dim", r.device] += 1
                    self._warn_once(
                        "rejected_wrong_dim",
                        r.device,
                        f"{r.stream} {r.id}: dim {r.emb.shape[0]}, the {model} queries have {index.dim}",
                    )
            if not fit:
                continue
            scores = index.scores(fit, self.baselines)  # example queries' estimates, min_dbfs gates
            rows: dict[str, list[int]] = defaultdict(list)
            for i, r in enumerate(fit):
                rows[r.stream].append(i)
                tallies[r.device]["scored", modality] += 1
            for stream, idx in rows.items():
                device = fit[idx[0]].device
                try:  # the stream states were loaded by _record: no Redis call here
                    new_emits, new_states, new_open = self._decide(
                        index, self.rules[model, modality], [fit[i] for i in idx], scores[idx]
                    )
                except Exception as err:
                    tallies[device]["rejected_error", device] += len(idx)
                    self._warn_once("rejected_error", device, f"deciding {stream}: {err!r}")
                    continue
                emits[device] += new_emits
                changed[stream].update(new_states)
                open_events[device] += new_open.items()
        commits: dict[str, DeviceCommit] = defaultdict(DeviceCommit)
        last_ids = {key: max(ids, key=id_tuple) for key, ids in acks.items()}
        for key, ids in acks.items():
            states = {qid: st.encode() for qid, st in changed.get(key, {}).items()}
            commits[parse_key(key)[0]].streams[key] = ({LAST_ID_FIELD: last_ids[key], **states}, ids)
        for device, device_emits in emits.items():
            commits[device].emits = device_emits
        results = self._commit(commits)
        committed: Counter = Counter()  # (event, label) -> n of the devices committed
        for device, result in results.items():
            streams = commits[device].streams
            if isinstance(result, Exception):
                self.retry |= streams.keys() & self.active.keys()
                continue
            for key in streams:
                if key in self.active:
                    self.active[key] = (now, last_ids[key])
                state = self._stream_state(key)
                state.last_id = last_ids[key]
                state.queries.update(changed.get(key, {}))
            self._count_emits(commits[device].emits, result)
            self.grows += open_events.get(device, [])
            committed.update(tallies[device])
        for (event, label), n in committed.items():
            self.metrics.count(event, label, n)
        self._raise_first(results.values())

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

    def _commit(self, commits: dict[str, DeviceCommit]) -> dict[str, list | Exception]:
        """COMMIT the devices' parts, one script per hash slot and `sweep_chunk` devices, in one round trip per
        node: per device the ids of its new alerts entries (None: emitted before), or the error that kept its part
        out (it is read again). A device whose token another took is let go (`_lose`) and left out."""
        s = self.settings
        tokens = {owner_key(s.group, d): d for d in commits}
        calls, order = [], []
        for group in slot_groups(self.client, tokens, s.sweep_chunk):
            keys: list[str] = []
            parts: list = []
            devices = [tokens[t] for t in group]
            for device in devices:
                c = commits[device]
                keys += [owner_key(s.group, device), device_alerts_key(device), health_key(s.group, device)]
                streams = []
                for stream, (fields, ids) in c.streams.items():
                    keys += [stream, state_key(s.group, stream)]
                    streams.append([[x for item in fields.items() for x in item], ids])
                entries = []
                for x in c.emits:
                    a = x.alert
                    keys.append(dedup_key(a.query, a.source, a.source_id, a.state))
                    entries.append([v for item in encode_device_alert(a, x.record).items() for v in item])
                silences = [[stream, "" if value is None else value] for stream, value in c.silences.items()]
                parts.append([streams, entries, silences])
            args = [msgpack.packb([s.group, s.consumer, s.state_ttl_s, s.dedup_ttl_s, s.device_alerts_maxlen, parts])]
            calls.append((self.commit, keys, args))
            order.append(devices)
        out: dict[str, list | Exception] = {}
        lost: set[str] = set()
        for devices, result in zip(order, run_scripts(self.client, calls)):
            replies = [result] * len(devices) if isinstance(result, Exception) else msgpack.unpackb(result, raw=True)
            for device, got in zip(devices, replies):
                if got == 0:
                    lost.add(device)
                elif isinstance(got, bytes):
                    out[device] = redis.ResponseError(f"committing device {device}: {got.decode(errors='replace')}")
                else:
                    out[device] = [None if x is False else x for x in got]
        self._lose(lost)
        return out

    def _raise_first(self, results) -> None:
        failed = next((r for r in results if isinstance(r, Exception)), None)
        if failed is not None:
            raise failed

    def _grow(self) -> None:
        """Extend the records of the open events the last batches' windows extended (once their starts are
        copied: the record exists then), while the records exist."""
        grows, self.grows = self.grows, []
        s = self.settings
        calls = [(self.grow, [event_key(eid)], [s.event_ttl_s, *grown(e)]) for eid, e in dict(grows).items()]
        self._raise_first(run_scripts(self.client, calls))

    def _count_emits(self, emits: list[Emit], results: list) -> None:
        """Count committed alerts entries: `duplicate_alert` (per modality) for one written before; per
        modality `event_start|update|end` of query events, with `alert` and the latency for their starts; per
        device `health_start|end` of health events. A device with a new entry has it copied (fanin.py)."""
        done_ms = time.time_ns() / 1e6
        for x, result in zip(emits, results):
            a = x.alert
            if result is None:
                self.metrics.count("duplicate_alert", a.modality)
                continue
            self.fanin.due.add(a.device)
            if a.kind == HEALTH_EVENT:
                self.metrics.count(f"health_{a.state}", a.device)
            else:
                self.metrics.count(f"event_{a.state}", a.modality)
                if a.state == START:
                    self.metrics.count("alert", a.modality)
                    self.metrics.latency((done_ms - id_tuple(a.source_id)[0]) / 1000)

    # ----- device health -----

    def _check_health(self, positions: dict[str, str], unread: set[str]) -> None:
        """Commit the health watch's changes (`HealthWatch.check` of `positions`, the last entries the group
        delivered of each stream, and `unread`, those known to have newer ones): per device its alerts entries and
        its silences kept or dropped, `health_commit` devices a script, so that a mass silence (a network outage)
        does not hold Redis in one long one."""
        s = self.settings
        by_device: dict[str, list[HealthChange]] = defaultdict(list)
        for c in self.health.check(positions, unread):
            by_device[parse_key(c.stream)[0]].append(c)
        devices = list(by_device)
        for i in range(0, len(devices), s.health_commit):
            commits = {}
            for device in devices[i : i + s.health_commit]:
                changes = by_device[device]
                commits[device] = DeviceCommit(
                    emits=[
                        event_emit(c.record, c.state, c.source_id, c.score, s.silence_s, c.t0, c.t1) for c in changes
                    ],
                    silences={c.stream: encode_silence(*c.silence) if c.silence else None for c in changes},
                )
            results = self._commit(commits)
            for device, result in results.items():
                if not isinstance(result, Exception):
                    self.health.applied(by_device[device])
                    self._count_emits(commits[device].emits, result)
            self._raise_first(results.values())

    # ----- running -----

    def run(self) -> None:
        """`step` until `stop`, heartbeating from a thread meanwhile; errors back off and the batches that did not
        commit are read again."""
        s = self.settings
        beat = threading.Thread(
            target=self.members.beat, args=(min(s.discover_s, s.member_ttl_s / 3), self._stop), daemon=True
        )
        beat.start()
        repeat_until_stopped(self.step, self._stop, s.retry_max_s, self._failed)

    def _failed(self, err: Exception) -> None:
        """Redis down, or a bad query/background/state record: count it, and keep matching."""
        self.metrics.count("redis_error" if isinstance(err, redis.RedisError) else "error")
        self.last_error = str(err)
        if not isinstance(err, redis.RedisError):
            log.exception("matching failed; retrying")
        self.retry |= self.active.keys()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="matcher", daemon=True)
        self._thread.start()

    def stop(self) -> dict:
        """Stop the loop and leave the group: the other matchers take this one's devices at their next discovery."""
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.pubsub.close()
        try:
            self.members.leave()
        except redis.RedisError as err:  # Redis down: the member expires after member_ttl_s instead
            log.warning("leaving the group: %s", err)
        return self.stats()

    def stats(self) -> dict:
        return self.metrics.snapshot(
            streams=len(self.active),
            devices=len(self.held),
            members=len(self.members.members),
            queries=sum(i.m for i in self.indexes.values()),
            pending=bool(self.retry),
            last_error=self.last_error,
        )


def grown(e: OpenEvent) -> list:
    """The field/value pairs by which an open event's record grows."""
    return [x for name in GROW_FIELDS for x in (name, getattr(e, name))]


def start_matchers(
    settings: MatcherSettings, redis_url: str, count: int = 1, max_restarts: int = -1, num_cpus: float = 0
) -> list:
    """`count` matcher actors sharing the streams (members `{settings.consumer}-{i}` of the group), running from
    construction and restarted by Ray (up to `max_restarts`, -1: always) with the same settings after a crash.
    Each scores on one core: its BLAS runs one thread (more only add latency)."""
    return [
        ray.remote(Matcher)
        .options(max_restarts=max_restarts, num_cpus=num_cpus, runtime_env={"env_vars": ONE_BLAS_THREAD})
        .remote(replace(settings, consumer=f"{settings.consumer}-{i}", autostart=True), redis_url)
        for i in range(count)
    ]
