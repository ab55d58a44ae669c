"""A hostile neighbour against the matcher: a legitimate device streams beside an attacker's bad entries,
bad queries, tampered state, absurd clocks and stream floods, all in one real redis-server. The legitimate
alerts must still fire, the attack must be counted under the attacker's device (or query id) and reason,
and nothing may block.

Vectors as in test_alerts: the query is e0, the background e1..e8, so MATCH (e0) scores ~1, QUIET (e2) ~0.
"""

import time

import numpy as np
import pytest
from click.testing import CliRunner

from sensors.protocol import INT64_MAX
from streaming.alerts.decision import QueryState
from streaming.alerts.matcher import Matcher, MatcherSettings
from streaming.alerts.queries import notify, save_query
from streaming.alerts.records import Decision, Query
from streaming.alerts.timeline import timeline
from streaming.cli.alerts import alert
from streaming.records import Embedding
from streaming.redis_layout import (
    QUERY_SET,
    background_key,
    encode_embedding,
    query_key,
    register_streams,
    state_key,
    stream_key,
)
from streaming.stage import Counts

from .conftest import wait_for
from .test_alerts import (
    MATCH,
    MODEL,
    QUIET,
    SECOND,
    WAIT_S,
    WINDOW_S,
    add_query,
    alerts,
    counts,
    write,
)

ONE_SHOT = Decision(k=1, n=1, cooldown_s=0)  # every re-armed matching window fires
MAX_STEPS = 50  # a matcher that needs more steps to read a few dozen entries is stuck


def matcher(server, **overrides) -> Matcher:
    return Matcher(MatcherSettings(start_id="0", block_ms=10, **overrides), server.url)


def settle(m: Matcher) -> int:
    """Step until nothing is left to read; fails if the matcher keeps re-reading. Returns entries read."""
    read = 0
    for _ in range(MAX_STEPS):
        n = m.step()
        if not n:
            return read
        read += n
    raise AssertionError(f"the matcher still reads entries after {MAX_STEPS} steps: {m.stats()}")


def entry(device: str, t0: int, v=MATCH, t1: int | None = None) -> dict:
    e = Embedding(
        device, "audio", t0, t0 + WINDOW_S * SECOND if t1 is None else t1, np.asarray(v, np.float32), MODEL, 0, 0
    )
    return encode_embedding(e)


def pending(client, device: str, m: Matcher) -> int:
    return client.xpending(stream_key(device, "audio"), m.settings.group)["pending"]


# ----- bad entries ---------------------------------------------------------------------------------------


def test_bad_entries_are_acked_counted_under_the_attacker_and_do_not_block_the_batch(server, client):
    add_query(client, ONE_SHOT)
    legit = write(client, "wearable", [QUIET, MATCH, QUIET, MATCH])
    key = stream_key("attacker", "audio")
    good = entry("attacker", 0)
    bad = {
        "bad_time": [
            entry("attacker", 2**64),
            entry("attacker", 2**63, t1=2**63),
            entry("attacker", -1),
            entry("attacker", 10 * SECOND, t1=SECOND),
        ],
        "malformed": [{**good, "t0": b"abc"}, {"t0": 0}, {**good, "emb": b"\x00" * 10}],
        "not_unit": [{**good, "emb": np.full(64, np.nan, "<f4").tobytes()}, {**good, "emb": (2 * MATCH).tobytes()}],
        "wrong_dim": [
            encode_embedding(Embedding("attacker", "audio", 0, SECOND, np.eye(32, dtype=np.float32)[0], MODEL, 0, 0))
        ],
    }
    for fields in (f for group in bad.values() for f in group):
        client.xadd(key, fields)
    after_attack = client.xadd(key, entry("attacker", 20 * SECOND)).decode()  # the attacker's own good window
    register_streams(client, [key])
    m = matcher(server)
    assert m.step() == 4 + sum(map(len, bad.values())) + 1  # one batch holds both streams
    assert settle(m) == 0
    assert sorted(a.source_id for a in alerts(client)) == sorted([legit[1], legit[3], after_attack])
    got = Counts.of(m.stats())
    for reason, entries in bad.items():
        assert got.get(f"rejected_{reason}", "attacker") == len(entries), (reason, got)
    assert not got.get("rejected_", "wearable"), got
    assert (got.get("in", "audio"), got.get("scored", "audio")) == (
        4 + 1 + 1,
        4 + 1,
    )  # the wrong-dim one is read, not scored
    assert pending(client, "wearable", m) == pending(client, "attacker", m) == 0


def test_tampered_decision_state_is_counted_and_reset(server, client):
    q = add_query(client, ONE_SHOT)
    key = stream_key("wearable", "audio")
    ids = write(client, "wearable", [QUIET, MATCH])
    m = matcher(server)
    client.hset(state_key(m.settings.group, key), mapping={"last_id": "zz", q.id: f"{2**70}:1:-1"})
    settle(m)
    assert [a.source_id for a in alerts(client)] == [ids[1]]
    assert counts(m, "rejected_state", "wearable") == 1
    assert client.hget(state_key(m.settings.group, key), q.id) is not None  # rewritten by the commit
    assert client.hget(state_key(m.settings.group, key), "last_id").decode() == ids[1]


# ----- bad queries ---------------------------------------------------------------------------------------


def plant(client, query_id: str, fields: dict) -> None:
    """A query hash written by other means than `alert add`."""
    client.hset(query_key(query_id), mapping=fields)
    client.sadd(QUERY_SET, query_id)
    notify(client, "add", query_id)


def test_bad_queries_in_redis_are_skipped_and_counted_while_good_ones_keep_alerting(server, client):
    good = add_query(client, ONE_SHOT)
    stored = client.hgetall(query_key(good.id))
    m = matcher(server, discover_s=0)  # the device appears after the first step
    m.step()
    bad = {
        "dim0": {**stored, b"dim": 0},
        "missing": {"text": "only text"},
        "nanvec": {**stored, b"emb": np.full(64, np.nan, "<f4").tobytes()},
        "cool1e10": {**stored, b"cooldown_s": 1e10},
        "coolinf": {**stored, b"cooldown_s": "inf"},
        "thrnan": {**stored, b"threshold": "nan"},
        "k_gt_n": {**stored, b"k": 5, b"n": 3},
        "shortemb": {**stored, b"emb": b"\x00" * 10},
        "notutf8": {**stored, b"text": b"\xff\xfe"},
    }
    for query_id, fields in bad.items():
        plant(client, query_id, fields)
    client.hset(
        background_key(MODEL, "vision"),
        mapping={"prompts": "a", "emb": b"", "dim": 0, "logit_scale": 100, "exclude_cos": 0.9},
    )
    save_query(client, Query("a vision query", "vision", MATCH, MODEL))  # its background is broken
    ids = write(client, "wearable", [QUIET, MATCH])
    settle(m)
    assert [a.source_id for a in alerts(client)] == [ids[1]]  # the running matcher kept its good query
    got = Counts.of(m.stats())
    assert {query_id: got.get("rejected_query", query_id) for query_id in bad} == dict.fromkeys(bad, 1)
    assert got.get("rejected_background", "tiny/vision") == 1
    second = add_query(client, ONE_SHOT, text="a second query")  # another reload: counted once still
    ids = write(client, "wearable", [QUIET, MATCH], start_s=10)
    settle(m)
    assert m.stats()["queries"] == 2 and counts(m, "rejected_query", "dim0") == 1
    assert {a.query for a in alerts(client) if a.source_id == ids[1]} == {good.id, second.id}
    restarted = matcher(server, discover_s=0)  # the same group and consumer: a restart
    ids = write(client, "wearable", [QUIET, MATCH], start_s=20)
    settle(restarted)
    assert restarted.stats()["queries"] == 2
    assert {a.query for a in alerts(client) if a.source_id == ids[1]} == {good.id, second.id}
    assert {s.query.id for s in timeline(client, "wearable")} == {good.id, second.id}  # looking back works too


@pytest.mark.parametrize(
    "args, option",
    [
        (["--cooldown", "inf"], "--cooldown"),
        (["--cooldown", "nan"], "--cooldown"),
        (["--cooldown", "1e10"], "--cooldown"),
        (["--cooldown", "-1"], "--cooldown"),
        (["--threshold", "nan"], "--threshold"),
        (["--threshold", "inf"], "--threshold"),
        (["--hysteresis", "nan"], "--hysteresis"),
        (["--k", "4", "--n", "3"], "--k"),
        (["--n", "65"], "--n"),
    ],
)
def test_alert_add_refuses_absurd_settings_with_one_line(args, option):
    result = CliRunner().invoke(
        alert,
        ["add", "x", "--modality", "audio", "--model", MODEL, *args, "--redis", "redis://127.0.0.1:1/0"],
        catch_exceptions=False,
    )
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 2 and len(errors) == 1 and option in errors[0], result.output
    assert "Traceback" not in result.output and "cannot reach Redis" not in result.output


def test_alert_tune_refuses_a_nan_holdout(tmp_path):
    result = CliRunner().invoke(
        alert,
        [
            "tune",
            "x",
            "--positive",
            str(tmp_path),
            "--negative",
            str(tmp_path),
            "--holdout",
            "nan",
            "--redis",
            "redis://127.0.0.1:1/0",
        ],
    )
    assert result.exit_code == 2 and "--holdout" in result.output and "Traceback" not in result.output


# ----- time and delivery ---------------------------------------------------------------------------------


def test_device_clock_near_the_end_of_int64_alerts_with_exact_cooldown(server, client):
    add_query(client, Decision(k=1, n=1, cooldown_s=5, hysteresis=0.2))
    key = stream_key("old-clock", "audio")
    base = INT64_MAX - 100 * SECOND
    windows = [(MATCH, 0), (QUIET, 2), (MATCH, 4), (QUIET, 6), (MATCH, 8)]  # 4 s < cooldown 5 s <= 8 s
    ids = [client.xadd(key, entry("old-clock", base + s * SECOND, v)).decode() for v, s in windows[:3]]
    register_streams(client, [key])
    settle(matcher(server))
    state = client.hgetall(state_key(MatcherSettings.group, key))
    (query_state,) = [QueryState.decode(v.decode()) for k, v in state.items() if k != b"last_id"]
    assert query_state.last_alert_ns == base  # persisted exactly
    ids += [client.xadd(key, entry("old-clock", base + s * SECOND, v)).decode() for v, s in windows[3:]]
    register_streams(client, [key])
    settle(matcher(server))  # a new matcher: the state is read back from Redis
    got = alerts(client)
    assert [a.source_id for a in got] == [ids[0], ids[4]]
    assert [a.t0 for a in got] == [base, base + 8 * SECOND] and got[1].t1 == base + 10 * SECOND


def test_a_batch_read_again_after_a_refused_commit_is_counted_once(server, client):
    add_query(client, ONE_SHOT)
    client.xgroup_create(stream_key("wearable", "audio"), MatcherSettings.group, id="0", mkstream=True)
    register_streams(client, [stream_key("wearable", "audio")])
    m = matcher(server, retry_max_s=0.05)
    m.step()  # joins the stream
    ids = write(client, "wearable", [QUIET, MATCH, QUIET, MATCH])
    client.config_set("maxmemory", 1)  # Redis refuses writes (HSET: OOM), so the commit fails as a whole
    m.start()
    try:
        wait_for(lambda: counts(m, "redis_error") >= 3, WAIT_S, "the matcher to retry the refused commit")
        assert alerts(client) == [] and pending(client, "wearable", m) == 4
        client.config_set("maxmemory", 0)
        wait_for(lambda: pending(client, "wearable", m) == 0 and len(alerts(client)) == 2, WAIT_S, "the commit")
    finally:
        m.stop()
        client.config_set("maxmemory", 0)
    assert [a.source_id for a in alerts(client)] == [ids[1], ids[3]]
    assert (counts(m, "in"), counts(m, "scored"), counts(m, "alert")) == (4, 4, 2)


# ----- bounded per-stream state --------------------------------------------------------------------------


def test_state_expires_idle_streams_leave_the_polled_set_and_the_cap_delays_without_losing(server, client):
    add_query(client, ONE_SHOT)
    devices = ["d0", "d1", "d2"]
    first = {d: write(client, d, [MATCH])[0] for d in devices}
    m = matcher(server, max_streams=2, idle_s=1.0, discover_s=0, state_ttl_s=120)
    settle(m)
    assert m.stats()["streams"] == 2 and counts(m, "refused_stream_cap") >= 1  # one waits for room, unread
    group = m.settings.group
    for d in devices:
        ttl = client.ttl(state_key(group, stream_key(d, "audio")))
        assert ttl == -2 or 0 < ttl <= 120, (d, ttl)  # -2: not read yet
    time.sleep(1.2)
    wait_for(lambda: m.step() == 0 and len(alerts(client)) == 3, WAIT_S, "the refused stream to be read")
    assert sorted(a.source_id for a in alerts(client)) == sorted(first.values())  # nothing lost
    time.sleep(1.2)
    m.step()
    assert m.stats()["streams"] == 0 and m.states == {}  # all idle: nothing polled, nothing kept
    client.expire(state_key(group, stream_key("d0", "audio")), 5)
    later = write(client, "d0", [QUIET, MATCH], start_s=10)
    wait_for(lambda: m.step() == 0 and len(alerts(client)) == 4, WAIT_S, "the idle stream's new entry")
    assert alerts(client)[-1].source_id == later[1] and m.stats()["streams"] == 1
    assert client.ttl(state_key(group, stream_key("d0", "audio"))) > 5  # renewed by the commit


def test_device_glob_does_not_take_the_streams_of_a_device_with_a_colon(server, client):
    add_query(client, ONE_SHOT)
    (mine,) = write(client, "a", [MATCH])
    write(client, "a:vision", [MATCH])  # key bindstream:emb:a:vision:audio matches bindstream:emb:a:*
    m = matcher(server, devices="a")
    settle(m)
    assert [(a.device, a.source_id) for a in alerts(client)] == [("a", mine)] and m.stats()["streams"] == 1
