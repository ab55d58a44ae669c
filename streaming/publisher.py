"""Publisher stage: writes embeddings to Redis Streams and forms the `fused` embedding of each moment.

Layout (`redis_layout.py`; REDIS.md has the full description for consumers):
    XADD bindstream:emb:{<device>}:<modality> MAXLEN ~ N * t0 t1 epoch model dtype dim emb [modalities] [dbfs] [reused]

Each batch is one EVALSHA of `WRITE_ONCE` (in a Redis Cluster, one per hash slot of the batch's devices): an
entry is added only if its window key (run, epoch, t0) is not in the stream's index
(`bindstream:embidx:{<device>}:<modality>`, the newest `dedup_window` keys). So a batch sent again after a refused
or lost reply, or by a restarted publisher, adds no second entry. Then the streams written go into the registry
(`bindstream:streams`), from which the matchers learn of new streams and of new entries.

`fused` is the paper's embedding arithmetic: the sum of the unit-norm vision, audio, depth and thermal
embeddings of one window (they share its bounds), renormalised. IMU windows (5 s) have other bounds and
take no part. A window is fused once every fused modality of its device has arrived, or has moved past
it (a later window of that modality arrived: this one was dropped), or `fused_wait_s` has passed.

A gated window (streaming/gating.py) arrives without a vector, `reused` naming the t0 of the window it repeats:
`push` fills in that window's vector and queues it after that window (`Repeats`: it waits up to `repeat_wait_s`
for one that has not come yet; a publisher that restarted since reads it back from the stream); if that window
does not come (dropped or rejected on the way), the gated window is dropped, counted as `dropped_reuse_missing`.
A fused window whose members all repeat the members of the device's last fused window repeats that one
(`reused`); any other is summed as usual.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict, defaultdict, deque
from dataclasses import dataclass, field

import numpy as np
import redis

from .gating import Repeats
from .records import FUSED, FUSED_MODALITIES, Embedding
from .redis_access import connect, run_scripts, slot_groups
from .redis_layout import BadRecord, decode_embedding, encode_embedding, index_key, register_streams, stream_key
from .retry import Backoff
from .stage import StageMetrics

# KEYS: per entry its stream and the stream's index. ARGV: maxlen, index size, index ttl (ms), stream ttl
# (ms, 0: none), then per entry: its window key, the number of field/value items, the items. Replies per
# entry: 1 added, 0 already there, -1 the stream key holds another type. Any other error is returned at
# once: an OOM refusal comes at the first write, so nothing was added; after other errors the batch is
# sent again and what was added is skipped.
WRITE_ONCE = """
local maxlen, keep, ttl, retention = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local replies, a = {}, 5
for i = 1, #KEYS, 2 do
  local window, n = ARGV[a], tonumber(ARGV[a + 1])
  local reply = 0
  if not redis.call('ZSCORE', KEYS[i + 1], window) then
    local id = redis.pcall('XADD', KEYS[i], 'MAXLEN', '~', maxlen, '*', unpack(ARGV, a + 2, a + 1 + n))
    if type(id) == 'table' and id.err then
      if string.sub(id.err, 1, 9) ~= 'WRONGTYPE' then return id end
      reply = -1
    else
      redis.call('ZADD', KEYS[i + 1], tonumber(string.match(id, '^%d+')), window)
      redis.call('ZREMRANGEBYRANK', KEYS[i + 1], 0, -keep - 1)
      redis.call('PEXPIRE', KEYS[i + 1], ttl)
      if retention > 0 then redis.call('PEXPIRE', KEYS[i], retention) end
      reply = 1
    end
  end
  replies[#replies + 1] = reply
  a = a + 2 + n
end
return replies
"""
ADDED, WRONG_TYPE = 1, -1


def unit_rows(rows: np.ndarray, low: float, high: float) -> tuple[np.ndarray, list[str | None]]:
    """`rows` (N, D) scaled to unit L2 norm (float32), and per row None, or why it must not be published:
    `non_finite` (a NaN or Inf) or `bad_norm` (its norm lies outside [low, high], zero included)."""
    rows = np.asarray(rows, dtype=np.float64)
    finite = np.isfinite(rows).all(axis=1)
    norms = np.linalg.norm(np.where(finite[:, None], rows, 0.0), axis=1)
    ok = finite & (norms >= low) & (norms <= high)
    unit = (rows / np.where(ok, norms, 1.0)[:, None]).astype(np.float32)
    return unit, [None if good else "bad_norm" if fin else "non_finite" for good, fin in zip(ok, finite)]


# The least privilege the publisher needs (SECURITY.md): streams, and the write-once script with the
# sorted-set index it keeps per stream. Scripts run with the caller's ACL, so they grant nothing more.
PUBLISHER_ACL = (
    "resetkeys",
    "~bindstream:*",
    "resetchannels",
    "-@all",
    "+@stream",
    "+@connection",
    "+evalsha",
    "+script|load",
    "+zscore",
    "+zadd",
    "+zremrangebyrank",
    "+pexpire",
    "+time",
    "+zrevrange",
    "+zremrangebyscore",
)


@dataclass(frozen=True)
class PublisherSettings:
    redis_url: str
    maxlen: int = 100_000  # per stream, approximate (MAXLEN ~)
    retention_s: float = 30 * 86_400  # a stream with no new entry this long expires (0: never), so idle devices go
    queue_capacity: int = 4096  # embeddings waiting for Redis; when full the oldest is dropped
    max_batch: int = 256  # embeddings per Redis round trip (one EVALSHA)
    fused_wait_s: float = 5.0
    fused_min_norm: float = 1e-4  # a fused sum shorter than this (members cancel out) has no direction: dropped
    retry_max_s: float = 2.0  # backoff cap while Redis is unreachable
    redis_timeout_s: float = 10.0  # a Redis call that takes longer fails (and is retried): no hang on a stuck server
    drain_timeout_s: float = 30.0  # `drain()` without a timeout: then what is left is dropped, counted
    dedup_keys: int = 200_000  # recent (device, modality, epoch, t0) kept to drop re-sent windows' duplicates
    dedup_window: int = 256  # window keys kept per stream in Redis to refuse a second entry; >= max_batch
    dedup_ttl_s: float = 3600.0  # a stream's index expires after this long without writes
    # gated windows (streaming/gating.py, `Repeats`): the streams whose newest embedded windows are kept for them
    # to repeat (the least recently used go), how many per stream (calls may come a little out of order), how long
    # one waits for the window it repeats to come, and how many may wait (the oldest give way); then they are
    # dropped, counted as `dropped_reuse_missing`
    repeat_streams: int = 20_000
    repeat_keep: int = 4
    repeat_wait_s: float = 5.0
    repeat_waiting: int = 4096
    repeat_recall: int = 64  # a stream's newest entries searched for a repeated window it does not hold (a restart)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])  # keeps apart runs that repeat (epoch, t0)

    def __post_init__(self):
        if self.dedup_window < self.max_batch:  # a batch retried after a partial write must all be indexed
            raise ValueError(f"dedup_window ({self.dedup_window}) must be at least max_batch ({self.max_batch})")


class FusedWindows:
    """Collects the fused modalities' embeddings per window and says when a window is ready. Each window
    is fused once: a member arriving after its window was fused is left out (counted by the caller). A
    sum shorter than `min_norm` or not finite is not published: counted per device in `metrics`."""

    def __init__(self, wait_s: float, remember: int, min_norm: float, metrics: StageMetrics):
        self.wait_s = wait_s
        self.remember = remember
        self.min_norm = min_norm
        self.metrics = metrics
        self.pending: dict[tuple, dict[str, Embedding]] = {}  # (device, epoch, t0, t1) -> members so far
        self.first_seen: dict[tuple, float] = {}
        self.latest_t0: dict[tuple, int] = {}  # (device, epoch, modality) -> newest t0 seen
        self.fused: OrderedDict[tuple, None] = OrderedDict()  # windows already fused, the newest `remember`
        # (device, epoch) -> t0 of its last fused window that repeated none, and its members' (modality, source t0)
        self.last_fused: OrderedDict[tuple, tuple[int, tuple]] = OrderedDict()

    def add(self, e: Embedding) -> bool:
        """Take a member; False if its window was already fused (it comes too late)."""
        if e.modality not in FUSED_MODALITIES:
            return True
        key = (e.device, e.epoch, e.t0, e.t1)
        if key in self.fused:
            return False
        self.pending.setdefault(key, {})[e.modality] = e
        self.first_seen.setdefault(key, time.monotonic())
        newest = (e.device, e.epoch, e.modality)
        self.latest_t0[newest] = max(e.t0, self.latest_t0.get(newest, e.t0))
        return True

    def ready(self, flush: bool = False) -> list[Embedding]:
        out = []
        now = time.monotonic()
        for key, parts in list(self.pending.items()):
            device, epoch, t0, _ = key
            settled = all(m in parts or self.latest_t0.get((device, epoch, m), -1) > t0 for m in FUSED_MODALITIES)
            if flush or settled or now - self.first_seen[key] >= self.wait_s:
                out += self._fuse(parts)
                del self.pending[key], self.first_seen[key]
                self.fused[key] = None
                if len(self.fused) > self.remember:
                    self.fused.popitem(last=False)
        return out

    def _fuse(self, parts: dict[str, Embedding]) -> list[Embedding]:
        members = [parts[m] for m in FUSED_MODALITIES if m in parts]
        first = members[0]
        (unit,), (bad,) = unit_rows(np.sum([e.emb for e in members], axis=0)[None], self.min_norm, np.inf)
        if bad:
            self.metrics.count(f"rejected_{bad}", first.device)
            return []
        # which window's vector each member is: a window that repeats that of its last fused one sums the same
        sources = tuple((e.modality, e.t0 if e.reused is None else e.reused) for e in members)
        device = (first.device, first.epoch)
        last = self.last_fused.pop(device, None)
        if last is None or last[1] != sources or last[0] >= first.t0:
            last = (first.t0, sources)  # this one repeats none: it is the one later windows may repeat
        reused = last[0] if last[0] < first.t0 else None
        self.last_fused[device] = last
        if len(self.last_fused) > self.remember:
            self.last_fused.popitem(last=False)
        return [
            Embedding(
                first.device,
                FUSED,
                first.t0,
                first.t1,
                unit,
                first.model,
                max(e.arrived_ns for e in members),
                max(e.embedded_ns for e in members),
                members=tuple(e.modality for e in members),
                epoch=first.epoch,
                reused=reused,
            )
        ]


class Publisher:
    """Takes Embeddings (`push`), writes them to Redis on a worker thread, in batches of one round trip."""

    def __init__(self, settings: PublisherSettings):
        self.settings = settings
        self.redis = connect(
            settings.redis_url, socket_timeout=settings.redis_timeout_s, socket_connect_timeout=settings.redis_timeout_s
        )
        self.write_once = self.redis.register_script(WRITE_ONCE)
        self.queue: deque = deque()
        self.cond = threading.Condition()
        self.metrics = StageMetrics("publish")
        self.fused = FusedWindows(settings.fused_wait_s, settings.dedup_keys, settings.fused_min_norm, self.metrics)
        self.seen: OrderedDict[tuple, None] = OrderedDict()  # bounded by settings.dedup_keys
        self.repeats = Repeats(
            settings.repeat_streams, settings.repeat_keep, settings.repeat_wait_s, settings.repeat_waiting
        )
        self._stop = threading.Event()
        self._deadline = float("inf")  # monotonic time at which a drain gives up
        self._closed = False  # the worker has ended: later embeddings are dropped
        self.last_error = ""
        self._worker = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._worker.start()

    def push(self, embeddings: list[Embedding]) -> int:
        """Queue embeddings for Redis; a window already published (re-sent after a failure) is dropped, a gated
        one gets the vector it repeats."""
        with self.cond:
            for e in embeddings:
                self.metrics.count("in", e.modality)
                if self._closed:
                    self.metrics.count("dropped_drain_timeout", e.device)
                    continue
                if e.key in self.seen:
                    self.metrics.count("duplicate", e.device)
                    continue
                self.seen[e.key] = None
                if len(self.seen) > self.settings.dedup_keys:
                    self.seen.popitem(last=False)
                if e.reused is not None and not self.repeats.knows(e):
                    self._recall(e)
                ready, gave_way = self.repeats.take(e, time.monotonic())
                for lost in gave_way:
                    self.metrics.count("dropped_reuse_missing", lost.device)
                for r in ready:
                    if len(self.queue) >= self.settings.queue_capacity:
                        self.metrics.count("dropped_queue_full", self.queue.popleft().device)
                    self.queue.append(r)
            self.cond.notify()
            depth = len(self.queue)
        self.metrics.queue_depth(depth)
        return depth

    def _recall(self, e: Embedding) -> None:
        """Read back from Redis the window that gated `e` repeats, when this publisher holds none of its stream
        (it restarted since, or let the stream go): among the stream's newest `repeat_recall` entries. Not
        found (or Redis failing), `e` waits for it as for any window not come yet."""
        key = stream_key(e.device, e.modality)
        try:
            entries = self.redis.xrevrange(key, count=self.settings.repeat_recall)
        except redis.RedisError:
            return
        for entry_id, fields in entries:
            try:
                r = decode_embedding(key, entry_id, fields)
            except BadRecord:
                continue
            if (r.epoch, r.t0, r.reused, r.model) == (e.epoch, e.reused, None, e.model):
                self.repeats.remember(
                    Embedding(e.device, e.modality, r.t0, r.t1, r.emb, r.model, 0, 0, epoch=r.epoch, dbfs=r.dbfs)
                )
                return

    def _run(self) -> None:
        backoff, failing = Backoff(self.settings.retry_max_s), False
        pending: list[Embedding] = []
        while True:
            with self.cond:
                if not self.queue and not pending and not self._stop.is_set():
                    self.cond.wait(timeout=0.1)
                room = max(self.settings.max_batch - len(pending), 0)
                batch = [self.queue.popleft() for _ in range(min(len(self.queue), room))]
                stopping, queue_empty = self._stop.is_set(), not self.queue
                # at the drain nothing more comes: a gated window still waiting waits in vain
                lost = self.repeats.expired(time.monotonic(), all_of_them=stopping and queue_empty)
            for e in lost:
                self.metrics.count("dropped_reuse_missing", e.device)
            for e in batch:
                if not self.fused.add(e):
                    self.metrics.count("fused_late", e.modality)
            pending += batch + self.fused.ready(flush=stopping and queue_empty)
            if stopping and time.monotonic() >= self._deadline:
                return self._close(pending, "redis_down" if failing else "drain_timeout")
            try:
                self._write(pending)
                pending, failing = [], False
                backoff.reset()
            except redis.RedisError as err:
                self.metrics.count("redis_error")
                self.last_error = str(err)
                failing = True
                backoff.wait()
                continue
            if stopping and queue_empty:
                return self._close([], "drain_timeout")  # what was pushed since came too late

    def _close(self, pending: list[Embedding], reason: str) -> None:
        """End the worker: drop, counted per device as `dropped_{reason}`, what was not written; later
        embeddings are dropped as `dropped_drain_timeout`."""
        with self.cond:
            pending += list(self.queue) + self.repeats.expired(time.monotonic(), all_of_them=True)
            self.queue.clear()
            self._closed = True
        for e in pending + self.fused.ready(flush=True):
            self.metrics.count(f"dropped_{reason}", e.device)

    def _write(self, embeddings: list[Embedding]) -> None:
        """WRITE_ONCE for the batch: one EVALSHA, or in a Redis Cluster one per hash slot (a device's keys share
        one), in one round trip per node; then the streams written go into the registry (`register_streams`).
        Raises redis.RedisError when nothing, or part, was added (the batch is sent again). `out` counts what is
        in Redis now, each window once."""
        if not embeddings:
            return
        start = time.perf_counter()
        s = self.settings
        head: list[int | str | bytes] = [s.maxlen, s.dedup_window, int(s.dedup_ttl_s * 1000), int(s.retention_s * 1000)]
        by_stream: dict[str, list[Embedding]] = defaultdict(list)  # in batch order
        for e in embeddings:
            by_stream[stream_key(e.device, e.modality)].append(e)
        groups = slot_groups(self.redis, by_stream, len(by_stream))
        batches = [[e for key in keys for e in by_stream[key]] for keys in groups]
        calls = []
        for batch in batches:
            keys: list[str] = []
            args = list(head)
            for e in batch:
                fields = encode_embedding(e)
                keys += [stream_key(e.device, e.modality), index_key(e.device, e.modality)]
                args += [f"{s.run_id}:{e.epoch}:{e.t0}", 2 * len(fields), *(x for item in fields.items() for x in item)]
            calls.append((self.write_once, keys, args))
        results = run_scripts(self.redis, calls)
        for result in results:
            if isinstance(result, Exception):
                raise result
        written = [e for batch in batches for e in batch]
        replies = [reply for result in results for reply in result]
        register_streams(
            self.redis,
            list(dict.fromkeys(stream_key(e.device, e.modality) for e, r in zip(written, replies) if r != WRONG_TYPE)),
            int(s.retention_s * 1000),
        )
        self.metrics.busy(time.perf_counter() - start)
        done = time.time_ns()
        for e, reply in zip(written, replies):
            if reply == WRONG_TYPE:
                self.metrics.count("dropped_wrong_type", e.device)
                continue
            if reply != ADDED:  # added before: by a try whose reply was lost, or before this actor restarted
                self.metrics.count("already_in_redis", e.device)
            self.metrics.count("out", e.modality)
            self.metrics.latency((done - e.arrived_ns) / 1e9)

    def drain(self, timeout_s: float | None = None) -> dict:
        """Write everything queued and every pending fused window, then stop. What is not written within
        `timeout_s` (default `drain_timeout_s`) is dropped, counted per device: `dropped_redis_down` if
        Redis was failing, else `dropped_drain_timeout`."""
        self._deadline = time.monotonic() + (self.settings.drain_timeout_s if timeout_s is None else timeout_s)
        self._stop.set()
        with self.cond:
            self.cond.notify()
        self._worker.join()
        return self.stats()

    def stats(self) -> dict:
        with self.cond:
            depth = len(self.queue)
        return self.metrics.snapshot(queue=depth, fused_pending=len(self.fused.pending), last_error=self.last_error)
