"""Events against a real redis-server and an in-process matcher: a device plays an event (scores above threshold
for several windows, then below) and the alerts stream gets one start, an update per new peak and one end, and
the event one record; max duration; replays add nothing; a silent stream raises one health event, ended once
its entries flow again; the record helpers of streaming/alerts/events.py.

Vectors as in test_alerts (the model `tiny` has random weights, so embeddings are written straight into the
streams): the query is e0, the background e1..e8, `with_share(p)` a window scoring p, QUIET ~0.
"""

import json

import pytest

from streaming.alerts.events import NoEvent, list_events, load_event, set_review
from streaming.alerts.matcher import Matcher, MatcherSettings
from streaming.alerts.queries import save_query
from streaming.alerts.records import Decision, Query
from streaming.redis_layout import (
    ALERTS_CHANNEL,
    ALERTS_STREAM,
    END,
    ENDED,
    EVENTS_INDEX,
    HEALTH_EVENT,
    HEALTH_QUERY,
    OPEN,
    QUERY_EVENT,
    START,
    UPDATE,
    Alert,
    event_id,
    event_key,
    health_key,
    id_tuple,
    state_key,
    stream_key,
)

from .conftest import wait_for
from .test_alerts import (
    MATCH,
    MODEL,
    QUIET,
    SECOND,
    WAIT_S,
    WINDOW_S,
    counts,
    with_share,
    write,
)

SINK = "json://127.0.0.1:9/hook"  # a notify URL: only copied into the record here, never called
ONE_SHOT = Decision(k=1, n=1, cooldown_s=0)
MAX_STEPS = 50  # a matcher that needs more steps to read a few dozen entries is stuck


def add_query(client, decision: Decision, notify=()) -> Query:
    return save_query(client, Query("a dog barking", "audio", MATCH, MODEL, decision=decision, notify=notify))


def matcher(server, **overrides) -> Matcher:
    return Matcher(MatcherSettings(**{"start_id": "0", "block_ms": 10, **overrides}), server.url)


def settle(m: Matcher) -> None:
    """Step until nothing is left to read."""
    for _ in range(MAX_STEPS):
        if not m.step():
            return
    raise AssertionError(f"the matcher still reads entries after {MAX_STEPS} steps: {m.stats()}")


def server_ms(client) -> int:
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


def entries(client, kind: str = QUERY_EVENT) -> list[Alert]:
    return [a for a in (Alert.from_entry(i, f) for i, f in client.xrange(ALERTS_STREAM)) if a.kind == kind]


# ----- query events --------------------------------------------------------------------------------------


def test_an_event_gives_one_start_updates_at_new_peaks_one_end_and_one_record(server, client):
    q = add_query(client, Decision(k=2, n=3, cooldown_s=0, hysteresis=0.2), notify=(SINK,))
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(ALERTS_CHANNEL)
    shares = [0.6, 0.7, 0.65, 0.9, 0.9, 0.4, 0.1, 0.1]  # above from window 1; 0.4 is no re-arm, 0.1 is
    ids = write(client, "dev", [QUIET] + [with_share(p) for p in shares[:4]])
    m = matcher(server)
    settle(m)  # the event spans two batches
    ids += write(client, "dev", [with_share(p) for p in shares[4:]], start_s=5 * WINDOW_S)
    settle(m)
    key = stream_key("dev", "audio")
    got = entries(client)
    assert [(a.state, a.source_id) for a in got] == [(START, ids[2]), (UPDATE, ids[4]), (END, ids[7])]
    eid = event_id(q.id, key, ids[2])
    assert {a.event for a in got} == {eid} and {a.query for a in got} == {q.id}
    start, update, end = got
    assert (start.t0, start.t1, update.t0) == (2 * WINDOW_S * SECOND, 3 * WINDOW_S * SECOND, 4 * WINDOW_S * SECOND)
    assert start.score == pytest.approx(0.7, abs=1e-3) and update.score == pytest.approx(0.9, abs=1e-3)
    assert (end.t0, end.t1) == (2 * WINDOW_S * SECOND, 6 * WINDOW_S * SECOND)  # to the end of the last window above
    assert end.score == update.score  # the peak
    e = load_event(client, eid)
    assert (e.kind, e.device, e.query, e.query_text, e.modality, e.model, e.source) == (
        QUERY_EVENT,
        "dev",
        q.id,
        "a dog barking",
        "audio",
        MODEL,
        key,
    )
    assert (e.start_ns, e.end_ns, e.peak, e.peak_source_id, e.windows) == (
        end.t0,
        end.t1,
        end.score,
        ids[4],
        4,  # windows 2..5 were above threshold
    )
    assert (e.state, e.review, e.reviewed_ns, e.notify) == (ENDED, "none", 0, (SINK,))
    assert 0 < e.detected_ns <= e.ended_ns
    assert 0 < client.ttl(event_key(eid)) <= m.settings.event_ttl_s
    assert client.zscore(EVENTS_INDEX, eid) == e.detected_ns // 1_000_000
    published = [json.loads(wait_for(lambda: pubsub.get_message(timeout=0.1), WAIT_S, "an entry")["data"]) for _ in got]
    assert [(p["state"], p["event"], p["id"]) for p in published] == [(a.state, eid, a.id) for a in got]
    assert (counts(m, "event_start"), counts(m, "event_update"), counts(m, "event_end")) == (1, 1, 1)
    assert counts(m, "alert", "audio") == 1  # the starts, as before events


def test_an_open_event_record_grows_with_its_windows(server, client):
    q = add_query(client, ONE_SHOT)
    ids = write(client, "dev", [MATCH, MATCH, MATCH])
    m = matcher(server)
    settle(m)
    e = load_event(client, event_id(q.id, stream_key("dev", "audio"), ids[0]))
    assert (e.state, e.ended_ns, e.windows, e.end_ns) == (OPEN, 0, 3, 3 * WINDOW_S * SECOND)
    assert [a.state for a in entries(client)] == [START]  # equal scores: no new peak


def test_max_duration_ends_an_event_and_the_query_stays_disarmed_until_it_rearms(server, client):
    q = add_query(client, ONE_SHOT)
    ids = write(client, "dev", [MATCH] * 6 + [QUIET, MATCH])  # windows every 2 s
    m = matcher(server, max_event_s=5)
    settle(m)
    got = entries(client)
    assert [(a.state, a.source_id) for a in got] == [(START, ids[0]), (END, ids[3]), (START, ids[7])]
    assert (got[1].t0, got[1].t1) == (0, 3 * WINDOW_S * SECOND)  # windows 0..2: the one at 6 s ended it
    first = load_event(client, event_id(q.id, stream_key("dev", "audio"), ids[0]))
    assert (first.state, first.windows) == (ENDED, 3)
    assert load_event(client, got[2].event).state == OPEN


def test_a_replayed_commit_adds_nothing(server, client):
    q = add_query(client, ONE_SHOT)
    key = stream_key("dev", "audio")
    write(client, "dev", [with_share(0.6), with_share(0.9), QUIET])
    m = matcher(server, discover_s=0)  # XGROUP SETID is no write: read at a discovery
    settle(m)
    before = [(a.id, a.state) for a in entries(client)]
    assert [state for _, state in before] == [START, UPDATE, END]
    eid = entries(client)[0].event
    set_review(client, eid, "confirmed")
    record = client.hgetall(event_key(eid))
    client.xgroup_setid(key, m.settings.group, "0")  # every entry delivered again: applied before, skipped
    settle(m)
    assert counts(m, "replayed") == 3
    client.delete(state_key(m.settings.group, key))  # the decision state lost too: decided again
    client.xgroup_setid(key, m.settings.group, "0")
    fresh = matcher(server)
    settle(fresh)
    assert [(a.id, a.state) for a in entries(client)] == before
    assert client.hgetall(event_key(eid)) == record  # the review kept, nothing rewritten
    assert counts(fresh, "duplicate_alert") == 3 and counts(fresh, "event_start") == 0
    assert client.zcard(EVENTS_INDEX) == 1 and record[b"query"].decode() == q.id


# ----- health events -------------------------------------------------------------------------------------


def test_a_silent_stream_raises_one_health_event_ended_when_entries_flow_again(server, client):
    (old,) = write(client, "ghost", [MATCH])  # written before the group: never seen, never raises
    after_ghost = f"{id_tuple(old)[0] + 1}-0"
    wait_for(lambda: server_ms(client) > id_tuple(old)[0], WAIT_S, "the server clock to pass the ghost's entry")
    (last,) = write(client, "dev", [MATCH], start_s=10)
    m = matcher(server, silence_s=0.3, discover_s=0, start_id=after_ghost)
    key = stream_key("dev", "audio")

    def health():
        m.step()
        return entries(client, HEALTH_EVENT)

    (start,) = wait_for(health, WAIT_S, "the health event of the silent stream")
    assert (start.state, start.query, start.query_text, start.device, start.modality) == (
        START,
        HEALTH_QUERY,
        "dev audio silent",
        "dev",
        "audio",
    )
    assert (start.source, start.source_id, start.t0, start.t1) == (key, last, 10 * SECOND, 12 * SECOND)
    assert start.score >= 0.3 and start.threshold == 0.3
    for _ in range(3):
        m.step()
    restarted = matcher(server, silence_s=0.3, discover_s=0, start_id=after_ghost)  # reads the open ones back
    restarted.step()
    assert len(entries(client, HEALTH_EVENT)) == 1 and counts(m, "health_start", "dev") == 1
    (flowing,) = write(client, "dev", [MATCH], start_s=20)
    end = wait_for(lambda: restarted.step() == 0 and entries(client, HEALTH_EVENT)[1:], WAIT_S, "the end")[0]
    assert (end.state, end.event, end.source_id) == (END, start.event, flowing)
    assert (end.t0, end.t1) == (12 * SECOND, 20 * SECOND)  # from the last window's end to the next one's start
    assert end.score == (id_tuple(flowing)[0] - id_tuple(last)[0]) / 1000
    e = load_event(client, start.event)
    assert (e.kind, e.state, e.start_ns, e.end_ns, e.peak_source_id) == (
        HEALTH_EVENT,
        ENDED,
        12 * SECOND,
        20 * SECOND,
        last,
    )
    assert client.hlen(health_key(m.settings.group, "dev")) == 0 and counts(restarted, "health_end", "dev") == 1
    assert set_review(client, e.id, "false_positive").review == "false_positive"  # health events are reviewed too
    assert {a.device for a in entries(client, HEALTH_EVENT)} == {"dev"}  # ghost: never seen


# ----- the record helpers --------------------------------------------------------------------------------


def test_list_events_filters_newest_first_and_review_is_checked(server, client):
    q = add_query(client, ONE_SHOT)
    for device in ("a", "b", "a", "c"):
        write(client, device, [MATCH, QUIET])
        settle(matcher(server))
    events, skipped = list_events(client)
    assert skipped == 0 and [e.device for e in events] == ["c", "a", "b", "a"]  # newest first
    assert [e.device for e in list_events(client, device="a")[0]] == ["a", "a"]
    assert len(list_events(client, device="a", limit=1)[0]) == 1
    assert list_events(client, query=q.id)[0] == events and list_events(client, query="other")[0] == []
    assert list_events(client, since_ms=60_000)[0] == events
    client.hset(event_key(events[0].id), "review", "maybe")  # a record edited by hand
    assert list_events(client) == (events[1:], 1)
    with pytest.raises(ValueError, match="must be one of"):
        set_review(client, events[1].id, "maybe")
    with pytest.raises(NoEvent):
        set_review(client, "0" * 16, "confirmed")
    assert not client.exists(event_key("0" * 16))
    with pytest.raises(NoEvent):
        load_event(client, "0" * 16)
    with pytest.raises(ValueError):
        list_events(client, limit=0)


def test_many_silent_streams_are_committed_in_chunks_and_a_deleted_one_is_dropped(server, client):
    devices = [f"d{i}" for i in range(5)]
    for d in devices:
        write(client, d, [MATCH])
    m = matcher(server, silence_s=0.2, discover_s=0, idle_s=0.1, health_commit=2)
    wait_for(lambda: m.step() == 0 and len(entries(client, HEALTH_EVENT)) == 5, WAIT_S, "five health events")
    assert sorted(a.device for a in entries(client, HEALTH_EVENT)) == devices
    silent = [health_key(m.settings.group, d) for d in devices]  # each device's open health events
    assert sum(map(client.hlen, silent)) == 5 and counts(m, "health_start") == 5
    wait_for(lambda: m.step() == 0 and m.stats()["streams"] == 0, WAIT_S, "the streams to be let go as idle")
    client.delete(stream_key("d0", "audio"))  # a device's stream removed (retention): it never flows again
    m.step()
    assert sum(map(client.hlen, silent)) == 4 and not client.hexists(silent[0], stream_key("d0", "audio"))
    assert [a.state for a in entries(client, HEALTH_EVENT)] == [START] * 5  # no end for it


@pytest.mark.parametrize(
    "setting", [{"max_event_s": 0}, {"max_event_s": float("nan")}, {"silence_s": 0}, {"health_commit": 0}]
)
def test_event_settings_out_of_range_are_refused(setting):
    with pytest.raises(ValueError, match=next(iter(setting))):
        MatcherSettings(**setting)
