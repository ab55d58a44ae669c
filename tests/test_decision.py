"""The decision rule as a pure function: no redis-server, no Ray. Hand-made sequences pin each part of the rule
(first window, k of n, hysteresis, cooldown in device time, events: start, updates at new peaks, end at re-arm,
at max duration or at a restarted clock), and hypothesis compares `decide` with a plain one-window-at-a-time
model of ALERTS.md's rule over random settings, states, scores and clocks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sensors.protocol import INT64_MAX, NS_PER_S
from streaming.alerts.decision import INITIAL_STATE, OpenEvent, QueryState, Rules, decide
from streaming.alerts.records import MAX_SMOOTHING_N, Decision
from streaming.redis_layout import END, START, UPDATE

SECOND = NS_PER_S
WINDOW = 2 * SECOND  # each window's t1 - t0
HIGH, LOW, QUIET = 0.9, 0.4, 0.1  # with the default threshold 0.5 and hysteresis 0.2: above, between, re-arming
ONE_SHOT = Decision(k=1, n=1, cooldown_s=0)  # every armed window above threshold fires


def entry(i: int) -> str:
    """The entry id of window i."""
    return f"{i + 1}-0"


def run_events(
    decision: Decision,
    scores: list[float],
    times: list[int] | None = None,
    state: QueryState = INITIAL_STATE,
    max_event_s: float = 300.0,
) -> tuple[list[tuple[int, str, OpenEvent]], QueryState]:
    """One query's event changes (window, state, event) over `scores` (windows one second apart unless `times`
    says, each 2 s long), and its state after."""
    times = [i * SECOND for i in range(len(scores))] if times is None else times
    changed, changes = decide(
        Rules.of([decision], max_event_s),
        [state],
        np.array(scores, dtype=np.float64)[:, None],
        times,
        [t + WINDOW for t in times],
        [entry(i) for i in range(len(scores))],
    )
    return [(c.window, c.state, c.event) for c in changes], changed.get(0, state)


def run(
    decision: Decision, scores: list[float], times: list[int] | None = None, state: QueryState = INITIAL_STATE
) -> tuple[list[bool], QueryState]:
    """One query's fires (event starts) over `scores`, and its state after."""
    changes, after = run_events(decision, scores, times, state)
    starts = {i for i, state, _ in changes if state == START}
    return [i in starts for i in range(len(scores))], after


# ----- each part of the rule -----------------------------------------------------------------------------


def test_the_first_window_fires_when_one_window_is_enough():
    fired, after = run(ONE_SHOT, [HIGH])
    assert fired == [True]
    assert after == QueryState(hist=1, armed=False, last_alert_ns=0, event=OpenEvent("1-0", 0, WINDOW, HIGH, 1))


def test_the_first_window_waits_for_k_windows():
    assert run(Decision(k=2, n=3), [HIGH])[0] == [False]
    assert run(Decision(k=2, n=3), [HIGH, HIGH])[0] == [False, True]


def test_a_quiet_first_window_changes_no_state():
    """Nothing to write: a fresh query's state is only stored once it differs from the initial one."""
    assert decide(Rules.of([Decision()]), [INITIAL_STATE], np.array([[QUIET]]), [0], [WINDOW], ["1-0"]) == ({}, [])


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
    assert run(d, [HIGH, QUIET, HIGH], [0, 1, INT64_MAX - WINDOW])[0] == [True, False, True]
    assert run(d, [HIGH, QUIET, HIGH], [INT64_MAX - WINDOW - 1, 0, INT64_MAX - WINDOW])[0] == [True, False, False]


def test_queries_are_decided_independently():
    rules = Rules.of([ONE_SHOT, Decision(k=2, n=2, cooldown_s=0)])
    changed, changes = decide(
        rules, [INITIAL_STATE, INITIAL_STATE], np.array([[HIGH, HIGH], [HIGH, HIGH]]), [0, 1], [2, 3], ["1-0", "2-0"]
    )
    assert [(c.window, c.query, c.state) for c in changes] == [(0, 0, START), (1, 1, START)]
    assert changed == {
        0: QueryState(1, False, 0, OpenEvent("1-0", 0, 3, HIGH, 2)),  # the second window extends its event
        1: QueryState(0b11, False, 1, OpenEvent("2-0", 1, 3, HIGH, 1)),
    }
    assert rules[np.array([1])].k.tolist() == [2]


# ----- events --------------------------------------------------------------------------------------------


def test_an_event_updates_only_at_a_new_peak_and_ends_when_the_query_rearms():
    scores = [QUIET, 0.6, 0.8, 0.7, 0.8, 0.9, 0.4, 0.1, 0.6]
    changes, after = run_events(ONE_SHOT, scores)
    assert [(i, state) for i, state, _ in changes] == [(1, START), (2, UPDATE), (5, UPDATE), (7, END), (8, START)]
    assert changes[0][2] == OpenEvent("2-0", SECOND, 3 * SECOND, 0.6, 1)
    assert changes[2][2] == OpenEvent("2-0", SECOND, 7 * SECOND, 0.9, 5)  # windows 1..5; 0.8 again is no new peak
    assert changes[3][2] == changes[2][2]  # 0.4 neither extends nor ends it; 0.1 ends it as it stood
    assert after.event == OpenEvent("9-0", 8 * SECOND, 10 * SECOND, 0.6, 1)


def test_an_event_ends_at_max_duration_and_the_query_stays_disarmed_until_it_rearms():
    scores = [HIGH] * 6 + [QUIET, HIGH]
    changes, after = run_events(ONE_SHOT, scores, max_event_s=3)
    assert [(i, state) for i, state, _ in changes] == [(0, START), (3, END), (7, START)]
    assert changes[1][2] == OpenEvent("1-0", 0, 4 * SECOND, HIGH, 3)  # the ending window (t0 3 s) is not in it
    assert after.event is not None and after.event.opened_id == "8-0"


def test_an_event_spans_batches_and_a_restarted_clock_ends_it():
    d = Decision(k=1, n=1, cooldown_s=30)
    changes, middle = run_events(d, [HIGH, 0.95], [100 * SECOND, 101 * SECOND])
    assert [state for _, state, _ in changes] == [START, UPDATE] and middle.event is not None
    changes, after = run_events(d, [HIGH], [5 * SECOND], state=middle)  # the device restarted its clock
    assert changes == [(0, END, OpenEvent("1-0", 100 * SECOND, 103 * SECOND, 0.95, 2))]
    assert after.event is None and not after.armed


def test_a_state_survives_its_encoding():
    event = OpenEvent("1712345678901-3", 5, INT64_MAX, 0.7312345678901234, 3)
    for state in (
        INITIAL_STATE,
        QueryState(2**64 - 1, False, INT64_MAX),
        QueryState(5, True, 0),
        QueryState(1, False, 0, event),
    ):
        assert QueryState.decode(state.encode()) == state
    assert QueryState.decode("3:1:-7") == QueryState(3, True, None)  # older versions wrote any negative
    assert QueryState.decode("3:0:9") == QueryState(3, False, 9, None)  # the format before events: none open


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1:1",
        "1:2:0",
        "-1:1:0",
        f"{2**64}:1:0",
        f"0:1:{INT64_MAX + 1}",
        "a:1:0",
        "1:0:0:1-0:0:0:0.5",  # an event's field missing
        "1:1:0:1-0:0:0:0.5:1",  # armed with an open event
        "1:0:0:x:0:0:0.5:1",  # not an entry id
        "1:0:0:1-0:0:0:nan:1",
        "1:0:0:1-0:0:0:1.5:1",
        "1:0:0:1-0:0:0:0.5:0",  # an event has at least its opening window
        "1:0:0:1-0:-1:0:0.5:1",
        f"1:0:0:1-0:0:{INT64_MAX + 1}:0.5:1",
    ],
)
def test_a_malformed_state_is_refused(text):
    with pytest.raises(ValueError):
        QueryState.decode(text)


# ----- against a reference model -------------------------------------------------------------------------


def reference(
    d: Decision, max_event_s: float, state: QueryState, scores: list[float], times: list[int], ids: list[str]
) -> tuple[list[tuple[int, str, OpenEvent]], QueryState]:
    """ALERTS.md's rule for one query, one window at a time, with a list of booleans for the history and the
    open event as a plain value."""
    recent = [bool(state.hist >> age & 1) for age in reversed(range(MAX_SMOOTHING_N))]  # oldest first
    armed, last, event = state.armed, state.last_alert_ns, state.event
    max_ns = int(max_event_s * NS_PER_S)
    changes = []
    for i, (score, t, entry_id) in enumerate(zip(scores, times, ids)):
        above, rearm = score >= d.threshold, score < d.threshold - d.hysteresis
        recent = (recent + [above])[-d.n :]
        if event is not None and (rearm or not 0 <= t - event.start_ns < max_ns):
            changes.append((i, END, event))
            event = None
        if event is not None and above:
            peaked = score > event.peak
            event = OpenEvent(event.opened_id, event.start_ns, t + WINDOW, max(event.peak, score), event.windows + 1)
            if peaked:
                changes.append((i, UPDATE, event))
        cooling = last is not None and 0 <= t - last < int(d.cooldown_s * NS_PER_S)
        if armed and above and sum(recent) >= d.k and not cooling:
            armed, last, event = False, t, OpenEvent(entry_id, t, t + WINDOW, score, 1)
            changes.append((i, START, event))
        if rearm:
            armed = True
    hist = sum(bit << age for age, bit in enumerate(reversed(recent)))
    return changes, QueryState(hist, armed, last, event)


LEVELS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)  # shared by thresholds and scores, so that equality happens
levels = st.sampled_from(LEVELS) | st.floats(0.0, 1.0)


@st.composite
def decisions(draw) -> Decision:
    n = draw(st.integers(1, 4) | st.integers(1, MAX_SMOOTHING_N))
    threshold = draw(st.sampled_from(LEVELS[1:-1]) | st.floats(0.01, 0.99))
    cooldown_s = draw(st.sampled_from((0.0, 1.0, 2.5, 30.0)) | st.floats(0.0, 60.0))
    hysteresis = draw(st.sampled_from((0.0, threshold / 2)) | st.floats(0.0, threshold, exclude_max=True))
    return Decision(threshold, draw(st.integers(1, n)), n, cooldown_s, hysteresis)


times_ns = st.integers(0, 100 * SECOND) | st.just(INT64_MAX - WINDOW)


@st.composite
def query_states(draw) -> QueryState:
    """Any state `decide` can leave: an open event only while disarmed."""
    hist = draw(st.integers(0, 2**MAX_SMOOTHING_N - 1))
    last = draw(st.none() | times_ns)
    if draw(st.booleans()):
        start = draw(times_ns)
        event = OpenEvent(
            f"{draw(st.integers(0, 10**6))}-{draw(st.integers(0, 3))}",
            start,
            start + WINDOW,
            draw(levels),
            draw(st.integers(1, 100)),
        )
        return QueryState(hist, False, last, event)
    return QueryState(hist, draw(st.booleans()), last)


@st.composite
def clocks(draw, size: int) -> list[int]:
    """Device times of `size` windows: mostly forward by up to 40 s, sometimes back (a restarted clock)."""
    t, out = draw(st.integers(0, 100 * SECOND)), []
    for _ in range(size):
        t = max(0, t + draw(st.integers(0, 40 * SECOND) | st.integers(-100 * SECOND, 0)))
        out.append(t)
    return out


def per_query(changes, m: int) -> list[list[tuple[int, str, OpenEvent]]]:
    return [[(c.window, c.state, c.event) for c in changes if c.query == j] for j in range(m)]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_decide_agrees_with_the_reference_model(data):
    m = data.draw(st.integers(1, 4), "queries")
    size = data.draw(st.integers(0, 40), "windows")
    ds = data.draw(st.lists(decisions(), min_size=m, max_size=m), "decisions")
    max_event_s = data.draw(st.sampled_from((1.0, 2.5, 30.0, 300.0)) | st.floats(0.001, 100.0), "max_event_s")
    before = data.draw(st.lists(query_states(), min_size=m, max_size=m), "states")
    scores = np.array(
        data.draw(st.lists(st.lists(levels, min_size=m, max_size=m), min_size=size, max_size=size), "scores"),
        dtype=np.float64,
    ).reshape(size, m)
    times = data.draw(clocks(size), "times")
    ends, ids = [t + WINDOW for t in times], [entry(i) for i in range(size)]
    rules = Rules.of(ds, max_event_s)
    changed, changes = decide(rules, before, scores, times, ends, ids)
    after = [changed.get(j, state) for j, state in enumerate(before)]
    for j, d in enumerate(ds):
        expected = reference(d, max_event_s, before[j], scores[:, j].tolist(), times, ids)
        assert (per_query(changes, m)[j], after[j]) == expected, j
    assert [c.window for c in changes] == sorted(c.window for c in changes)  # in stream order
    assert all(after[j] != before[j] for j in changed)  # only changes come back
    split = data.draw(st.integers(0, size), "split")  # a stream's windows may come in any batches
    changed, head = decide(rules, before, scores[:split], times[:split], ends[:split], ids[:split])
    middle = [changed.get(j, state) for j, state in enumerate(before)]
    changed, tail = decide(rules, middle, scores[split:], times[split:], ends[split:], ids[split:])
    assert [changed.get(j, state) for j, state in enumerate(middle)] == after
    assert head + [c._replace(window=c.window + split) for c in tail] == changes
