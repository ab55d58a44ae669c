"""Publisher stage: writes embeddings to Redis Streams and forms the `fused` embedding of each moment.

Layout (REDIS.md has the full description for consumers):
    XADD bindstream:emb:{device}:{modality} MAXLEN ~ N * t0 t1 model dtype dim emb [modalities]

`fused` is the paper's embedding arithmetic: the sum of the unit-norm vision, audio, depth and thermal
embeddings of one window (they share its bounds), renormalised. IMU windows (5 s) have other bounds and
take no part. A window is fused once every fused modality of its device has arrived, or has moved past
it (a later window of that modality arrived: this one was dropped), or `fused_wait_s` has passed.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np
import redis

from .records import FUSED, Embedding
from .stage import StageMetrics

KEY_PREFIX = "bindstream:emb"
FUSED_MODALITIES = ("vision", "audio", "depth", "thermal")


def stream_key(device: str, modality: str) -> str:
    return f"{KEY_PREFIX}:{device}:{modality}"


def encode_fields(e: Embedding, modalities: tuple[str, ...] = ()) -> dict:
    fields = {
        "t0": e.t0, "t1": e.t1, "model": e.model, "dtype": "float32", "dim": e.emb.shape[0],
        "emb": np.ascontiguousarray(e.emb, dtype="<f4").tobytes(),
    }
    if modalities:
        fields["modalities"] = ",".join(modalities)
    return fields


@dataclass(frozen=True)
class PublisherSettings:
    redis_url: str
    maxlen: int = 100_000  # per stream, approximate (MAXLEN ~)
    queue_capacity: int = 4096  # embeddings waiting for Redis; when full the oldest is dropped
    max_batch: int = 256  # embeddings per Redis pipeline round trip
    fused_wait_s: float = 5.0
    retry_max_s: float = 2.0  # backoff cap while Redis is unreachable
    drain_timeout_s: float = 30.0  # at shutdown, give up on an unreachable Redis after this long
    dedup_keys: int = 200_000  # recent (device, modality, t0) kept to drop re-sent windows' duplicates


class FusedWindows:
    """Collects the fused modalities' embeddings per window and says when a window is ready. Each window
    is fused once: a member arriving after its window was fused is left out (counted by the caller)."""

    def __init__(self, wait_s: float, remember: int):
        self.wait_s = wait_s
        self.remember = remember
        self.pending: dict[tuple, dict[str, Embedding]] = {}  # (device, epoch, t0, t1) -> members so far
        self.first_seen: dict[tuple, float] = {}
        self.latest_t0: dict[tuple, int] = {}  # (device, epoch, modality) -> newest t0 seen
        self.fused: OrderedDict[tuple, None] = OrderedDict()  # windows already fused, the newest `remember`

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
                out.append(self._fuse(parts))
                del self.pending[key], self.first_seen[key]
                self.fused[key] = None
                if len(self.fused) > self.remember:
                    self.fused.popitem(last=False)
        return out

    @staticmethod
    def _fuse(parts: dict[str, Embedding]) -> Embedding:
        members = [parts[m] for m in FUSED_MODALITIES if m in parts]
        total = np.sum([e.emb for e in members], axis=0)
        first = members[0]
        return Embedding(
            first.device, FUSED, first.t0, first.t1, (total / np.linalg.norm(total)).astype(np.float32), first.model,
            max(e.arrived_ns for e in members), max(e.embedded_ns for e in members),
            members=tuple(e.modality for e in members), epoch=first.epoch,
        )


class Publisher:
    """Takes Embeddings (`push`), writes them to Redis on a worker thread, in pipelined batches."""

    def __init__(self, settings: PublisherSettings):
        self.settings = settings
        self.redis = redis.Redis.from_url(settings.redis_url)
        self.queue: deque = deque()
        self.cond = threading.Condition()
        self.fused = FusedWindows(settings.fused_wait_s, remember=settings.dedup_keys)
        self.seen: OrderedDict[tuple[str, str, int], None] = OrderedDict()  # bounded by settings.dedup_keys
        self.metrics = StageMetrics("publish")
        self._stop = threading.Event()
        self._stop_at = 0.0
        self.last_error = ""
        self._worker = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._worker.start()

    def push(self, embeddings: list[Embedding]) -> int:
        """Queue embeddings for Redis; a window already published (re-sent after a failure) is dropped."""
        with self.cond:
            for e in embeddings:
                if e.key in self.seen:
                    self.metrics.count("duplicate", e.modality)
                    continue
                self.seen[e.key] = None
                if len(self.seen) > self.settings.dedup_keys:
                    self.seen.popitem(last=False)
                if len(self.queue) >= self.settings.queue_capacity:
                    self.metrics.count("dropped_queue_full", self.queue.popleft().modality)
                self.queue.append(e)
            self.cond.notify()
            depth = len(self.queue)
        self.metrics.queue_depth(depth)
        return depth

    def _run(self) -> None:
        backoff, pending = 0.0, []
        while True:
            with self.cond:
                if not self.queue and not pending and not self._stop.is_set():
                    self.cond.wait(timeout=0.1)
                room = max(self.settings.max_batch - len(pending), 0)
                batch = [self.queue.popleft() for _ in range(min(len(self.queue), room))]
                stopping, queue_empty = self._stop.is_set(), not self.queue
            for e in batch:
                if not self.fused.add(e):
                    self.metrics.count("fused_late", e.modality)
            pending += batch + self.fused.ready(flush=stopping and queue_empty)
            try:
                self._write(pending)
                pending, backoff = [], 0.0
            except redis.RedisError as err:
                self.metrics.count("redis_error")
                self.last_error = str(err)
                if stopping and time.monotonic() - self._stop_at > self.settings.drain_timeout_s:
                    with self.cond:
                        pending += list(self.queue)
                        self.queue.clear()
                    pending += self.fused.ready(flush=True)
                    self.metrics.count("dropped_redis_down", n=len(pending))
                    return
                backoff = min(max(2 * backoff, 0.05), self.settings.retry_max_s)
                time.sleep(backoff)
                continue
            if stopping and queue_empty:
                return

    def _write(self, embeddings: list[Embedding]) -> None:
        if not embeddings:
            return
        start = time.perf_counter()
        pipe = self.redis.pipeline(transaction=False)
        for e in embeddings:
            fields = encode_fields(e, e.members)
            pipe.xadd(stream_key(e.device, e.modality), fields, maxlen=self.settings.maxlen, approximate=True)
        pipe.execute()
        self.metrics.busy(time.perf_counter() - start)
        done = time.time_ns()
        for e in embeddings:
            self.metrics.count("out", e.modality)
            self.metrics.latency((done - e.arrived_ns) / 1e9)

    def drain(self) -> dict:
        """Write everything queued and every pending fused window, then stop."""
        self._stop_at = time.monotonic()
        self._stop.set()
        with self.cond:
            self.cond.notify()
        self._worker.join()
        return self.stats()

    def stats(self) -> dict:
        with self.cond:
            depth = len(self.queue)
        return self.metrics.snapshot(queue=depth, fused_pending=len(self.fused.pending), last_error=self.last_error)
