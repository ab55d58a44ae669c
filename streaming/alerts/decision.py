"""The decision rule: when a query's calibrated scores over one stream's windows make an alert.

`decide` is a pure function of the queries' settings, their remembered states, the scores and the windows'
device times: no Redis, no Ray, no clock. The matcher keeps the states in Redis (ALERTS.md) and runs each
stream's new windows through `decide`, all the queries watching the stream at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

from sensors.protocol import INT64_MAX, NS_PER_S

from .records import MAX_SMOOTHING_N, Decision


@dataclass(frozen=True)
class QueryState:
    """What the decision remembers per (stream, query): the last n windows' above-threshold bits (bit 0 the
    newest), whether it is armed, and the device time of its last alert (None: no alert yet)."""

    hist: int = 0
    armed: bool = True
    last_alert_ns: int | None = None

    def encode(self) -> str:
        return f"{self.hist}:{int(self.armed)}:{-1 if self.last_alert_ns is None else self.last_alert_ns}"

    @classmethod
    def decode(cls, text: str) -> QueryState:
        """What `encode` wrote (a negative last alert, as older versions also wrote, is none); ValueError
        for anything else."""
        hist_text, armed, last_text = text.split(":")
        hist, last_alert = int(hist_text), int(last_text)
        if not 0 <= hist < 1 << MAX_SMOOTHING_N or armed not in ("0", "1") or last_alert > INT64_MAX:
            raise ValueError(f"not a query state: {text!r}")
        return cls(hist, armed == "1", last_alert if last_alert >= 0 else None)


INITIAL_STATE = QueryState()


@dataclass(frozen=True)
class Rules:
    """The decision settings of m queries, one (m,) array per setting, so that one pass decides them all."""

    threshold: np.ndarray  # float64
    rearm_below: np.ndarray  # float64: threshold - hysteresis
    k: np.ndarray  # int64
    nmask: np.ndarray  # uint64: the low n bits of a history
    cooldown_ns: np.ndarray  # int64, device time

    @classmethod
    def of(cls, decisions: Sequence[Decision]) -> Rules:
        threshold = np.array([d.threshold for d in decisions], dtype=np.float64)
        return cls(
            threshold,
            threshold - np.array([d.hysteresis for d in decisions], dtype=np.float64),
            np.array([d.k for d in decisions], dtype=np.int64),
            np.array([(1 << d.n) - 1 for d in decisions], dtype=np.uint64),
            np.array([int(d.cooldown_s * NS_PER_S) for d in decisions], dtype=np.int64),
        )

    def __getitem__(self, cols) -> Rules:
        """The rules of the queries `cols` selects."""
        return Rules(*(getattr(self, f.name)[cols] for f in fields(self)))


def decide(
    rules: Rules, states: Sequence[QueryState], scores: np.ndarray, t0: Sequence[int]
) -> tuple[dict[int, QueryState], np.ndarray]:
    """Run m queries over N windows of one stream, in stream order: `scores` (N, m) their calibrated scores,
    `t0` (N,) the windows' starts (device clock, ns, in [0, 2^63 - 1]). Returns ({column: state after the last
    window} of the queries whose state changed, which (window, query) fired: (N, m) bool). Only changes come
    back: the matcher writes nothing else, and a state object per query would cost more than the decision.

    A query fires on a window when it is armed, the score is at or above threshold, `k` of the last `n`
    windows are (this one included), and it is not cooling down: the window starts less than `cooldown_s`
    after its last alert. A window earlier than the last alert (the device clock restarted) is not held back.
    Firing disarms; a score below `threshold - hysteresis` re-arms. Device times are exact int64: t0 and the
    last alert's t0 lie in [0, 2^63 - 1], so their difference does too."""
    m = len(states)
    hist0 = np.fromiter((s.hist for s in states), dtype=np.uint64, count=m)
    armed0 = np.fromiter((s.armed for s in states), dtype=bool, count=m)
    alerted0 = np.fromiter((s.last_alert_ns is not None for s in states), dtype=bool, count=m)
    last0 = np.fromiter((s.last_alert_ns or 0 for s in states), dtype=np.int64, count=m)
    hist, armed, alerted, last_alert = hist0, armed0, alerted0, last0
    fired = np.zeros((len(scores), m), dtype=bool)
    for i, (t, score) in enumerate(zip(np.asarray(t0, dtype=np.int64), scores)):
        above = score >= rules.threshold
        hist = ((hist << np.uint64(1)) | above.astype(np.uint64)) & rules.nmask
        since = t - last_alert
        cooling = alerted & (since >= 0) & (since < rules.cooldown_ns)
        fire = fired[i] = armed & above & (np.bitwise_count(hist) >= rules.k) & ~cooling
        armed = (armed & ~fire) | (score < rules.rearm_below)
        alerted = alerted | fire
        last_alert = np.where(fire, t, last_alert)
    changed = np.flatnonzero((hist != hist0) | (armed != armed0) | (alerted != alerted0) | (last_alert != last0))
    return {
        int(j): QueryState(int(hist[j]), bool(armed[j]), int(last_alert[j]) if alerted[j] else None) for j in changed
    }, fired
