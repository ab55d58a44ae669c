"""The decision rule as a pure function: no redis-server, no Ray. Hand-made sequences pin each part of the rule
(first window, k of n, hysteresis, cooldown in device time), and hypothesis compares `decide` with a plain
one-window-at-a-time model of ALERTS.md's rule over random settings, states, scores and clocks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sensors.protocol import INT64_MAX, NS_PER_S
from streaming.alerts.decision import INITIAL_STATE, QueryState, Rules, decide
from streaming.alerts.records import MAX_SMOOTHING_N, Decision

SECOND = NS_PER_S
HIGH, LOW, QUIET = 0.9, 0.4, 0.1  # with the default threshold 0.5 and hysteresis 0.2: above, between, re-arming
ONE_SHOT = Decision(k=1, n=1, cooldown_s=0)  # every armed window above threshold fires


def run(
    decision: Decision, scores: list[float], times: list[int] | None = None, state: QueryState = INITIAL_STATE
) -> tuple[list[bool], QueryState]:
    """One query's fires over `scores` (windows one second apart unless `times` says), and its state after."""
    times = [i * SECOND for i in range(len(scores))] if times is None else times
    changed, fired = decide(Rules.of([decision]), [state], np.array(scores, dtype=np.float64)[:, None], times)
    return fired[:, 0].tolist(), changed.get(0, state)


# ----- each part of the rule -----------------------------------------------------------------------------


def test_the_first_window_fires_when_one_window_is_enough():
    fired, after = run(ONE_SHOT, [HIGH])
    assert fired == [True]
    assert after == QueryState(hist=1, armed=False, last_alert_ns=0)


def test_the_first_window_waits_for_k_windows():
    assert run(Decision(k=2, n=3), [HIGH])[0] == [False]
    assert run(Decision(k=2, n=3), [HIGH, HIGH])[0] == [False, True]


def test_a_quiet_first_window_changes_no_state():
    """Nothing to write: a fresh query's state is only stored once it differs from the initial one."""
    assert decide(Rules.of([Decision()]), [INITIAL_STATE], np.array([[QUIET]]), [0])[0] == {}


def test_k_of_the_last_n_windows_must_be_above():
    d = Decision(k=2, n=3, cooldown_s=0)
    assert run(d, [HIGH, LOW, HIGH])[0] == [False, False, True]  # 2 of the last 3
    assert run(d, [HIGH, LOW, LOW, HIGH])[0] == [False] * 4  # the first HIGH slid out of the last 3
    assert run(d, [HIGH, LOW, LOW, HIGH, HIGH])[0] == [False] * 4 + [True]


def test_the_current_window_must_be_above():
    """Two above-threshold windows remembered are k of n, but a window below does not fire."""
    assert run(Decision(k=2, n=3), [LOW], state=QueryState(hist=0b11))[0] == [False]


def test_no_second_alert_until_the_score_fell_below_threshold_minus_hysteresis():
    d = Decision(threshold=0.5, hysteresis=0.2, k=1, n=1, cooldown_s=0)
    fired, after = run(d, [HIGH, HIGH, 0.4, HIGH, 0.3, HIGH, 0.29, HIGH])
    assert fired == [True, False, False, False, False, False, False, True]  # 0.3 is not below 0.5 - 0.2
    assert not after.armed


def test_the_cooldown_counts_device_time_not_windows():
    d = Decision(k=1, n=1, cooldown_s=30)
    times = [0, SECOND, 30 * SECOND - 1, 30 * SECOND]
    assert run(d, [HIGH, QUIET, HIGH, HIGH], times)[0] == [True, False, False, True]
    assert run(d, [HIGH, QUIET, HIGH], [0, SECOND, 31 * SECOND])[0] == [True, False, True]


def test_a_window_earlier_than_the_last_alert_is_not_held_back():
    """The device clock restarted: its windows are not cooling down from an alert in the future."""
    d = Decision(k=1, n=1, cooldown_s=30)
    fired, after = run(d, [HIGH, QUIET, HIGH], [100 * SECOND, 101 * SECOND, 5 * SECOND])
    assert fired == [True, False, True]
    assert after.last_alert_ns == 5 * SECOND


def test_device_times_at_the_ends_of_int64_are_exact():
    d = Decision(k=1, n=1, cooldown_s=30)
    assert run(d, [HIGH, QUIET, HIGH], [0, 1, INT64_MAX])[0] == [True, False, True]
    assert run(d, [HIGH, QUIET, HIGH], [INT64_MAX - 1, 0, INT64_MAX])[0] == [True, False, False]  # 1 ns later


def test_queries_are_decided_independently():
    rules = Rules.of([ONE_SHOT, Decision(k=2, n=2, cooldown_s=0)])
    changed, fired = decide(rules, [INITIAL_STATE, INITIAL_STATE], np.array([[HIGH, HIGH], [HIGH, HIGH]]), [0, 1])
    assert fired.tolist() == [[True, False], [False, True]]
    assert changed == {0: QueryState(1, False, 0), 1: QueryState(0b11, False, 1)}
    assert rules[np.array([1])].k.tolist() == [2]


def test_a_state_survives_its_encoding():
    for state in (INITIAL_STATE, QueryState(2**64 - 1, False, INT64_MAX), QueryState(5, True, 0)):
        assert QueryState.decode(state.encode()) == state
    assert QueryState.decode("3:1:-7") == QueryState(3, True, None)  # older versions wrote any negative


@pytest.mark.parametrize("text", ["", "1:1", "1:2:0", "-1:1:0", f"{2**64}:1:0", f"0:1:{INT64_MAX + 1}", "a:1:0"])
def test_a_malformed_state_is_refused(text):
    with pytest.raises(ValueError):
        QueryState.decode(text)


# ----- against a reference model -------------------------------------------------------------------------


def reference(d: Decision, state: QueryState, scores: list[float], times: list[int]) -> tuple[list[bool], QueryState]:
    """ALERTS.md's rule for one query, one window at a time, with a list of booleans for the history."""
    recent = [bool(state.hist >> age & 1) for age in reversed(range(MAX_SMOOTHING_N))]  # oldest first
    armed, last = state.armed, state.last_alert_ns
    fires = []
    for score, t in zip(scores, times):
        above = score >= d.threshold
        recent = (recent + [above])[-d.n :]
        cooling = last is not None and 0 <= t - last < int(d.cooldown_s * NS_PER_S)
        fire = armed and above and sum(recent) >= d.k and not cooling
        if fire:
            armed, last = False, t
        if score < d.threshold - d.hysteresis:
            armed = True
        fires.append(fire)
    return fires, QueryState(sum(bit << age for age, bit in enumerate(reversed(recent))), armed, last)


LEVELS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)  # shared by thresholds and scores, so that equality happens
levels = st.sampled_from(LEVELS) | st.floats(0.0, 1.0)


@st.composite
def decisions(draw) -> Decision:
    n = draw(st.integers(1, 4) | st.integers(1, MAX_SMOOTHING_N))
    threshold = draw(st.sampled_from(LEVELS[1:-1]) | st.floats(0.01, 0.99))
    cooldown_s = draw(st.sampled_from((0.0, 1.0, 2.5, 30.0)) | st.floats(0.0, 60.0))
    hysteresis = draw(st.sampled_from((0.0, threshold / 2)) | st.floats(0.0, threshold, exclude_max=True))
    return Decision(threshold, draw(st.integers(1, n)), n, cooldown_s, hysteresis)


states = st.builds(
    QueryState,
    st.integers(0, 2**MAX_SMOOTHING_N - 1),
    st.booleans(),
    st.none() | st.integers(0, 100 * SECOND) | st.just(INT64_MAX),
)


@st.composite
def clocks(draw, size: int) -> list[int]:
    """Device times of `size` windows: mostly forward by up to 40 s, sometimes back (a restarted clock)."""
    t, out = draw(st.integers(0, 100 * SECOND)), []
    for _ in range(size):
        t = max(0, t + draw(st.integers(0, 40 * SECOND) | st.integers(-100 * SECOND, 0)))
        out.append(t)
    return out


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_decide_agrees_with_the_reference_model(data):
    m = data.draw(st.integers(1, 4), "queries")
    size = data.draw(st.integers(0, 40), "windows")
    ds = data.draw(st.lists(decisions(), min_size=m, max_size=m), "decisions")
    before = data.draw(st.lists(states, min_size=m, max_size=m), "states")
    scores = np.array(
        data.draw(st.lists(st.lists(levels, min_size=m, max_size=m), min_size=size, max_size=size), "scores"),
        dtype=np.float64,
    ).reshape(size, m)
    times = data.draw(clocks(size), "times")
    changed, fired = decide(Rules.of(ds), before, scores, times)
    after = [changed.get(j, state) for j, state in enumerate(before)]
    for j, d in enumerate(ds):
        assert (fired[:, j].tolist(), after[j]) == reference(d, before[j], scores[:, j].tolist(), times), j
    assert all(after[j] != before[j] for j in changed)  # only changes come back
    split = data.draw(st.integers(0, size), "split")  # a stream's windows may come in any batches
    changed, head = decide(Rules.of(ds), before, scores[:split], times[:split])
    middle = [changed.get(j, state) for j, state in enumerate(before)]
    changed, tail = decide(Rules.of(ds), middle, scores[split:], times[split:])
    assert [changed.get(j, state) for j, state in enumerate(middle)] == after
    assert np.array_equal(np.vstack([head, tail]), fired)
