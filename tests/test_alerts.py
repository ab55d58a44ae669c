"""Text-query alerts against a real redis-server (one per test) and, for the actor restart, a real local Ray.

Embeddings are known unit vectors written straight into the streams (the model `tiny` has random weights):
the query is e0, the background prompts e1..e8, so a window e0 scores ~1 and a background window ~0.
"""

import importlib.util
import os
import re
import threading
import time

import numpy as np
import pytest
import redis
import soundfile
from click.testing import CliRunner

from encoders.weights import default_checkpoint_path
from streaming.alerts.matcher import Matcher, MatcherSettings, start_matchers
from streaming.alerts.queries import load_background, load_query, save_query
from streaming.alerts.records import Decision, Query, QueryError
from streaming.alerts.scoring import ModalityIndex
from streaming.alerts.search import search
from streaming.alerts.tuning import confusion, fit_threshold
from streaming.cli.alerts import alert, match
from streaming.cli.bench import bench_alerts
from streaming.cli.events import watch
from streaming.cli.search import search_command, timeline_command
from streaming.cli.terminal import console
from streaming.records import Embedding
from streaming.redis_layout import (
    ALERTS_CHANNEL,
    ALERTS_STREAM,
    START,
    Alert,
    encode_embedding,
    query_key,
    register_streams,
    state_key,
    stream_key,
)
from streaming.stage import Counts

from .conftest import ASSETS, BACKGROUND, DIM, MODEL, wait_for

SECOND = 1_000_000_000
WINDOW_S = 2
NOISE_AXIS = 9  # orthogonal to query and background
WAIT_S = 60.0  # bound on every wait for a background matcher


def basis(i: int) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[i] = 1
    return v


def with_share(p: float) -> np.ndarray:
    """A unit window whose share for the query e0 against background e1..e8 is `p`."""
    beta = 0.3
    alpha = beta + np.log(p / (1 - p) * (1 + 7 * np.exp(-100 * beta))) / 100
    v = alpha * basis(0) + beta * basis(1)
    return (v + np.sqrt(1 - alpha**2 - beta**2) * basis(NOISE_AXIS)).astype(np.float32)


MATCH, QUIET = basis(0), basis(2)


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Tables one line per row (CliRunner's terminal is 80 columns wide)."""
    monkeypatch.setattr(console, "width", 250)


def add_query(client, decision: Decision | None = None, device="*", text="a dog barking", vector=MATCH) -> Query:
    return save_query(client, Query(text, "audio", vector, MODEL, device=device, decision=decision or Decision()))


def write(client, device: str, vectors, start_s: float = 0.0, model: str = MODEL) -> list[str]:
    """XADD audio windows 2 s apart from device time `start_s`; returns the entry ids."""
    ids = []
    for i, v in enumerate(vectors):
        t0 = int((start_s + i * WINDOW_S) * SECOND)
        e = Embedding(device, "audio", t0, t0 + WINDOW_S * SECOND, np.asarray(v, np.float32), model, 0, 0)
        ids.append(client.xadd(stream_key(device, "audio"), encode_embedding(e)).decode())
    register_streams(client, [stream_key(device, "audio")])  # as the publisher does: matchers find it there
    return ids


def matcher(server, **overrides) -> Matcher:
    return Matcher(MatcherSettings(**{"start_id": "0", "block_ms": 10, **overrides}), server.url)


def drain(m: Matcher) -> None:
    while m.step():
        pass


def alerts(client) -> list[Alert]:
    """The alerts: the entries that start an event (its updates and end are tests/test_events.py's)."""
    return [a for a in (Alert.from_entry(i, f) for i, f in client.xrange(ALERTS_STREAM)) if a.state == START]


def counts(m: Matcher, event: str, label: str | None = None) -> int:
    return Counts.of(m.stats()).get(event, label)


# ----- the decision -------------------------------------------------------------------------------------


def test_share_helper_and_calibration(client):
    index = ModalityIndex([add_query(client)], load_background(client, MODEL, "audio"))
    shares = index.shares(np.stack([MATCH, QUIET, with_share(0.4), with_share(0.9)]))[:, 0]
    np.testing.assert_allclose(shares, [1.0, 0.0, 0.4, 0.9], atol=1e-4)


def test_event_gives_one_alert_at_the_kth_window(server, client):
    q = add_query(client, Decision(k=3, n=4))
    ids = write(client, "dev", [QUIET] * 3 + [MATCH] * 5 + [QUIET] * 3)
    m = matcher(server)
    drain(m)
    (a,) = alerts(client)
    assert (a.query, a.query_text, a.device, a.modality, a.model) == (q.id, "a dog barking", "dev", "audio", MODEL)
    assert a.source_id == ids[3 + 2] and a.source == stream_key("dev", "audio")
    assert (a.t0, a.t1) == (5 * WINDOW_S * SECOND, 6 * WINDOW_S * SECOND)
    assert a.score > 0.99 and a.threshold == 0.5
    assert counts(m, "scored") == 11 and client.xpending(stream_key("dev", "audio"), m.settings.group)["pending"] == 0


def test_alert_is_published_on_the_channel(server, client):
    add_query(client, Decision(k=1, n=1))
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(ALERTS_CHANNEL)
    write(client, "dev", [MATCH])
    drain(matcher(server))
    message = wait_for(lambda: pubsub.get_message(timeout=0.1), WAIT_S, "the published alert")
    assert b'"query_text":"a dog barking"' in message["data"] and alerts(client)[0].id in message["data"].decode()


def test_background_only_gives_no_alert(server, client):
    add_query(client, Decision(k=1, n=1, threshold=0.3, hysteresis=0.1))
    rng = np.random.default_rng(0)
    windows = [np.abs(rng.normal(size=8)) @ np.stack([basis(i) for i in BACKGROUND]) for _ in range(30)]
    write(client, "dev", [w / np.linalg.norm(w) for w in windows])
    m = matcher(server)
    drain(m)
    assert alerts(client) == [] and counts(m, "scored") == 30


def test_cooldown(server, client):
    add_query(client, Decision(k=2, n=3, cooldown_s=30, hysteresis=0.2))
    event = [MATCH] * 3 + [QUIET] * 2  # fires at its 2nd window, then re-arms
    ids = write(client, "dev", event, start_s=0)  # alert at t0 = 2 s
    write(client, "dev", event, start_s=12)  # would fire at 14 s: 12 s after, inside the cooldown
    later = write(client, "dev", event, start_s=100)  # fires at 102 s
    drain(matcher(server))
    assert [a.source_id for a in alerts(client)] == [ids[1], later[1]]


def test_hysteresis(server, client):
    add_query(client, Decision(k=1, n=1, threshold=0.5, hysteresis=0.2, cooldown_s=0))
    scores = [0.99, 0.4, 0.99, 0.1, 0.99]  # fire; 0.4 >= 0.3 does not re-arm; ...; 0.1 re-arms; fire
    ids = write(client, "dev", [with_share(p) for p in scores])
    drain(matcher(server))
    assert [a.source_id for a in alerts(client)] == [ids[0], ids[4]]


def test_corrupt_records_are_counted_and_skipped(server, client):
    add_query(client, Decision(k=1, n=1))
    key = stream_key("dev", "audio")
    good = encode_embedding(Embedding("dev", "audio", 0, 2 * SECOND, MATCH, MODEL, 0, 0))
    client.xadd(key, {**good, "emb": b"\x00" * 10})  # wrong length
    client.xadd(key, {**good, "dtype": "float16", "emb": MATCH.astype("<f2").tobytes()})  # wrong dtype
    client.xadd(key, {"t0": 0})  # missing fields
    client.xadd(key, {**good, "emb": np.full(DIM, np.nan, "<f4").tobytes()})  # not finite
    client.xadd(key, {**good, "emb": (2 * MATCH).astype("<f4").tobytes()})  # not unit norm
    (good_id,) = write(client, "dev", [MATCH])
    m = matcher(server)
    drain(m)
    assert counts(m, "rejected_malformed") == 3 and counts(m, "rejected_not_unit") == 2
    assert counts(m, "rejected_malformed", "dev") == 3
    assert [a.source_id for a in alerts(client)] == [good_id]
    assert client.xpending(key, m.settings.group)["pending"] == 0


def test_query_for_unknown_device_and_without_background(server, client):
    ghost = add_query(client, Decision(k=1, n=1), device="ghost")
    anyone = add_query(client, Decision(k=1, n=1))
    save_query(client, Query("no background", "vision", MATCH, MODEL))  # no tiny/vision background stored
    write(client, "dev", [MATCH])
    m = matcher(server)
    drain(m)
    assert [a.query for a in alerts(client)] == [anyone.id]
    assert ghost.id not in [a.query for a in alerts(client)] and counts(m, "no_background") == 1


# ----- delivery -----------------------------------------------------------------------------------------


def test_redelivery_gives_no_second_alert(server, client):
    add_query(client, Decision(k=2, n=3))
    key = stream_key("dev", "audio")
    write(client, "dev", [QUIET, MATCH, MATCH, MATCH])
    m = matcher(server, discover_s=0)  # XGROUP SETID is no write: read at a discovery
    drain(m)
    assert len(alerts(client)) == 1
    client.xgroup_setid(key, m.settings.group, "0")  # every entry delivered again
    drain(m)
    assert len(alerts(client)) == 1 and counts(m, "replayed") == 4
    # the decision state lost as well: the replay decides again, and the dedup key stops the alert
    client.delete(state_key(m.settings.group, key))
    client.xgroup_setid(key, m.settings.group, "0")
    fresh = matcher(server)
    drain(fresh)
    assert len(alerts(client)) == 1 and counts(fresh, "duplicate_alert") == 1


def test_pending_entries_of_a_dead_consumer_are_resumed(server, client):
    add_query(client, Decision(k=3, n=3))
    key = stream_key("dev", "audio")
    ids = write(client, "dev", [QUIET] + [MATCH] * 4)
    settings = MatcherSettings(start_id="0", block_ms=10)
    client.xgroup_create(key, settings.group, id="0")
    taken = client.xreadgroup(settings.group, settings.consumer, {key: ">"}, count=3)  # read, never acked: died
    assert len(taken[0][1]) == 3
    m = Matcher(settings, server.url)
    drain(m)
    assert [a.source_id for a in alerts(client)] == [ids[3]]
    assert client.xpending(key, settings.group)["pending"] == 0


def test_smoothing_state_survives_a_new_matcher(server, client):
    add_query(client, Decision(k=2, n=3))
    write(client, "dev", [QUIET, MATCH])
    drain(matcher(server))  # this matcher has seen one matching window, then is gone
    ids = write(client, "dev", [MATCH] * 4, start_s=4)
    drain(matcher(server))  # the same group and consumer
    assert [a.source_id for a in alerts(client)] == [ids[0]]  # the 2nd matching window overall


def test_new_device_and_new_query_are_picked_up_while_running(server, client):
    m = matcher(server, discover_s=0.2)
    m.start()
    try:
        q = add_query(client, Decision(k=1, n=1))
        wait_for(lambda: m.stats()["queries"] == 1, WAIT_S, "the matcher to load the new query")
        ids = write(client, "new-device", [QUIET, MATCH])
        (a,) = wait_for(lambda: alerts(client), WAIT_S, "an alert from the new device")
        assert (a.device, a.query, a.source_id) == ("new-device", q.id, ids[1])
    finally:
        m.stop()


def test_an_empty_step_waits_block_ms_and_a_stop_cuts_the_wait_short(server, client):
    add_query(client, Decision(k=1, n=1))
    for device in ("quiet-a", "quiet-b"):
        write(client, device, [QUIET, MATCH])
    m = matcher(server, block_ms=300)
    assert m.step() == 4  # both devices' windows in one step
    began = time.monotonic()
    assert m.step() == 0
    assert time.monotonic() - began >= 0.3  # nothing read: it waited block_ms
    assert {a.device for a in alerts(client)} == {"quiet-a", "quiet-b"}
    m.stop()
    waiting = matcher(server, block_ms=60_000)
    threading.Timer(0.5, waiting.stop).start()
    began = time.monotonic()
    while waiting.step():
        pass
    assert time.monotonic() - began < 10  # the stop ended its minute-long wait


def test_actor_restart_resumes_without_double_alert(ray_local, server, client):
    import ray

    add_query(client, Decision(k=2, n=3))
    key = stream_key("dev", "audio")
    ids = write(client, "dev", [QUIET, MATCH])
    settings = MatcherSettings(start_id="0", block_ms=50, discover_s=0.2)
    (actor,) = start_matchers(settings, server.url, count=1)

    def all_acked():
        groups = client.xinfo_groups(key)
        return groups and groups[0]["last-delivered-id"].decode() == ids[-1] and groups[0]["pending"] == 0

    def pid():
        return ray.get(actor.__ray_call__.remote(lambda _: os.getpid()), timeout=WAIT_S)

    def alive():  # ray.kill returns before the actor dies: only a new process is the restarted actor
        try:
            return pid() != first_pid
        except ray.exceptions.RayActorError:  # ActorUnavailableError (restarting) included
            return False

    wait_for(all_acked, WAIT_S, "the actor to process the first windows")
    first_pid = pid()
    ray.kill(actor, no_restart=False)
    ids += write(client, "dev", [MATCH] * 3, start_s=4)
    wait_for(alive, WAIT_S, "the restarted actor")
    wait_for(all_acked, WAIT_S, "the restarted actor to process the rest")
    assert [a.source_id for a in alerts(client)] == [ids[2]]  # smoothing state kept across the restart
    ray.kill(actor)  # not stop.remote(): under load Ray may be restarting it again, and a kill ends it either way


# ----- tuning -------------------------------------------------------------------------------------------


def test_fit_threshold_maximises_f1():
    scores = np.array([0.9, 0.8, 0.7, 0.4, 0.3, 0.75])
    labels = np.array([1, 1, 1, 0, 0, 0])
    t = fit_threshold(scores, labels)
    assert 0.4 < t <= 0.7 and confusion(scores, labels, t).f1 == pytest.approx(6 / 7)
    assert 0 < fit_threshold(np.array([0.0, 0.0]), np.array([1, 0])) < 1


# ----- the command line ---------------------------------------------------------------------------------


def run(command, args, ok: bool = True):
    result = CliRunner().invoke(command, args, catch_exceptions=False)
    assert (result.exit_code == 0) == ok, result.output
    return result


def test_alert_add_vector_list_rm(server, tmp_path):
    client = redis.Redis.from_url(server.url)
    np.save(tmp_path / "q.npy", 3 * MATCH)
    out = run(
        alert,
        [
            "add",
            "baby crying",
            "--modality",
            "audio",
            "--vector",
            str(tmp_path / "q.npy"),
            "--model",
            MODEL,
            "--threshold",
            "0.6",
            "--k",
            "2",
            "--n",
            "4",
            "--cooldown",
            "10",
            "--hysteresis",
            "0.1",
            "--device",
            "glasses-*",
            "--redis",
            server.url,
        ],
    ).output
    (query_id,) = [x.decode() for x in client.smembers("bindstream:queries")]
    assert query_id in out
    f = client.hgetall(query_key(query_id))
    assert f[b"text"] == b"baby crying" and f[b"modality"] == b"audio" and f[b"device"] == b"glasses-*"
    assert f[b"model"] == b"tiny" and int(f[b"dim"]) == DIM
    np.testing.assert_array_equal(np.frombuffer(f[b"emb"], "<f4"), MATCH)  # normalised
    assert (float(f[b"threshold"]), int(f[b"k"]), int(f[b"n"])) == (0.6, 2, 4)
    assert (float(f[b"cooldown_s"]), float(f[b"hysteresis"])) == (10.0, 0.1) and float(f[b"created"]) > 0
    assert len(load_background(client, MODEL, "audio").prompts) >= 8  # embedded once for tiny/audio
    assert "baby crying" in run(alert, ["list", "--redis", server.url]).output
    run(alert, ["rm", query_id, "--redis", server.url])
    assert client.smembers("bindstream:queries") == set() and not client.exists(query_key(query_id))
    assert "no query" in run(alert, ["rm", query_id, "--redis", server.url], ok=False).output


def test_alert_add_text_uses_the_prompt_ensemble(server):
    import encoders

    client = redis.Redis.from_url(server.url)
    run(alert, ["add", "a dog barking", "--modality", "audio", "--model", MODEL, "--redis", server.url])
    (query_id,) = [x.decode() for x in client.smembers("bindstream:queries")]
    q = load_query(client, query_id)
    t = encoders.load(MODEL).embed_text(["a sound of a dog barking", "the sound of a dog barking"])
    mean = (t / np.linalg.norm(t, axis=1, keepdims=True)).mean(axis=0)
    np.testing.assert_allclose(q.emb, mean / np.linalg.norm(mean), atol=1e-5)
    assert q.source == "text" and q.decision == Decision()


def test_alert_add_rejects_bad_input(server, tmp_path):
    np.save(tmp_path / "short.npy", np.ones(DIM - 1, np.float32))
    wav = tmp_path / "clip.wav"
    soundfile.write(wav, np.zeros(16000, np.float32), 16000)
    base = ["--model", MODEL, "--redis", server.url]
    cases = [
        (["  ", "--modality", "audio"], "query text is empty"),
        (["x", "--modality", "smell"], "'smell' is not one of"),
        (["x", "--modality", "audio", "--vector", str(tmp_path / "short.npy")], "63 dimensions"),
        (["x", "--modality", "vision", "--example", str(wav)], "does not load as vision"),
        (["x", "--modality", "fused", "--example", str(wav)], "fused query takes text"),
        (["x", "--modality", "audio", "--k", "4", "--n", "3"], "k <= n"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(alert, ["add", *args, *base])
        assert result.exit_code != 0 and message in result.output, (args, result.output)
    assert redis.Redis.from_url(server.url).scard("bindstream:queries") == 0
    with pytest.raises(QueryError, match="empty"):
        Query("", "audio", MATCH, MODEL)


def test_alert_tune_reports_its_fit_and_stores_none_that_separates_nothing(server, tmp_path):
    """With the tiny model's random weights every clip scores the same: the fit separates nothing (F1 0),
    so tune shows the table and refuses to store it (fit_threshold's own rule: test_fit_threshold_maximises_f1)."""
    client = redis.Redis.from_url(server.url)
    run(alert, ["add", "a tone", "--modality", "audio", "--model", MODEL, "--redis", server.url])
    (query_id,) = [x.decode() for x in client.smembers("bindstream:queries")]
    rng = np.random.default_rng(0)
    t = np.arange(32000) / 16000
    for label, make in (
        ("pos", lambda i: 0.5 * np.sin(2 * np.pi * (300 + 100 * i) * t)),
        ("neg", lambda i: 0.1 * rng.standard_normal(len(t))),
    ):
        (tmp_path / label).mkdir()
        for i in range(4):
            soundfile.write(tmp_path / label / f"{i}.wav", make(i).astype(np.float32), 16000)
    (tmp_path / "pos" / "notes.txt").write_text("not audio")
    before = load_query(client, query_id).decision
    out = run(
        alert,
        [
            "tune",
            "a tone",
            "--positive",
            str(tmp_path / "pos"),
            "--negative",
            str(tmp_path / "neg"),
            "--holdout",
            "0.5",
            "--redis",
            server.url,
        ],
        ok=False,
    ).output
    assert "held out" in out and "precision" in out and "skipped 1 file" in out
    assert "no threshold separates these clips" in out and "Traceback" not in out
    assert load_query(client, query_id).decision == before


def test_match_watch_search_timeline_commands(server, client, tmp_path):
    q = add_query(client, Decision(k=2, n=3))
    ids = write(client, "dev", [QUIET, MATCH, MATCH, MATCH, QUIET])
    run(match, ["--redis", server.url, "--in-process", "--from-start", "--seconds", "3"])
    (a,) = alerts(client)
    assert a.source_id == ids[2]
    assert "a dog barking" in run(watch, ["--redis", server.url, "--since", "10m", "--seconds", "1"]).output
    html = tmp_path / "t.html"
    out = run(timeline_command, ["--device", "dev", "--since", "10m", "-o", str(html), "--redis", server.url]).output
    assert "1 alerts" in out
    page = html.read_text()
    assert page.count("<svg") == 1 and "<polyline" in page and f"alert {a.id}" in page and q.id in page
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None  # not a dependency
    png = run(
        timeline_command, ["--device", "dev", "-o", str(tmp_path / "t.png"), "--redis", server.url], ok=has_matplotlib
    )
    assert (tmp_path / "t.png").is_file() if has_matplotlib else "matplotlib" in png.output and "t.html" in png.output
    assert (
        "search 'a dog' (tiny)"
        in run(
            search_command, ["a dog", "--modality", "audio", "--top", "3", "--model", MODEL, "--redis", server.url]
        ).output
    )


def test_search_ranks_by_calibrated_score(client):
    ids = write(client, "a", [QUIET, with_share(0.7), MATCH])
    ids += write(client, "b", [with_share(0.2), with_share(0.9)])
    found = search(client, {"audio": MATCH}, MODEL, top=3)
    assert [h.record.id for h in found.hits] == [ids[2], ids[4], ids[1]] and found.skipped == 0
    assert [h.record.device for h in found.hits] == ["a", "b", "a"]
    found = search(client, {"audio": MATCH}, MODEL, device="b", since_ms=60_000)
    assert [h.record.id for h in found.hits] == [ids[4], ids[3]]


@pytest.mark.parametrize("sink", ["http", "mqtt"])
def test_bench_alerts_runs(server, sink, request):
    mqtt = ["--mqtt", request.getfixturevalue("mosquitto")] if sink == "mqtt" else []
    out = run(
        bench_alerts,
        [
            *mqtt,
            "--queries",
            "5",
            "--rate",
            "200",
            "--seconds",
            "1",
            "--dim",
            "64",
            "--devices",
            "2",
            "--events-per-s",
            "4",
            "--score-rows",
            "2000",
            "--search-records",
            "300",
            "--redis",
            server.url,
        ],
    ).output
    assert "embeddings scored/s" in out and "p99" in out and "per million" in out
    for row in ("start notifications received / events fired", "end notifications received / events ended"):
        received, due = re.search(rf"{row}\W+(\d+) / (\d+)", out).groups()  # every event's, through the sink
        assert received == due != "0", out


# ----- the real model ------------------------------------------------------------------------------------


def test_dog_audio_alerts_dog_not_car(server):
    checkpoint = default_checkpoint_path()
    if not checkpoint.is_file():
        pytest.skip(f"needs the imagebind_huge checkpoint at {checkpoint} (set BINDSTREAM_HOME)")
    clip = ASSETS / "dog_audio.wav"
    if not clip.is_file():
        pytest.skip(f"{clip} is missing: ../shared/assets must lie beside the checkout")
    import encoders
    from encoders.transforms import load_file

    client = redis.Redis.from_url(server.url)
    for text in ("a dog barking", "a car engine"):
        run(alert, ["add", text, "--modality", "audio", "--model", "imagebind_huge", "--redis", server.url])
    encoder = encoders.load("imagebind_huge")
    emb = encoder.embed("audio", load_file(clip)[1].unsqueeze(0))[0]
    write(client, "dev", [emb] * 3, model="imagebind_huge")
    drain(matcher(server))
    assert {a.query_text for a in alerts(client)} == {"a dog barking"}
