"""Reviewing events through the real command line (click's CliRunner on `streaming.cli.main`) against a real
redis-server: events raised by a real in-process Matcher from known vectors, then `bindstream event list / show /
ack / false-positive`, `watch`, and `alert tune --from-reviews`.

The model `tiny` has RANDOM weights, so its embeddings say nothing: as in test_alerts and test_events, windows are
known unit vectors written straight into the streams (the query is e0, the background e1..e8, `with_share(p)` a
window scoring p for a text query, QUIET ~0). Evidence hashes are written as the windowing stage's writer writes
them, with redis_layout's field names.
"""

import json
import wave

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from streaming.alerts.events import load_event
from streaming.alerts.queries import load_background, load_query, save_query
from streaming.alerts.records import Calibration, Decision, Query
from streaming.alerts.tuning import reviewed_scores
from streaming.cli import main
from streaming.cli.terminal import console
from streaming.redis_layout import (
    AUDIO_CHANNELS,
    AUDIO_PCM,
    AUDIO_RATE,
    AUDIO_T0,
    CONFIRMED,
    EVENTS_INDEX,
    EVIDENCE_FIELD,
    FALSE_POSITIVE,
    HEALTH_EVENT,
    IMU_CSV,
    MISSING,
    Event,
    event_id,
    event_key,
    evidence_key,
    frame_field,
    npy_bytes,
    stream_key,
)

from .conftest import wait_for
from .test_alerts import MATCH, MODEL, QUIET, SECOND, WAIT_S, basis, with_share, write
from .test_events import matcher, server_ms, settle

ONE_SHOT = Decision(k=1, n=1, cooldown_s=0)  # each window at or above 0.5 opens an event; QUIET (~0) ends it
OPENING = 0.55  # the score of each event's first window; its second window is the peak


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Tables one line per row."""
    monkeypatch.setattr(console, "width", 250)


def cli(server, *args, code: int = 0) -> str:
    """Run `bindstream ARGS --redis URL`; its output (stdout and stderr) once the exit status is `code`."""
    result = CliRunner().invoke(main, [*args, "--redis", server.url], catch_exceptions=False)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result.output


def text_query(client) -> Query:
    return save_query(client, Query("a dog barking", "audio", MATCH, MODEL, decision=ONE_SHOT))


def raise_event(server, client, q: Query, device: str, peak_window: np.ndarray) -> Event:
    """One event of `q` on `device`: an opening window, the peak window, then QUIET, which ends it; each device's
    event starts a server millisecond after the previous one's, so that newest-first is one order."""
    opening = with_share(OPENING) if not q.by_example else with_cos(0.52)
    ids = write(client, device, [QUIET] * 5 + [opening, peak_window, QUIET])
    settle(matcher(server))
    e = load_event(client, event_id(q.id, stream_key(device, "audio"), ids[5]))
    assert (e.peak_source_id, e.state, e.windows) == (ids[6], "ended", 2)
    now = server_ms(client)
    wait_for(lambda: server_ms(client) > now, WAIT_S, "the server clock to move on")
    return e


def listed(server, *args) -> list[dict]:
    return json.loads(cli(server, "event", "list", "--json", *args))


# ----- event list and watch ------------------------------------------------------------------------------


def test_event_list_filters_newest_first_and_watch_shows_states_events_and_health(server, client):
    q = text_query(client)
    events = [raise_event(server, client, q, d, with_share(p)) for d, p in (("a", 0.95), ("b", 0.9), ("c", 0.7))]
    rows = listed(server)
    assert [r["id"] for r in rows] == [e.id for e in reversed(events)]  # newest first
    assert [r["peak"] for r in rows] == pytest.approx([0.7, 0.9, 0.95], abs=1e-3)
    assert {(r["kind"], r["state"], r["review"], r["evidence"], r["query"]) for r in rows} == {
        ("query", "ended", "none", False, q.id)
    }
    assert [r["device"] for r in listed(server, "--device", "a")] == ["a"]
    assert [r["device"] for r in listed(server, "--limit", "2")] == ["c", "b"]
    for ref in (q.id[:3], q.id, "a dog barking"):
        assert len(listed(server, "--query", ref, "--since", "10m")) == 3
    assert "no query 'a cat'" in cli(server, "event", "list", "--query", "a cat", code=1)
    assert listed(server, "--kind", "health") == []
    table = cli(server, "event", "list")
    assert all(e.id in table for e in events) and "a dog barking" in table and f"{events[0].peak:.3f}" in table

    health = matcher(server, silence_s=0.3, discover_s=0)  # the three streams have fallen silent: health events
    wait_for(lambda: health.step() == 0 and len(listed(server, "--kind", "health")) == 3, WAIT_S, "health events")
    silent = listed(server, "--query", "health")
    assert {(r["kind"], r["query_text"]) for r in silent} == {(HEALTH_EVENT, f"{d} audio silent") for d in "abc"}
    assert {r["id"] for r in listed(server, "--kind", "query")} == {e.id for e in events}
    assert "s silent" in cli(server, "event", "list", "--kind", "health")

    shown = cli(server, "watch", "--since", "10m", "--seconds", "1")
    rows_of_a = [line for line in shown.splitlines() if events[0].id[:8] in line]
    assert [next(s for s in ("start", "update", "end") if f" {s} " in line) for line in rows_of_a] == [
        "start",
        "update",
        "end",
    ]
    assert f"{events[0].peak:.3f} peak" in shown and "a audio silent" in shown and " s silent" in shown


# ----- event show --------------------------------------------------------------------------------------


def write_evidence(client, event: Event, fields: dict) -> None:
    """The evidence hash of `event`, and its record's pointer to it, as streaming/evidence.py writes them."""
    client.hset(evidence_key(event.id), mapping=fields)
    client.hset(event_key(event.id), EVIDENCE_FIELD, evidence_key(event.id))


def test_event_show_summarises_and_saves_the_evidence(server, client, tmp_path):
    q = text_query(client)
    e = raise_event(server, client, q, "a", with_share(0.9))
    rate, channels = 8000, 2
    samples = (np.arange(rate * channels // 2, dtype=np.int64) * 37 % 65536 - 32768).astype("<i2")  # 0.5 s
    jpeg = cv2.imencode(".jpg", np.full((8, 8, 3), 200, np.uint8))[1].tobytes()
    thermal = np.arange(12, dtype=np.uint16).reshape(3, 4)
    imu = b"t_ns,ax,ay,az,gx,gy,gz\n1000,0,0,9.81,0,0,0\n2000,0.1,0,9.8,0,0,0.01\n"
    write_evidence(
        client,
        e,
        {
            AUDIO_PCM: samples.tobytes(),
            AUDIO_RATE: rate,
            AUDIO_CHANNELS: channels,
            AUDIO_T0: 3 * SECOND,
            frame_field("camera", 4 * SECOND, "jpeg"): jpeg,
            frame_field("thermal", 4 * SECOND, None): npy_bytes(thermal),
            IMU_CSV: imu,
            MISSING: "depth",
        },
    )
    out = cli(server, "event", "show", e.id[:6])  # a unique prefix names it
    assert e.id in out and "a dog barking" in out and "0.900" in out
    assert "audio 0.50 s (8000 Hz, 2 ch); frames: camera 1, thermal 1; IMU rows: 2; missing: depth" in out
    shown = json.loads(cli(server, "event", "show", e.id, "--json"))
    assert shown["event"]["id"] == e.id and shown["evidence"]["audio_s"] == 0.5
    assert shown["evidence"]["frames"] == {"camera": 1, "thermal": 1} and shown["evidence"]["missing"] == ["depth"]
    assert listed(server)[0]["evidence"] is True

    folder = tmp_path / "saved"
    assert "saved 5 file(s)" in cli(server, "event", "show", e.id, "--save", str(folder))
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [
            "audio.wav",
            f"frame-camera-{4 * SECOND}.jpg",
            f"frame-thermal-{4 * SECOND}.npy",
            "imu.csv",
            "event.json",
        ]
    )
    with wave.open(str(folder / "audio.wav")) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (channels, 2, rate)
        np.testing.assert_array_equal(np.frombuffer(w.readframes(w.getnframes()), "<i2"), samples)
    assert (folder / f"frame-camera-{4 * SECOND}.jpg").read_bytes() == jpeg
    np.testing.assert_array_equal(np.load(folder / f"frame-thermal-{4 * SECOND}.npy"), thermal)
    assert (folder / "imu.csv").read_bytes() == imu
    saved = json.loads((folder / "event.json").read_text())
    assert (saved["id"], saved["peak_source_id"], saved["review"]) == (e.id, e.peak_source_id, "none")


def test_event_show_without_or_with_malformed_evidence_and_unknown_ids(server, client, tmp_path):
    q = text_query(client)
    e = raise_event(server, client, q, "a", with_share(0.9))
    out = cli(server, "event", "show", e.id, "--save", str(tmp_path / "bare"))
    assert f"no evidence stored for event {e.id}" in out  # said in one line, not an error
    assert [p.name for p in (tmp_path / "bare").iterdir()] == ["event.json"]

    escape = f"frame:../../escaped:{SECOND}.jpg"  # a field naming a file outside the folder
    write_evidence(client, e, {AUDIO_PCM: b"\x00\x01\x02", AUDIO_RATE: 8000, AUDIO_CHANNELS: 1, escape: b"x"})
    out = cli(server, "event", "show", e.id, "--save", str(tmp_path / "odd" / "inner"))
    assert "malformed audio.pcm: 3 bytes are no whole int16 frames" in out and f"malformed {escape}" in out
    assert [p.name for p in (tmp_path / "odd" / "inner").iterdir()] == ["event.json"]
    assert sorted(p.name for p in (tmp_path / "odd").iterdir()) == ["inner"] and not list(tmp_path.rglob("escaped*"))

    twin = Event(**{**load_event(client, e.id).__dict__, "id": e.id[:4] + ("0" if e.id[4] != "0" else "1") * 12})
    client.hset(event_key(twin.id), mapping=twin.encode())  # a second event whose id starts the same
    client.zadd(EVENTS_INDEX, {twin.id: 1})
    assert f"'{e.id[:4]}' starts 2 event ids" in cli(server, "event", "show", e.id[:4], code=1)
    assert e.id in cli(server, "event", "show", e.id)
    unknown = ("8" if e.id[0] < "8" else "0") + "123"  # the start of neither id
    assert f"no event '{unknown}'" in cli(server, "event", "show", unknown, code=1)
    assert f"no event '{unknown}'" in cli(server, "event", "ack", unknown, code=1)
    assert "hexadecimal" in cli(server, "event", "show", "*", code=1)  # no glob reaches Redis


# ----- reviews --------------------------------------------------------------------------------------------


def test_ack_and_false_positive_record_the_verdict(server, client):
    q = text_query(client)
    e = raise_event(server, client, q, "a", with_share(0.9))
    assert f"event {e.id} ('a dog barking' on a): confirmed" in cli(server, "event", "ack", e.id[:5])
    acked = load_event(client, e.id)
    assert (acked.review, acked.state, acked.peak) == (CONFIRMED, e.state, e.peak) and acked.reviewed_ns > 0
    assert "false_positive" in cli(server, "event", "false-positive", e.id)
    assert load_event(client, e.id).review == FALSE_POSITIVE
    assert listed(server)[0]["review"] == FALSE_POSITIVE


def threshold_of(client, q: Query) -> float:
    return load_query(client, q.id).decision.threshold


def test_tune_from_reviews_fits_between_confirmed_and_false_positive_peaks(server, client):
    q = text_query(client)
    peaks = {"a": 0.95, "b": 0.9, "c": 0.7, "d": 0.6, "e": 0.8}
    events = {d: raise_event(server, client, q, d, with_share(p)) for d, p in peaks.items()}
    for d in "abe":
        cli(server, "event", "ack", events[d].id)
    cli(server, "event", "false-positive", events["c"].id)
    out = cli(server, "alert", "tune", q.text, "--from-reviews", code=1)
    assert "review 1 more as false positive (bindstream event false-positive ID)" in out
    assert threshold_of(client, q) == ONE_SHOT.threshold
    cli(server, "event", "false-positive", events["d"].id)
    client.xdel(stream_key("e", "audio"), events["e"].peak_source_id)  # as MAXLEN trims an old window

    scored = reviewed_scores(client, q, load_background(client, MODEL, "audio"))
    assert (scored.trimmed, scored.unusable) == (1, 0)
    assert sorted(scored.positives) == pytest.approx(sorted(events[d].peak for d in "ab"), rel=1e-5)  # the matcher's
    assert sorted(scored.negatives) == pytest.approx(sorted(events[d].peak for d in "cd"), rel=1e-5)

    out = cli(server, "alert", "tune", q.id[:4], "--from-reviews", "--holdout", "0", "--dry-run")
    assert "2 confirmed, 2 false positive; skipped 1 whose peak window was trimmed" in out and "would set" in out
    assert threshold_of(client, q) == ONE_SHOT.threshold
    cli(server, "alert", "tune", q.text, "--from-reviews", "--holdout", "0")
    assert (
        peaks["c"] < threshold_of(client, q) < peaks["b"]
    )  # between the highest false positive and the lowest confirmed
    assert load_query(client, q.id).decision.hysteresis < threshold_of(client, q)


def test_tune_from_reviews_combines_with_clip_folders_and_needs_a_source(server, client, tmp_path):
    """The clips are embedded by `tiny` (random weights: their scores mean nothing); the table counts both sets."""
    import soundfile

    q = text_query(client)
    events = [raise_event(server, client, q, d, with_share(p)) for d, p in (("a", 0.95), ("b", 0.6))]
    cli(server, "event", "ack", events[0].id)
    cli(server, "event", "false-positive", events[1].id)
    t = np.arange(32000) / 16000
    for label, pitch in (("pos", 440), ("neg", 90)):
        (tmp_path / label).mkdir()
        soundfile.write(tmp_path / label / "clip.wav", (0.5 * np.sin(2 * np.pi * pitch * t)).astype(np.float32), 16000)
    folders = ["--positive", str(tmp_path / "pos"), "--negative", str(tmp_path / "neg")]
    out = cli(server, "alert", "tune", q.id, *folders, "--from-reviews", "--holdout", "0", "--dry-run")
    train = next(line for line in out.splitlines() if "train" in line)
    assert [cell.strip() for cell in train.split("│")][3:5] == ["2", "2"]  # one clip and one event of each label
    assert "give --positive and --negative folders, or --from-reviews" in cli(server, "alert", "tune", q.id, code=2)
    assert "or --from-reviews" in cli(server, "alert", "tune", q.id, "--positive", str(tmp_path / "pos"), code=2)


def with_cos(c: float) -> np.ndarray:
    """A unit window whose cosine to the example (e0) is `c`, orthogonal to it otherwise along QUIET's axis."""
    return (c * basis(0) + np.sqrt(1 - c * c) * QUIET).astype(np.float32)


def test_tune_from_reviews_replays_the_stream_of_an_example_query(server, client):
    """A vector query's score depends on its stream's earlier windows: tune replays each stream and gets the
    very scores the matcher gave the peaks."""
    calibration = Calibration(warmup=3)  # scored from the stream's 4th window on
    clip = Query("like the clip", "audio", MATCH, MODEL, decision=ONE_SHOT, calibration=calibration, source="vector:x")
    q = save_query(client, clip)
    assert q.by_example
    cosines = {"a": 0.65, "b": 0.6, "c": 0.55, "d": 0.53}
    events = {d: raise_event(server, client, q, d, with_cos(c)) for d, c in cosines.items()}
    for d in "ab":
        cli(server, "event", "ack", events[d].id)
    for d in "cd":
        cli(server, "event", "false-positive", events[d].id)
    scored = reviewed_scores(client, q, load_background(client, MODEL, "audio"))
    assert sorted(scored.positives) == pytest.approx(sorted(events[d].peak for d in "ab"), rel=1e-5)
    assert sorted(scored.negatives) == pytest.approx(sorted(events[d].peak for d in "cd"), rel=1e-5)
    assert "tune it --from-reviews alone" in cli(
        server, "alert", "tune", q.id, "--from-reviews", "--positive", ".", code=1
    )
    cli(server, "alert", "tune", q.id, "--from-reviews", "--holdout", "0")
    assert events["c"].peak < threshold_of(client, q) < events["b"].peak


def test_alert_list_shows_the_loudness_gate_and_the_sinks(server, client):
    gated = Query("a bang", "audio", MATCH, MODEL, min_dbfs=-40.0, notify=("json://127.0.0.1:9/hook",))
    save_query(client, gated)
    rows = {r["id"]: r for r in json.loads(cli(server, "alert", "list", "--json"))}
    assert (rows[gated.id]["min_dbfs"], rows[gated.id]["notify"]) == (-40.0, ["json://127.0.0.1:9/hook"])
    line = next(line for line in cli(server, "alert", "list").splitlines() if gated.id in line)
    assert "│ -40 " in line and "json://127.0.0.1:9/hook" in line
    text_query(client)
    assert [r["min_dbfs"] for r in json.loads(cli(server, "alert", "list", "--json"))] == [-40.0, None]
