"""The decision rule: when a query's calibrated scores over one stream's windows open, raise and end an event.

`decide` is a pure function of the queries' settings, their remembered states, the scores and the windows'
device times and entry ids: no Redis, no Ray, no clock. The matcher keeps the states in Redis (ALERTS.md) and
runs each stream's new windows through `decide`, all the queries watching the stream at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np

from sensors.protocol import INT64_MAX, NS_PER_S

from ..redis_layout import END, START, UPDATE, id_tuple
from .records import MAX_SMOOTHING_N, Decision

MAX_EVENT_S = 300.0  # default longest event, device time: a query that stays above ends and stays disarmed


class OpenEvent(NamedTuple):
    """An event in progress: the entry id of the window that opened it (with the query and the stream, its
    event id), that window's t0, the t1 of its last window at or above threshold, its peak score, and how many
    of its windows were at or above threshold. Device clock, ns. (A tuple: `decide` makes one per change, and a
    frozen dataclass costs several times more to build.)"""

    opened_id: str
    start_ns: int
    end_ns: int
    peak: float
    windows: int


@dataclass(frozen=True)
class QueryState:
    """What the decision remembers per (stream, query): the last n windows' above-threshold bits (bit 0 the
    newest), whether it is armed, the device time of its last alert (None: no alert yet), and its open event
    (None: none; an open event means the query is disarmed)."""

    hist: int = 0
    armed: bool = True
    last_alert_ns: int | None = None
    event: OpenEvent | None = None

    def encode(self) -> str:
        """`hist:armed:last_alert` (-1: none), and with an open event `:opened_id:start:end:peak:windows`."""
        out = f"{self.hist}:{int(self.armed)}:{-1 if self.last_alert_ns is None else self.last_alert_ns}"
        e = self.event
        return out if e is None else f"{out}:{e.opened_id}:{e.start_ns}:{e.end_ns}:{e.peak!r}:{e.windows}"

    @classmethod
    def decode(cls, text: str) -> QueryState:
        """What `encode` wrote, and the 3-field states of versions before events (no open event; a negative
        last alert, as older versions also wrote, is none); ValueError for anything else."""
        parts = text.split(":")
        if len(parts) not in (3, 8):
            raise ValueError(f"not a query state: {text!r}")
        hist, armed, last_alert = int(parts[0]), parts[1], int(parts[2])
        if not 0 <= hist < 1 << MAX_SMOOTHING_N or armed not in ("0", "1") or last_alert > INT64_MAX:
            raise ValueError(f"not a query state: {text!r}")
        event = None
        if len(parts) == 8:
            opened_id, peak = parts[3], float(parts[6])
            start, end, windows = int(parts[4]), int(parts[5]), int(parts[7])
            id_tuple(opened_id)
            if (  # a score is a share in [0, 1]; NaN fails the range
                armed == "1"
                or not 0 <= start <= INT64_MAX
                or not 0 <= end <= INT64_MAX
                or not 0.0 <= peak <= 1.0
                or windows < 1
            ):
                raise ValueError(f"not a query state with an open event: {text!r}")
            event = OpenEvent(opened_id, start, end, peak, windows)
        return cls(hist, armed == "1", last_alert if last_alert >= 0 else None, event)


INITIAL_STATE = QueryState()


class Change(NamedTuple):
    """An event's state change: START or UPDATE at `window` (a new peak), or END at the window that ended it;
    `event` as it stands after the change (for END: as it ended). A tuple, as OpenEvent."""

    window: int  # row of the batch
    query: int  # column of the queries
    state: str  # START | UPDATE | END
    event: OpenEvent


@dataclass(frozen=True)
class Rules:
    """The decision settings of m queries, one (m,) array per setting, so that one pass decides them all."""

    threshold: np.ndarray  # float64
    rearm_below: np.ndarray  # float64: threshold - hysteresis
    k: np.ndarray  # int64
    nmask: np.ndarray  # uint64: the low n bits of a history
    cooldown_ns: np.ndarray  # uint64, device time
    max_event_ns: np.ndarray  # uint64, device time

    @classmethod
    def of(cls, decisions: Sequence[Decision], max_event_s: float = MAX_EVENT_S) -> Rules:
        """The rules of `decisions`, events lasting at most `max_event_s` (the matcher's setting)."""
        threshold = np.array([d.threshold for d in decisions], dtype=np.float64)
        return cls(
            threshold,
            threshold - np.array([d.hysteresis for d in decisions], dtype=np.float64),
            np.array([d.k for d in decisions], dtype=np.int64),
            np.array([(1 << d.n) - 1 for d in decisions], dtype=np.uint64),
            np.array([int(d.cooldown_s * NS_PER_S) for d in decisions], dtype=np.uint64),
            np.full(len(decisions), int(max_event_s * NS_PER_S), dtype=np.uint64),
        )

    def __getitem__(self, cols) -> Rules:
        """The rules of the queries `cols` selects."""
        return Rules(*(getattr(self, f.name)[cols] for f in fields(self)))


def decide(
    rules: Rules,
    states: Sequence[QueryState],
    scores: np.ndarray,
    t0: Sequence[int],
    t1: Sequence[int],
    ids: Sequence[str],
) -> tuple[dict[int, QueryState], list[Change]]:
    """Run m queries over N windows of one stream, in stream order: `scores` (N, m) their calibrated scores,
    `t0`/`t1` (N,) the windows' bounds (device clock, ns, in [0, 2^63 - 1]), `ids` (N,) their entry ids.
    Returns ({column: state after the last window} of the queries whose state changed, the events' state
    changes in window order). Only changes come back: the matcher writes nothing else, and a state object per
    query would cost more than the decision.

    A query fires on a window when it is armed, the score is at or above threshold, `k` of the last `n`
    windows are (this one included), and it is not cooling down: the window starts less than `cooldown_s`
    after its last alert (a window earlier than that, the device clock restarted, is not held back). Firing
    disarms and opens an event (START); while it is open a window above threshold extends it, and one
    scoring above its peak is an UPDATE. A score below `threshold - hysteresis` re-arms and ends the event
    (END); so does a window starting `max_event_s` or more after the event's start, or before it (a restarted
    clock), which leaves the query disarmed until it re-arms. An ending window is not part of its event.
    Device times are exact int64: two of them lie in [0, 2^63 - 1], so their difference fits; as uint64 a
    negative difference is beyond every bound."""
    m = len(states)
    hist0 = np.fromiter((s.hist for s in states), dtype=np.uint64, count=m)
    armed0 = np.fromiter((s.armed for s in states), dtype=bool, count=m)
    alerted0 = np.fromiter((s.last_alert_ns is not None for s in states), dtype=bool, count=m)
    last0 = np.fromiter((s.last_alert_ns or 0 for s in states), dtype=np.int64, count=m)
    open0, start0, end0 = np.zeros(m, dtype=bool), np.zeros(m, dtype=np.int64), np.zeros(m, dtype=np.int64)
    peak0, windows0 = np.zeros(m, dtype=np.float64), np.zeros(m, dtype=np.int64)
    opened_before: dict[int, str] = {}  # column -> opening entry id of the events open before this batch
    for j, s in enumerate(states):  # few events are open: their arrays are filled one by one
        if (e := s.event) is not None:
            open0[j], start0[j], end0[j], peak0[j], windows0[j] = True, e.start_ns, e.end_ns, e.peak, e.windows
            opened_before[j] = e.opened_id
    hist, armed, alerted, last_alert = hist0, armed0, alerted0, last0
    is_open, start, end, peak, windows = open0, start0, end0, peak0, windows0
    opened = np.full(m, -1, dtype=np.int64)  # the row that opened each query's event; -1: before this batch
    n_open = len(opened_before)  # while none is open, the event arrays are left alone: the common case is fast
    evented = n_open > 0  # whether any event was open in this batch: else the event arrays did not change
    t0s, t1s = np.asarray(t0, dtype=np.int64), np.asarray(t1, dtype=np.int64)
    changes: list[Change] = []

    def snapshot(j: int) -> OpenEvent:
        row = int(opened[j])
        opened_id = ids[row] if row >= 0 else opened_before[j]
        return OpenEvent(opened_id, int(start[j]), int(end[j]), float(peak[j]), int(windows[j]))

    for i, score in enumerate(scores):
        t = t0s[i]
        above = score >= rules.threshold
        rearm = score < rules.rearm_below
        hist = ((hist << np.uint64(1)) | above.astype(np.uint64)) & rules.nmask
        cooling = alerted & ((t - last_alert).view(np.uint64) < rules.cooldown_ns)
        fire = armed & above & (np.bitwise_count(hist) >= rules.k) & ~cooling  # never an open event's: disarmed
        armed = (armed & ~fire) | rearm
        moved = fire
        if n_open:
            ending = is_open & (rearm | ((t - start).view(np.uint64) >= rules.max_event_ns))
            is_open = is_open & ~ending
            grow = is_open & above
            update = grow & (score > peak)
            peak = np.where(update, score, peak)
            end = np.where(grow, t1s[i], end)
            windows = windows + grow
            moved = ending | update | fire
        if not moved.any():
            continue
        if fire.any():
            evented = True
            is_open = is_open | fire
            alerted = alerted | fire
            last_alert = np.where(fire, t, last_alert)
            start = np.where(fire, t, start)
            end = np.where(fire, t1s[i], end)
            peak = np.where(fire, score, peak)
            windows = np.where(fire, 1, windows)
            opened = np.where(fire, i, opened)
        # an ending query's arrays are as it ended: it neither grew nor fired in this window
        for col in np.flatnonzero(moved).tolist():
            state = START if fire[col] else UPDATE if is_open[col] else END
            changes.append(Change(i, col, state, snapshot(col)))
        n_open = int(is_open.sum())
    differ = (hist != hist0) | (armed != armed0) | (alerted != alerted0) | (last_alert != last0)
    if evented:
        differ |= (is_open != open0) | (opened >= 0) | (end != end0) | (peak != peak0) | (windows != windows0)
    changed = np.flatnonzero(differ)
    return {
        int(j): QueryState(
            int(hist[j]),
            bool(armed[j]),
            int(last_alert[j]) if alerted[j] else None,
            snapshot(int(j)) if is_open[j] else None,
        )
        for j in changed
    }, changes
