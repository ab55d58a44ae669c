"""The matcher: scores every embedding against the standing queries and turns scores into alerts.

A plain class (`Matcher(settings, redis_url)`: `step()` for one read-score-commit cycle, `run()` to loop)
that also runs as a restartable Ray actor (`start_matchers`). ALERTS.md describes the decision rule, the
state kept in Redis and the delivery guarantees.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields, replace
from fnmatch import fnmatchcase

import numpy as np
import ray
import redis

from sensors.protocol import NS_PER_S

from .queries import QUERY_CHANNEL, QUERY_VERSION, Background, Query, load_background, load_queries
from .records import text
from .stage import StageMetrics
from .subscriber import BadRecord, EmbeddingRecord, decode_record, parse_key, stream_keys

log = logging.getLogger(__name__)

ALERTS_STREAM = "bindstream:alerts"
ALERTS_CHANNEL = "bindstream:alerts"
STATE_PREFIX = "bindstream:alertstate"
DEDUP_PREFIX = "bindstream:alerted"
DEFAULT_GROUP = "bindstream-matchers"
DEFAULT_CONSUMER = "matcher"
NEVER_NS = -(1 << 62)  # "no alert yet": any device time is more than a cooldown after it
LAST_ID_FIELD = "last_id"  # in a stream's state hash; every other field is a query id
ONE_BLAS_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
UNIT_TOLERANCE = 0.01  # |norm - 1| of a stored embedding (bf16 encoders normalise to ~0.4 %)

# One alert, exactly once per (query, source entry): SET NX the dedup key, and only if it was not there
# XADD the alert and PUBLISH it (as JSON with the alert's id). KEYS: dedup key, alerts stream.
# ARGV: dedup ttl s, alerts maxlen, channel, then the alert's field/value pairs.
EMIT_ALERT = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return false
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 4))
local msg = {id = id}
for i = 4, #ARGV, 2 do msg[ARGV[i]] = ARGV[i + 1] end
redis.call('PUBLISH', ARGV[3], cjson.encode(msg))
return id
"""


def now_id() -> str:
    """A stream id at the current time: a group created there skips everything older."""
    return f"{time.time_ns() // 1_000_000}-0"


def is_unit(v: np.ndarray) -> bool:
    """A finite unit-norm vector, as every stored embedding must be."""
    norm = float(np.linalg.norm(v))
    return np.isfinite(norm) and abs(norm - 1) <= UNIT_TOLERANCE


def id_tuple(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def state_key(group: str, stream: str) -> str:
    return f"{STATE_PREFIX}:{group}:{stream}"


def dedup_key(query_id: str, stream: str, entry_id: str) -> str:
    return f"{DEDUP_PREFIX}:{query_id}:{stream}:{entry_id}"


@dataclass(frozen=True)
class MatcherSettings:
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
    retry_max_s: float = 2.0  # backoff cap while Redis fails
    autostart: bool = False  # start the run loop's thread in the constructor (actors: also after a restart)

    def __post_init__(self):
        if not 0 <= self.shard < self.shards:
            raise ValueError(f"shard {self.shard} must lie in [0, shards={self.shards})")


@dataclass
class Alert:
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
    id: str = ""  # entry id in the alerts stream, once read back

    def fields(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items() if k != "id"}

    @classmethod
    def from_entry(cls, entry_id, raw: dict) -> "Alert":
        f = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
             for k, v in raw.items()}
        types = {x.name: x.type for x in fields(cls)}
        values = {k: (float(v) if types[k] == "float" else int(v) if types[k] == "int" else v)
                  for k, v in f.items() if k in types}
        return cls(**values, id=entry_id.decode() if isinstance(entry_id, bytes) else entry_id)


@dataclass(frozen=True)
class QueryState:
    """What the decision remembers per (stream, query): the last n windows' above-threshold bits, whether
    it is armed, and the device time of its last alert."""

    hist: int = 0
    armed: bool = True
    last_alert_ns: int = NEVER_NS

    def encode(self) -> str:
        return f"{self.hist}:{int(self.armed)}:{self.last_alert_ns}"

    @classmethod
    def decode(cls, text: str) -> "QueryState":
        hist, armed, last_alert = text.split(":")
        return cls(int(hist), armed == "1", int(last_alert))


INITIAL_STATE = QueryState()


@dataclass
class StreamState:
    """A stream's decision state: the last entry applied (older ones are replays and are skipped) and
    each query's state. Stored as the hash bindstream:alertstate:{group}:{stream}: field `last_id`, and
    one field per query id."""

    last_id: str = "0-0"
    queries: dict[str, QueryState] = field(default_factory=dict)

    @classmethod
    def decode(cls, raw: dict) -> "StreamState":
        f = {text(k): text(v) for k, v in raw.items()}
        last_id = f.pop(LAST_ID_FIELD, "0-0")
        return cls(last_id, {qid: QueryState.decode(v) for qid, v in f.items()})


class ModalityIndex:
    """The active queries of one (model, modality) and its background, as one matrix to score against."""

    def __init__(self, queries: list[Query], background: Background):
        self.queries = queries
        self.m = len(queries)
        q = np.stack([x.emb for x in queries])
        self.weights_t = np.ascontiguousarray(np.vstack([q, background.emb]).T)  # (dim, m + b)
        self.include = (q @ background.emb.T < background.exclude_cos).T.astype(np.float64)  # (b, m)
        self.scale = background.logit_scale
        d = [x.decision for x in queries]
        self.threshold = np.array([x.threshold for x in d])
        self.rearm_below = self.threshold - np.array([x.hysteresis for x in d])
        self.k = np.array([x.k for x in d])
        self.nmask = np.array([(1 << x.n) - 1 for x in d], dtype=np.uint64)
        self.cooldown_ns = np.array([int(x.cooldown_s * NS_PER_S) for x in d], dtype=np.int64)
        self._columns: dict[str, np.ndarray] = {}

    @property
    def dim(self) -> int:
        return self.weights_t.shape[0]

    def shares(self, x: np.ndarray) -> np.ndarray:
        """(N, dim) unit embeddings -> (N, m) calibrated scores: each query's softmax share among itself and
        the background prompts not too close to it, at logit scale `scale`. One matrix product."""
        z = (x @ self.weights_t).astype(np.float64) * self.scale
        zq, zb = z[:, : self.m], z[:, self.m :]
        top = zb.max(axis=1, keepdims=True)
        background = np.exp(zb - top) @ self.include  # (N, m) sum of exp over each query's background
        with np.errstate(divide="ignore", over="ignore"):
            return 1.0 / (1.0 + np.exp(np.log(background) + top - zq))

    def columns(self, device: str) -> np.ndarray:
        """Indices of the queries that watch `device`."""
        if device not in self._columns:
            self._columns[device] = np.array(
                [i for i, q in enumerate(self.queries) if fnmatchcase(device, q.device)], dtype=np.intp)
        return self._columns[device]


def build_indexes(queries: list[Query], backgrounds: dict[tuple[str, str], Background | None],
                  metrics: StageMetrics | None = None) -> dict[tuple[str, str], ModalityIndex]:
    """One ModalityIndex per (model, modality) that has queries and a background of their dimension; a
    query that every background prompt is too close to (it would always score 1) is left out too."""
    groups: dict[tuple[str, str], list[Query]] = defaultdict(list)
    for q in queries:
        groups[q.model, q.modality].append(q)
    out = {}
    for key, qs in groups.items():
        bg = backgrounds.get(key)
        usable = [q for q in qs if bg is not None and q.emb.shape[0] == bg.emb.shape[1]
                  and (bg.emb @ q.emb < bg.exclude_cos).any()]
        if metrics and len(usable) < len(qs):
            metrics.count("no_background", key[1], n=len(qs) - len(usable))
        if usable:
            out[key] = ModalityIndex(usable, bg)
    return out


class Matcher:
    """Reads the embedding streams of its shard through a consumer group, scores, decides, and commits
    the new decision state, the alerts and the acknowledgements in one Redis transaction."""

    def __init__(self, settings: MatcherSettings, redis_url: str):
        self.settings = settings
        self.client = redis.Redis.from_url(redis_url)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(QUERY_CHANNEL)
        self.emit = self.client.register_script(EMIT_ALERT)
        self.metrics = StageMetrics("match")
        self.keys: list[str] = []
        self.seen_keys: set[str] = set()
        self.pending = True  # first drain this consumer's delivered-but-unacknowledged entries
        self.indexes: dict[tuple[str, str], ModalityIndex] = {}
        self.states: dict[str, StreamState] = {}  # stream key -> state
        self.version: bytes | None = None
        self.next_reload = self.next_discover = 0.0
        self.last_error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if settings.autostart:
            self.start()

    # ----- queries and streams -----

    def reload(self) -> None:
        """Rebuild the score matrices from the queries and backgrounds in Redis."""
        self.version = self.client.get(QUERY_VERSION)
        queries = load_queries(self.client)
        keys = {(q.model, q.modality) for q in queries}
        self.indexes = build_indexes(queries, {k: load_background(self.client, *k) for k in keys}, self.metrics)
        active = {q.id for index in self.indexes.values() for q in index.queries}
        for stream, state in self.states.items():
            gone = [qid for qid in state.queries if qid not in active]
            for qid in gone:
                del state.queries[qid]
            if gone:
                self.client.hdel(state_key(self.settings.group, stream), *gone)

    def _maybe_reload(self) -> None:
        notified = False
        while self.pubsub.get_message(timeout=0) is not None:
            notified = True
        now = time.monotonic()
        if notified or now >= self.next_reload:
            self.next_reload = now + self.settings.reload_s
            if notified or self.version is None or self.client.get(QUERY_VERSION) != self.version:
                self.reload()

    def discover(self) -> None:
        """Join the consumer group on this shard's streams not yet known (new devices)."""
        s = self.settings
        for key in stream_keys(self.client, s.devices):
            if key in self.seen_keys:
                continue
            self.seen_keys.add(key)
            try:
                parse_key(key)
            except BadRecord:
                continue
            if zlib.crc32(key.encode()) % s.shards != s.shard:
                continue
            try:
                self.client.xgroup_create(key, s.group, id=s.start_id)
            except redis.ResponseError as err:
                if "BUSYGROUP" not in str(err):
                    raise
            self.keys.append(key)

    def forget_streams(self) -> None:
        """After a stream or its group vanished: find the streams again, and re-read pending entries."""
        self.keys, self.seen_keys, self.pending = [], set(), True
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
        if not self.keys:
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
        reply = self.client.xreadgroup(s.group, s.consumer, {k: marker for k in self.keys}, count=s.read_count,
                                       block=block_ms)
        return [(text(key), text(entry_id), f) for key, items in reply or [] for entry_id, f in items]

    def _process(self, entries: list[tuple[str, str, dict | None]]) -> None:
        acks: dict[str, list[str]] = defaultdict(list)
        groups: dict[tuple[str, str], list[EmbeddingRecord]] = defaultdict(list)
        for key, entry_id, f in entries:
            acks[key].append(entry_id)
            if id_tuple(entry_id) <= id_tuple(self._stream_state(key).last_id):
                self.metrics.count("replayed", parse_key(key)[1])  # applied before: a redelivery
                continue
            if not f:  # trimmed (MAXLEN) while pending: only its id is left
                self.metrics.count("trimmed")
                continue
            try:
                r = decode_record(key, entry_id, f)
                if not is_unit(r.emb):
                    raise BadRecord(f"{key} {entry_id}: not a finite unit vector")
            except BadRecord as err:
                self.metrics.count("corrupt", parse_key(key)[1])
                log.warning("skipping a corrupt embedding: %s", err)
                continue
            self.metrics.count("in", r.modality)
            groups[r.model, r.modality].append(r)
        alerts: list[Alert] = []
        changed: dict[str, dict[str, QueryState]] = defaultdict(dict)
        for (model, modality), records in groups.items():
            index = self.indexes.get((model, modality))
            if index is None:
                self.metrics.count("no_query", modality, n=len(records))
                continue
            fit = [r for r in records if r.emb.shape[0] == index.dim]
            self.metrics.count("wrong_dim", modality, n=len(records) - len(fit))
            if not fit:
                continue
            scores = index.shares(np.stack([r.emb for r in fit]))
            self.metrics.count("scored", modality, n=len(fit))
            rows: dict[str, list[int]] = defaultdict(list)
            for i, r in enumerate(fit):
                rows[r.stream].append(i)
            for stream, idx in rows.items():
                new_alerts, new_states = self._decide(index, [fit[i] for i in idx], scores[idx])
                alerts += new_alerts
                changed[stream].update(new_states)
        last_ids = {key: max(ids, key=id_tuple) for key, ids in acks.items()}
        self._commit(alerts, changed, last_ids, acks)

    def _stream_state(self, stream: str) -> StreamState:
        if stream not in self.states:
            self.states[stream] = StreamState.decode(self.client.hgetall(state_key(self.settings.group, stream)))
        return self.states[stream]

    def _decide(self, index: ModalityIndex, records: list[EmbeddingRecord],
                scores: np.ndarray) -> tuple[list[Alert], dict[str, QueryState]]:
        """Run one stream's new records (in stream order) through the decision of every query watching its
        device; returns the alerts and the states that changed."""
        device = records[0].device
        cols = index.columns(device)
        if not len(cols):
            return [], {}
        known = self._stream_state(records[0].stream).queries
        queries = [index.queries[c] for c in cols]
        before = [known.get(q.id, INITIAL_STATE) for q in queries]
        hist0 = np.fromiter((s.hist for s in before), dtype=np.uint64, count=len(before))
        armed0 = np.fromiter((s.armed for s in before), dtype=bool, count=len(before))
        last0 = np.fromiter((s.last_alert_ns for s in before), dtype=np.int64, count=len(before))
        hist, armed, last_alert = hist0, armed0, last0
        threshold, rearm_below, k = index.threshold[cols], index.rearm_below[cols], index.k[cols]
        nmask, cooldown = index.nmask[cols], index.cooldown_ns[cols]
        scores = scores[:, cols]
        alerts = []
        for r, score in zip(records, scores):
            above = score >= threshold
            hist = ((hist << np.uint64(1)) | above.astype(np.uint64)) & nmask
            fire = armed & above & (np.bitwise_count(hist) >= k) & (r.t0 - last_alert >= cooldown)
            armed = (armed & ~fire) | (score < rearm_below)
            last_alert = np.where(fire, r.t0, last_alert)
            for j in np.flatnonzero(fire):
                q = queries[j]
                alerts.append(Alert(device, q.id, q.text, q.modality, float(score[j]), float(threshold[j]),
                                    r.t0, r.t1, r.stream, r.id, r.model, time.time_ns()))
        changed = np.flatnonzero((hist != hist0) | (armed != armed0) | (last_alert != last0))
        return alerts, {queries[j].id: QueryState(int(hist[j]), bool(armed[j]), int(last_alert[j])) for j in changed}

    def _commit(self, alerts: list[Alert], changed: dict[str, dict[str, QueryState]], last_ids: dict[str, str],
                acks: dict[str, list[str]]) -> None:
        """Decision state, alerts and acknowledgements in one MULTI/EXEC: all of a batch's effects or none."""
        s = self.settings
        pipe = self.client.pipeline(transaction=True)
        for stream, last_id in last_ids.items():
            states = {qid: st.encode() for qid, st in changed.get(stream, {}).items()}
            pipe.hset(state_key(s.group, stream), mapping={LAST_ID_FIELD: last_id, **states})
        for a in alerts:
            args = [s.dedup_ttl_s, s.alerts_maxlen, ALERTS_CHANNEL]
            for name, value in a.fields().items():
                args += [name, value]
            self.emit(keys=[dedup_key(a.query, a.source, a.source_id), ALERTS_STREAM], args=args, client=pipe)
        for key, ids in acks.items():
            pipe.xack(key, s.group, *ids)
        results = pipe.execute()
        for stream, last_id in last_ids.items():
            state = self._stream_state(stream)
            state.last_id = last_id
            state.queries.update(changed.get(stream, {}))
        done_ms = time.time_ns() / 1e6
        for a, result in zip(alerts, results[len(last_ids) :]):
            if result is None:
                self.metrics.count("duplicate_alert", a.modality)
                continue
            self.metrics.count("alert", a.modality)
            self.metrics.latency((done_ms - id_tuple(a.source_id)[0]) / 1000)

    # ----- running -----

    def run(self) -> None:
        """`step` until `stop`; errors back off and the unacknowledged entries are read again."""
        backoff = 0.0
        while not self._stop.is_set():
            try:
                self.step()
                backoff = 0.0
            except Exception as err:  # Redis down, or a bad query/background/state record: keep matching
                self.metrics.count("redis_error" if isinstance(err, redis.RedisError) else "error")
                self.last_error = str(err)
                if not isinstance(err, redis.RedisError):
                    log.exception("matching failed; retrying")
                if "NOGROUP" in str(err):
                    self.forget_streams()
                self.pending = True
                backoff = min(max(2 * backoff, 0.05), self.settings.retry_max_s)
                self._stop.wait(backoff)

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
        return self.metrics.snapshot(streams=len(self.keys), queries=sum(i.m for i in self.indexes.values()),
                                     pending=self.pending, last_error=self.last_error)


def start_matchers(settings: MatcherSettings, redis_url: str, count: int = 1, max_restarts: int = -1,
                   num_cpus: float = 0) -> list:
    """`count` matcher actors, each owning a shard of the streams (consumer `{settings.consumer}-{i}`),
    running from construction and restarted by Ray (up to `max_restarts`, -1: always) with the same
    settings after a crash. Each scores on one core: its BLAS runs one thread (more only add latency)."""
    return [
        ray.remote(Matcher).options(max_restarts=max_restarts, num_cpus=num_cpus,
                                    runtime_env={"env_vars": ONE_BLAS_THREAD}).remote(
            replace(settings, shard=i, shards=count, consumer=f"{settings.consumer}-{i}", autostart=True), redis_url)
        for i in range(count)
    ]
