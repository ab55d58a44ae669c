"""What every pipeline stage shares: counters exported as Ray metrics, and a bounded link downstream."""

from __future__ import annotations

import logging
import threading
import uuid
import zlib
from collections import Counter, deque
from dataclasses import dataclass, field
from itertools import cycle

import numpy as np
import ray
from ray.util import metrics

LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
LATENCY_WINDOW = 4096  # recent latencies kept for p50/p99 in `snapshot`
MAX_LABELS = 1000  # distinct labels (devices, modalities) per event of a stage; later ones count as "other"
# Actor options of the stages that call each other many times a second (ingest, windowing, embedders, publisher):
# Ray records every call as task events for its dashboard's task list and `ray list tasks`; recording them cost 6-7%
# of the CPU side (`bench capacity`, 12 wearables, runs interleaved), so they are off. The stages' counters
# (`stats`, Ray metrics) are unaffected; set True to see each call in `ray list tasks` while debugging.
CALL_OPTIONS = {"enable_task_events": False}


@dataclass
class Counts:
    """Counters: event -> label -> n, the label "" where an event is counted without one. An event named
    with a trailing "_" ("rejected_") stands for every event it begins. A snapshot carries `to_dict()`
    (plain data, for Ray and JSON); readers take it back with `Counts.of(*snapshots)`."""

    by_event: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, dict[str, int]]) -> Counts:
        return cls({event: dict(labels) for event, labels in data.items()})

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {event: dict(labels) for event, labels in self.by_event.items()}

    @classmethod
    def of(cls, *snapshots: dict) -> Counts:
        """The counts of `StageMetrics.snapshot`s (of one stage's actors, or of several stages), summed."""
        return sum((cls.from_dict(s["counts"]) for s in snapshots), cls())

    def __add__(self, other: Counts) -> Counts:
        out = Counts.from_dict(self.by_event)
        for event, labels in other.by_event.items():
            for label, n in labels.items():
                out.add(event, label, n)
        return out

    def add(self, event: str, label: str = "", n: int = 1) -> None:
        labels = self.by_event.setdefault(event, {})
        labels[label] = labels.get(label, 0) + n

    def events(self, prefix: str = "") -> list[str]:
        """The events counted, sorted; those beginning with `prefix` if given."""
        return sorted(event for event in self.by_event if event.startswith(prefix))

    def labels(self, event: str) -> dict[str, int]:
        """Label -> count of `event` (of every event it stands for, summed per label)."""
        out: Counter = Counter()
        for name in self.events(event) if event.endswith("_") else [event]:
            out.update(self.by_event.get(name, {}))
        return dict(out)

    def get(self, event: str, label: str | None = None) -> int:
        """The count of `event` under `label`, or with no label its total over all labels."""
        labels = self.labels(event)
        return sum(labels.values()) if label is None else labels.get(label, 0)


class WarnOnce:
    """Logs the first of each (event, label) pair, up to `limit` pairs: a flood of one bad record or of many
    device ids cannot flood the log (the caller counts every one)."""

    def __init__(self, log: logging.Logger, limit: int):
        self.log, self.limit = log, limit
        self.seen: set[tuple[str, str]] = set()

    def __call__(self, event: str, label: str, detail: str) -> None:
        if (event, label) not in self.seen and len(self.seen) < self.limit:
            self.seen.add((event, label))
            self.log.warning("%s (%s): %s; further ones are only counted", event, label, detail)


class StageMetrics:
    """Counters and a latency histogram of one stage. Each `count` goes to Ray's metrics (exported to
    Prometheus by every Ray node) and to the in-process `Counts` that `snapshot` returns."""

    def __init__(self, stage: str):
        self.stage = stage
        self.counts = Counts()
        self.latencies: deque = deque(maxlen=LATENCY_WINDOW)
        self.busy_s = 0.0
        self._lock = threading.Lock()
        self._events = metrics.Counter(
            "bindstream_events_total",
            "Pipeline events per stage (in, out, drops by reason).",
            tag_keys=("stage", "event", "label"),
        )
        self._latency = metrics.Histogram(
            "bindstream_latency_seconds",
            "From ingest receiving the batch with a window's last message to this stage's output.",
            boundaries=LATENCY_BOUNDARIES_S,
            tag_keys=("stage",),
        )
        self._queue = metrics.Gauge("bindstream_queue_depth", "Items waiting in a stage.", tag_keys=("stage",))

    def count(self, event: str, label: str = "", n: int = 1) -> None:
        """Add `n` to `event` (e.g. "in", "dropped_gap"), optionally per `label` (a modality or device)."""
        if n <= 0:
            return
        with self._lock:
            # capped per event: a flood of one event's ids spares the others
            labels = self.counts.by_event.get(event, {})
            if label not in labels and len(labels) >= MAX_LABELS:
                label = "other"  # a flood of device ids must not grow memory or metric series
            self.counts.add(event, label, n)
        self._events.inc(n, tags={"stage": self.stage, "event": event, "label": label})

    def latency(self, seconds: float) -> None:
        with self._lock:
            self.latencies.append(seconds)
        self._latency.observe(seconds, tags={"stage": self.stage})

    def busy(self, seconds: float) -> None:
        """Time spent working (not waiting): busy_s / wall time is the stage's utilisation."""
        with self._lock:
            self.busy_s += seconds

    def queue_depth(self, depth: int) -> None:
        self._queue.set(depth, tags={"stage": self.stage})

    def snapshot(self, **extra) -> dict:
        """The stage's figures as plain data: "counts" is `Counts.to_dict()` (read it with `Counts.of`)."""
        with self._lock:
            counts = self.counts.to_dict()
            lat = np.array(self.latencies) if self.latencies else None
        out = {"stage": self.stage, "counts": counts, "busy_s": self.busy_s, **extra}
        if lat is not None:
            out["latency_p50_ms"] = float(np.percentile(lat, 50) * 1000)
            out["latency_p99_ms"] = float(np.percentile(lat, 99) * 1000)
        return out


class NamedActor:
    """The next stage's actor, passed to a stage's constructor by name. Ray counts actor handles in the
    arguments of an actor that restarts as references it may lose, and logs an error about it at every
    start (ray-project/ray#53727); a name is plain data. The handle is looked up on first use."""

    def __init__(self, name: str):
        self.name = name
        self._handle = None

    def __reduce__(self):
        return NamedActor, (self.name,)

    def __getattr__(self, attr: str):
        if attr.startswith("_"):
            raise AttributeError(attr)
        if self._handle is None:
            self._handle = ray.get_actor(self.name)
        return getattr(self._handle, attr)


class CallOrder:
    """Lets the calls of each caller into a concurrent actor in the order the caller made them. Ray runs a
    threaded actor's calls on a pool of threads, so of two calls made in order the second can reach its first
    line before the first does. Each call carries `(caller, n, first_open)`: n counts that caller's calls to this
    actor from 0, and every call before `first_open` had returned to the caller when it made this one
    (`Downstream(ordered=True)` numbers them). Call n waits until n - 1 has passed, or until calls before n are
    all known returned; at most `max_wait_s` (a call that never comes), then goes on, counted as
    `order_wait_timeout`. So an actor that Ray restarted, whose retried calls begin at some n > 0, lets them in
    from the first one's `first_open` on, without a restart flag."""

    def __init__(self, max_wait_s: float, count):
        self.max_wait_s = max_wait_s
        self.count = count
        self._next: dict[str, int] = {}  # caller -> the n of its next call
        self._cond = threading.Condition()

    def wait_turn(self, caller: str, n: int, first_open: int = 0) -> None:
        """Return once it is call n's turn (or after `max_wait_s`); `done` must follow once the call is in."""
        with self._cond:
            if first_open > self._next.get(caller, 0):  # the calls before it returned: passed here or before a restart
                self._next[caller] = first_open
            if not self._cond.wait_for(lambda: self._next.get(caller, 0) >= n, self.max_wait_s):
                self.count("order_wait_timeout")

    def done(self, caller: str, n: int) -> None:
        with self._cond:
            self._next[caller] = max(self._next.get(caller, 0), n + 1)
            self._cond.notify_all()


class Downstream:
    """Calls `push` on the next stage's actors with at most `max_inflight` calls not yet returned: a slow
    consumer makes this stage wait instead of piling calls up in Ray's queues. Calls go round robin,
    or, given a `key`, always to the same actor for that key (a device's data to the actor that owns it).
    `ordered`: each call also passes `order=(caller, n, first_open)` for the actor's `CallOrder` (a concurrent
    actor): n counts the calls to that actor, `first_open` is the oldest of them not known to have returned."""

    def __init__(self, actors: list, max_inflight: int, ordered: bool = False):
        if not actors:
            raise ValueError("a stage needs at least one downstream actor")
        self.actors = list(actors)
        self._next = cycle(range(len(self.actors)))
        self._inflight: deque[tuple] = deque()  # (ref, actor index, n; -1 unordered), oldest first
        self.max_inflight = max_inflight
        # a fresh caller id per Downstream: its numbering starts again at 0 for every actor
        self._caller = uuid.uuid4().hex if ordered else None
        self._calls = [0] * len(self.actors)  # calls made to each actor
        self._open: list[deque[int]] = [deque() for _ in self.actors]  # per actor, its calls' n not known returned

    def actor_for(self, key: str):
        return self.actors[self._index(key)]

    def _index(self, key: str) -> int:
        return zlib.crc32(key.encode()) % len(self.actors)

    def push(self, *args, key: str | None = None) -> None:
        while len(self._inflight) >= self.max_inflight:
            self._returned(self._inflight.popleft())
        i = self._index(key) if key is not None else next(self._next)
        if self._caller is None:
            self._inflight.append((self.actors[i].push.remote(*args), i, -1))
            return
        if self._open[i]:
            self._take_returned()  # so that `first_open` is as recent as can be (an actor Ray restarts reads it)
        n = self._calls[i]
        first_open = self._open[i][0] if self._open[i] else n
        self._inflight.append((self.actors[i].push.remote(*args, order=(self._caller, n, first_open)), i, n))
        self._open[i].append(n)
        self._calls[i] += 1

    def _returned(self, call: tuple) -> None:
        """Wait for `call` to return; its error, if it failed, is raised."""
        ref, i, n = call
        try:
            ray.get(ref)
        finally:
            if n >= 0:
                self._open[i].remove(n)

    def _take_returned(self) -> None:
        """Let go of the calls that returned, without waiting."""
        done, _ = ray.wait([ref for ref, _, _ in self._inflight], num_returns=len(self._inflight), timeout=0)
        finished = set(done)
        for call in [c for c in self._inflight if c[0] in finished]:
            self._inflight.remove(call)
            self._returned(call)

    def has_room(self) -> bool:
        """Whether a call can be made now without waiting (calls that returned are let go)."""
        if len(self._inflight) >= self.max_inflight:
            self._take_returned()
        return len(self._inflight) < self.max_inflight

    def wait(self) -> None:
        """Block until every call made so far has been taken by the next stage."""
        while self._inflight:
            self._returned(self._inflight.popleft())
