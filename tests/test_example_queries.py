"""Query by example and the loudness gate. Scoring is pure numpy; the matcher runs in-process against a real
redis-server; loudness is measured by a real Windower on real mic messages.

The `tiny` model has random weights, so its embeddings say nothing about sounds: the vectors here are a
synthetic 64-d geometry shaped like ImageBind's. Every clip of the modality shares one direction (cosine
0.36 between unrelated clips), text prompts lie across the modality gap (cosine ~0.1 to any clip), and
"off-manifold" windows are random unit vectors, far from everything.
"""

from __future__ import annotations

import numpy as np
import pytest
import redis
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from sensors.protocol import decode, encode_header
from streaming.alerts.matcher import Matcher, MatcherSettings
from streaming.alerts.queries import save_background, save_query
from streaming.alerts.records import Background, Calibration, Decision, Query, QueryError
from streaming.alerts.scoring import FRESH, Baselines, ModalityIndex, N
from streaming.cli.alerts import alert
from streaming.records import MIN_DBFS, Embedding
from streaming.redis_layout import (
    ALERTS_STREAM,
    START,
    Alert,
    BadRecord,
    EmbeddingRecord,
    decode_embedding,
    decode_query,
    encode_embedding,
    encode_query,
    query_key,
    register_streams,
    stream_key,
)
from streaming.windowing import SECOND, Windower

DIM = 64  # tiny's joint space
MODEL = "tiny"
DEVICE = "dev"
STREAM = stream_key(DEVICE, "audio")
WARMUP = Calibration().warmup
THRESHOLD, REARM = Decision().threshold, Decision().threshold - Decision().hysteresis
MODALITY_SHARE = 0.6  # of each clip along the modality's direction: unrelated clips have cosine 0.36


def basis(i: int) -> np.ndarray:
    v = np.zeros(DIM)
    v[i] = 1
    return v


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


CLASSES = np.stack([basis(i) for i in range(1, 9)])  # the stream's ordinary sounds
EXAMPLE = unit(MODALITY_SHARE * basis(0) + 0.8 * basis(9))  # a clip of a sound the stream does not make


def ordinary(rng: np.random.Generator, count: int) -> np.ndarray:
    """Clips of the modality mixing the ordinary sounds, with noise: cosine to EXAMPLE 0.36 +- 0.01."""
    mix = unit(np.abs(rng.normal(size=(count, len(CLASSES)))) @ CLASSES)
    return unit(MODALITY_SHARE * basis(0) + 0.8 * mix + 0.1 * rng.standard_normal((count, DIM)) / np.sqrt(DIM))


def off_manifold(rng: np.random.Generator, count: int) -> np.ndarray:
    return unit(rng.standard_normal((count, DIM)))


def text_prompts(rng: np.random.Generator, count: int = 16) -> np.ndarray:
    """Background prompts across the modality gap: cosine ~0.12 to every clip, in dimensions no clip uses."""
    away = rng.standard_normal((count, DIM)) * (np.arange(DIM) >= 20)
    return unit(0.2 * basis(0) + 0.98 * unit(away))


def background(rng: np.random.Generator) -> Background:
    prompts = text_prompts(rng)
    return Background(MODEL, "audio", tuple(f"p{i}" for i in range(len(prompts))), prompts)


def example_query(vector=EXAMPLE, **overrides) -> Query:
    return Query("like this clip", "audio", vector, MODEL, source="vector:clip.npy", **overrides)


def records(vectors, dbfs=None, first: int = 1) -> list[EmbeddingRecord]:
    """One device's audio windows 1 s apart, in stream order (entry ids first-0, first+1-0, ...)."""
    return [
        EmbeddingRecord(STREAM, f"{first + i}-0", DEVICE, "audio", i * SECOND, (i + 2) * SECOND, MODEL, v, dbfs=dbfs)
        for i, v in enumerate(np.asarray(vectors, np.float32))
    ]


def two_of_three_above(scores: np.ndarray) -> bool:
    """Whether any 3 consecutive windows hold 2 at or above the threshold: what the default rule (k 2 of
    n 3) needs before it can fire."""
    above = (scores >= THRESHOLD).astype(int)
    return bool((np.convolve(above, np.ones(3, int), mode="valid") >= 2).any())


# ----- the rule ------------------------------------------------------------------------------------------


def test_the_share_against_text_prompts_fires_on_every_kind_of_window():
    """The old rule for a clip's vector (what an --example query got): it beats text prompts on every
    ordinary clip, and a random window beats them whenever its cosine to the clip happens to be the largest."""
    rng = np.random.default_rng(0)
    old = Query("like this clip", "audio", EXAMPLE, MODEL)  # source text: the softmax share
    index = ModalityIndex([old], background(rng))
    assert (index.shares(ordinary(rng, 200))[:, 0] >= THRESHOLD).all()
    random_above = (index.shares(off_manifold(rng, 20_000))[:, 0] >= THRESHOLD).mean()
    assert 0.01 < random_above < 0.2


@settings(max_examples=100, derandomize=True, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), run=st.integers(1, 40))
def test_example_queries_never_fire_on_windows_far_from_everything(seed, run):
    """After the warm-up, runs of `run` random windows alternate with ordinary ones, then the stream goes
    random for good (a broken sensor): no 3 consecutive windows hold 2 above the threshold."""
    rng = np.random.default_rng(seed)
    parts = [ordinary(rng, WARMUP + 10)]
    for _ in range(3):
        parts += [off_manifold(rng, run), ordinary(rng, 5)]
    parts.append(off_manifold(rng, 100))
    scores = ModalityIndex([example_query()], background(rng)).scores(records(np.vstack(parts)), Baselines(10))
    assert not two_of_three_above(scores[:, 0])


@pytest.mark.parametrize("noise", [0.0, 0.2], ids=["equal", "near (cosine 0.98)"])
def test_an_event_like_the_example_stands_out_of_an_ordinary_stream(noise):
    """Ordinary windows stay below the re-arm level, the event's windows above the threshold: the rule
    fires once, at the event's k-th window, and re-arms after it."""
    rng = np.random.default_rng(1)
    event = unit(EXAMPLE + noise * rng.standard_normal((5, DIM)) / np.sqrt(DIM))
    assert (event @ EXAMPLE > 0.97).all()
    before, after = ordinary(rng, 100), ordinary(rng, 50)
    scores = ModalityIndex([example_query()], background(rng)).scores(
        records(np.vstack([before, event, after])), Baselines(10)
    )[:, 0]
    assert (scores[100:105] > 0.99).all()
    assert scores[:100].max() < REARM and scores[105:].max() < REARM


def test_windows_typical_of_the_stream_do_not_fire_even_when_near_the_example():
    """A stream that always sounds a bit like the example (cosine 0.85 +- 0.03, above the floor): neither
    its windows nor the example itself stand out; a plain cosine threshold would fire on all of them."""
    rng = np.random.default_rng(2)
    windows = unit(EXAMPLE + 0.6 * rng.standard_normal((300, DIM)) / np.sqrt(DIM))
    windows[WARMUP::25] = EXAMPLE
    cos = windows @ EXAMPLE
    assert 0.8 < np.median(cos) < 0.9
    scores = ModalityIndex([example_query()], background(rng)).scores(records(windows), Baselines(10))[:, 0]
    assert scores.max() < THRESHOLD


def test_the_floor_holds_where_the_stream_is_far_from_the_example():
    """On a stream whose windows all lie near one direction orthogonal to the example, a window at
    cosine 0.4 is many spreads above the usual but below min_cos: it does not fire; one at 0.7 does."""
    rng = np.random.default_rng(3)
    usual = unit(basis(1) + 0.02 * rng.standard_normal((60, DIM)))
    probes = unit(np.stack([0.4 * EXAMPLE + np.sqrt(1 - 0.16) * basis(1), 0.7 * EXAMPLE + np.sqrt(0.51) * basis(1)]))
    scores = ModalityIndex([example_query()], background(rng)).scores(
        records(np.vstack([usual, probes])), Baselines(10)
    )[:, 0]
    assert scores[-2] < REARM and scores[-1] > 0.95


def test_the_estimate_warms_up_is_bounded_and_takes_each_window_once():
    rng = np.random.default_rng(4)
    index = ModalityIndex([example_query()], background(rng))
    baselines = Baselines(max_streams=2)
    first = records([EXAMPLE] * 3 + list(ordinary(rng, WARMUP)))
    scores = index.scores(first, baselines)[:, 0]
    assert (scores[:3] == 0).all()  # equal to the example, but the stream's estimate has not formed
    state = baselines.take(STREAM, index.example_ids)
    assert state[0, N] == len(first)
    again = index.scores(first[-5:], baselines)  # read again after a failed commit: scored, not absorbed
    assert (baselines.take(STREAM, index.example_ids) == state).all() and again.shape == (5, 1)
    for other in ("a", "b"):
        baselines.put(other, ("q",), FRESH[None])
    assert list(baselines.kept) == ["a", "b"]  # the least recently used stream went
    assert (baselines.take(STREAM, index.example_ids) == FRESH).all()


def test_text_queries_keep_the_softmax_share():
    rng = np.random.default_rng(5)
    text = Query("a dog barking", "audio", EXAMPLE, MODEL)
    index = ModalityIndex([text, example_query()], background(rng))
    x = ordinary(rng, 40)
    np.testing.assert_array_equal(index.scores(records(x), Baselines(10))[:, 0], index.shares(x)[:, 0])


# ----- the loudness gate ---------------------------------------------------------------------------------


def test_min_dbfs_scores_quiet_windows_zero():
    rng = np.random.default_rng(6)
    gated = Query("a dog barking", "audio", EXAMPLE, MODEL, min_dbfs=-40.0)
    open_ = Query("a dog barking", "audio", EXAMPLE, MODEL)
    index = ModalityIndex([gated, open_], background(rng))
    windows = [EXAMPLE]
    quiet, loud, unknown = records(windows, -60.0), records(windows, -20.0), records(windows)
    scores = np.vstack([index.scores(r, Baselines(10)) for r in (quiet, loud, unknown)])
    assert scores[0, 0] == 0 and scores[0, 1] > 0.99  # only the gated query is silenced
    assert scores[1, 0] > 0.99 and scores[2, 0] > 0.99  # loud enough, or an entry without a loudness


def cut_windows(amplitude: float, sensor: str = "mic", seconds: int = 3) -> list:
    """The windows a Windower cuts from `seconds` of a 440 Hz sine (IMU: the sine on every axis)."""
    rate, chunk = (16_000, 320) if sensor == "mic" else (200, 20)
    columns = 1 if sensor == "mic" else 6
    t = np.arange(seconds * rate) / rate
    samples = np.repeat((amplitude * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[:, None], columns, axis=1)
    windower, windows = Windower(), []
    for k in range(len(t) // chunk):
        header = {"rate": rate, "channels": 1, "dtype": "float32"} if sensor == "mic" else {"rate": rate}
        message = encode_header(DEVICE, sensor, k, 100 * SECOND + k * chunk * SECOND // rate, **header)
        windows += windower.add(decode([message, samples[k * chunk : (k + 1) * chunk].tobytes()]))
    return windows


def test_windows_carry_their_loudness_to_the_stream_entry():
    """RMS dBFS where audio windows are cut (a sine of amplitude a reads 20 log10(a / sqrt 2)), carried by
    the Embedding into the entry's `dbfs` field; entries without it (older ones) decode with None."""
    cut = {amplitude: cut_windows(amplitude) for amplitude in (0.1, 1.0, 0.0)}
    assert all(len(windows) == 2 for windows in cut.values())  # 3 s of audio: windows at 0 s and 1 s
    assert {round(w.dbfs, 2) for w in cut[0.1]} == {round(20 * np.log10(0.1 / np.sqrt(2)), 2)}  # -23.01
    assert {round(w.dbfs, 2) for w in cut[1.0]} == {-3.01} and {w.dbfs for w in cut[0.0]} == {MIN_DBFS}
    assert {w.dbfs for w in cut_windows(0.1, sensor="imu", seconds=6)} == {None}  # one 5 s IMU window
    cut = cut[0.1]
    e = Embedding(DEVICE, "audio", cut[0].t0, cut[0].t1, EXAMPLE, MODEL, 0, 0, dbfs=cut[0].dbfs)
    fields = encode_embedding(e)
    assert decode_embedding(STREAM, "1-0", fields).dbfs == pytest.approx(cut[0].dbfs, abs=0.01)
    assert decode_embedding(STREAM, "1-0", {k: v for k, v in fields.items() if k != "dbfs"}).dbfs is None
    assert "dbfs" not in encode_embedding(Embedding(DEVICE, "vision", 0, 1, EXAMPLE, MODEL, 0, 0))
    with pytest.raises(BadRecord, match="dbfs"):
        decode_embedding(STREAM, "1-0", {**fields, "dbfs": "nan"})


def test_a_query_hash_keeps_its_calibration_and_gate_and_old_hashes_still_load():
    q = example_query(calibration=Calibration(min_cos=0.6, z=5.0, memory=600, warmup=60), min_dbfs=-42.5)
    stored = {k: v if isinstance(v, bytes) else str(v).encode() for k, v in encode_query(q).items()}  # as Redis has it
    back = decode_query(q.id, stored)
    assert (back.calibration, back.min_dbfs, back.by_example) == (q.calibration, -42.5, True)
    assert decode_query(q.id, stored | {"min_dbfs": b""}).min_dbfs is None
    old = {k: v for k, v in stored.items() if not k.startswith("example_") and k != "min_dbfs"}
    assert (decode_query(q.id, old).calibration, decode_query(q.id, old).min_dbfs) == (Calibration(), None)
    with pytest.raises(QueryError, match="malformed"):
        decode_query(q.id, stored | {"example_warmup": b"601"})  # warmup > memory: checked on read too
    for bad in ({"modality": "vision", "min_dbfs": -40.0}, {"min_dbfs": 3.0}, {"min_dbfs": float("nan")}):
        with pytest.raises(QueryError, match="min_dbfs"):
            Query("x", bad.pop("modality", "audio"), EXAMPLE, MODEL, **bad)
    for bad_calibration in ({"warmup": 400}, {"z": float("nan")}, {"min_cos": 1.0}, {"memory": 2.5}):
        with pytest.raises(QueryError):
            Calibration(**bad_calibration)


# ----- the matcher, against a real redis-server ------------------------------------------------------------


@pytest.fixture
def client(server):
    c = redis.Redis.from_url(server.url)
    save_background(c, background(np.random.default_rng(7)))
    return c


def write(client, vectors, dbfs=None, start_s: int = 0) -> list[str]:
    """XADD audio windows 1 s apart from device time `start_s`; returns their entry ids."""
    ids = []
    for i, v in enumerate(vectors, start_s):
        e = Embedding(DEVICE, "audio", i * SECOND, (i + 2) * SECOND, np.asarray(v, np.float32), MODEL, 0, 0, dbfs=dbfs)
        ids.append(client.xadd(STREAM, encode_embedding(e)).decode())
    register_streams(client, [STREAM])  # as the publisher does: matchers find the stream there
    return ids


def started(client) -> list[Alert]:
    """The alerts that opened an event."""
    return [a for a in (Alert.from_entry(i, f) for i, f in client.xrange(ALERTS_STREAM)) if a.state == START]


def drain(server) -> None:
    m = Matcher(MatcherSettings(start_id="0", block_ms=10), server.url)
    while m.step():
        pass


def test_the_matcher_fires_once_on_an_example_event_and_never_on_random_windows(server, client):
    rng = np.random.default_rng(8)
    q = save_query(client, example_query())
    ids = write(client, np.vstack([ordinary(rng, 60), [EXAMPLE] * 5, ordinary(rng, 60), off_manifold(rng, 200)]))
    drain(server)
    (a,) = started(client)
    assert (a.query, a.source_id, a.score > 0.99) == (q.id, ids[61], True)  # the event's 2nd window (k 2 of 3)


def test_the_matcher_gates_quiet_audio_windows(server, client):
    """Windows equal to the query: quiet ones (-60 dBFS) give no alert with --min-dbfs -40, loud ones do."""
    save_query(client, Query("a dog barking", "audio", EXAMPLE, MODEL, min_dbfs=-40.0))
    write(client, [EXAMPLE] * 5, dbfs=-60.0)
    drain(server)
    assert started(client) == []
    loud = write(client, [basis(1)] * 3 + [EXAMPLE] * 5, dbfs=-20.0, start_s=10)
    drain(server)
    assert [a.source_id for a in started(client)] == [loud[4]]


def test_alert_add_min_dbfs(server, client, tmp_path):
    np.save(tmp_path / "v.npy", EXAMPLE)
    base = ["--model", MODEL, "--redis", server.url, "--vector", str(tmp_path / "v.npy")]
    added = CliRunner().invoke(alert, ["add", "a dog", "--modality", "audio", "--min-dbfs", "-40", *base])
    assert added.exit_code == 0, added.output
    (query_id,) = [x.decode() for x in client.smembers("bindstream:queries")]
    stored = decode_query(query_id, client.hgetall(query_key(query_id)))
    assert (stored.min_dbfs, stored.by_example) == (-40.0, True)
    refused = CliRunner().invoke(alert, ["add", "a dog", "--modality", "vision", "--min-dbfs", "-40", *base])
    assert refused.exit_code == 2 and "--min-dbfs" in refused.output and "audio queries only" in refused.output
