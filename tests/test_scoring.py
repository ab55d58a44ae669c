"""Scoring without Redis: a text query's calibrated score is its softmax share among itself and the background
prompts not too close to it, an example query's is its cosine against the stream's running estimate, each query
scores only the devices it watches, and the records the matcher refuses to score are named."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from sensors.protocol import INT64_MAX
from streaming.alerts.records import MAX_LOGIT_SCALE, Background, Calibration, Query
from streaming.alerts.scoring import FRESH, Baselines, ModalityIndex, N, build_indexes, entry_problem
from streaming.redis_layout import EmbeddingRecord

DIM = 16
MODEL = "tiny"


def basis(i: int) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[i] = 1
    return v


def units(rng: np.random.Generator, count: int) -> np.ndarray:
    v = rng.standard_normal((count, DIM))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def query(emb, device: str = "*", modality: str = "audio", model: str = MODEL) -> Query:
    return Query("q", modality, emb, model, device=device)


def background(emb, logit_scale: float = 100.0, exclude_cos: float = 0.9, modality: str = "audio") -> Background:
    return Background(
        MODEL, modality, tuple(f"p{i}" for i in range(len(emb))), np.asarray(emb), logit_scale, exclude_cos
    )


def softmax_share(x: np.ndarray, q: np.ndarray, prompts: np.ndarray, scale: float) -> float:
    """exp(s q.x) / (exp(s q.x) + sum over the prompts of exp(s p.x)), written out."""
    own = np.exp(scale * float(q @ x))
    return own / (own + sum(np.exp(scale * float(p @ x)) for p in prompts))


def test_a_share_is_the_softmax_over_the_query_and_its_background():
    rng = np.random.default_rng(0)
    qs, prompts, x = units(rng, 3), units(rng, 5), units(rng, 7)
    index = ModalityIndex([query(v) for v in qs], background(prompts, logit_scale=10.0, exclude_cos=1.0))
    expected = [[softmax_share(row, q, prompts, 10.0) for q in qs] for row in x]
    np.testing.assert_allclose(index.shares(x), expected, rtol=1e-5)


def test_a_near_synonym_prompt_competes_only_with_the_other_queries():
    """A prompt at cosine >= exclude_cos to a query is left out of that query's softmax only."""
    synonym = (basis(0) + 0.3 * basis(5)) / np.linalg.norm(basis(0) + 0.3 * basis(5))  # cos 0.958 with e0
    prompts = np.stack([synonym, basis(3), basis(4)])
    index = ModalityIndex([query(basis(0)), query(basis(1))], background(prompts, logit_scale=10.0))
    x = np.stack([synonym, basis(1)])
    shares = index.shares(x)
    for row, v in enumerate(x):
        assert shares[row, 0] == pytest.approx(softmax_share(v, basis(0), prompts[1:], 10.0), rel=1e-5)
        assert shares[row, 1] == pytest.approx(softmax_share(v, basis(1), prompts, 10.0), rel=1e-5)
    assert shares[0, 0] > 0.99  # a window like the synonym is the query's, not the background's


def test_extreme_logits_saturate_without_overflow():
    prompts = np.stack([basis(i) for i in range(1, 9)])
    index = ModalityIndex([query(basis(0))], background(prompts, logit_scale=MAX_LOGIT_SCALE))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shares = index.shares(np.stack([basis(0), basis(1), -basis(0)]))[:, 0]
    assert np.isfinite(shares).all() and shares[0] == pytest.approx(1.0) and shares[1] == pytest.approx(0.0)


def test_each_query_scores_the_devices_it_watches():
    qs = [query(basis(0), "*"), query(basis(1), "glasses-*"), query(basis(2), "watch-1")]
    index = ModalityIndex(qs, background(np.stack([basis(i) for i in range(3, 9)])))
    assert index.columns("glasses-2").tolist() == [0, 1]
    assert index.columns("watch-1").tolist() == [0, 2]
    assert index.columns("phone").tolist() == [0]
    index.forget("glasses-2")
    assert index.columns("glasses-2").tolist() == [0, 1]


def test_indexes_group_by_model_and_modality_and_leave_out_what_cannot_score():
    prompts = np.stack([basis(i) for i in range(1, 9)])
    scorable, vision = query(basis(0)), query(basis(0), modality="vision")
    swamped = query(basis(1) + 0.01 * basis(0))  # every prompt of swamped_bg is a near synonym: it would score 1
    swamped_bg = background(np.stack([basis(1), basis(1) + 0.1 * basis(2)]))
    other_dim = query(np.ones(DIM + 1, np.float32), model="other")
    no_background = query(basis(0), model="unknown")
    backgrounds = {
        (MODEL, "audio"): background(prompts),
        (MODEL, "vision"): background(prompts, modality="vision"),
        ("other", "audio"): background(prompts),
        ("unknown", "audio"): None,
    }
    indexes = build_indexes([scorable, vision, other_dim, no_background], backgrounds)
    assert {key: [q.id for q in index.queries] for key, index in indexes.items()} == {
        (MODEL, "audio"): [scorable.id],
        (MODEL, "vision"): [vision.id],
    }
    assert build_indexes([swamped], {(MODEL, "audio"): swamped_bg}) == {}
    swamped_example = Query("q", "audio", swamped.emb, MODEL, source="vector:q.npy")  # prompts do not score it
    assert build_indexes([swamped_example], {(MODEL, "audio"): swamped_bg})[MODEL, "audio"].examples.tolist() == [0]


def calibrated_cosines(cos: list[float], c: Calibration) -> list[float]:
    """An example query's scores over one stream, written out one window at a time (ALERTS.md)."""
    n, mean, var, out = 0, 0.0, 0.0, []
    for x in cos:
        sd = max(np.sqrt(var), c.min_sd)
        logit = min((x - mean) / sd - c.z, (x - c.min_cos) / c.min_sd)
        out.append(0.0 if n < c.warmup else 1 / (1 + np.exp(-logit)))
        if n >= c.warmup:
            x = min(max(x, mean - c.z * sd), mean + c.z * sd)
        a = max(1 / (n + 1), 1 / c.memory)
        mean, var, n = mean + a * (x - mean), (1 - a) * (var + a * (x - mean) ** 2), n + 1
    return out


def test_an_example_query_scores_its_cosine_against_the_streams_running_estimate():
    rng = np.random.default_rng(1)
    c = Calibration(min_cos=0.3, z=2.0, min_sd=0.01, memory=5, warmup=3)
    example = Query("q", "audio", basis(0), MODEL, device="glasses-*", calibration=c, source="example:q.wav")
    index = ModalityIndex([example, query(basis(1))], background(np.stack([basis(i) for i in range(2, 9)])))
    x = units(rng, 40)
    x[[10, 11, 25]] = basis(0)
    watched = [record(0, 1, v, "glasses-1", f"{i + 1}-0") for i, v in enumerate(x)]
    unwatched = [record(0, 1, v, "watch-1", f"{i + 1}-0") for i, v in enumerate(x[:5])]
    baselines = Baselines(10)
    batch = watched[:7] + unwatched + watched[7:]  # two streams in one batch
    scores = index.scores(batch, baselines)
    expected = calibrated_cosines((x @ basis(0)).tolist(), c)
    np.testing.assert_allclose(np.concatenate([scores[:7, 0], scores[12:, 0]]), expected, rtol=1e-6, atol=1e-12)
    assert scores[[10 + 5, 11 + 5], 0].min() > 0.9 and (scores[7:12, 0] == 0).all()  # e0 scores only where watched
    np.testing.assert_allclose(scores[:, 1], index.shares(np.stack([r.emb for r in batch]))[:, 1])  # text: share
    assert baselines.take(unwatched[0].stream, index.example_ids)[0, N] == 0 == FRESH[N]


def record(t0: int, t1: int, emb: np.ndarray, device: str = "dev", entry_id: str = "1-0") -> EmbeddingRecord:
    return EmbeddingRecord(f"bindstream:emb:{device}:audio", entry_id, device, "audio", t0, t1, MODEL, emb)


@pytest.mark.parametrize(
    ("t0", "t1", "emb", "problem"),
    [
        (0, INT64_MAX, basis(0), None),
        (5, 4, basis(0), "bad_time"),
        (-1, 4, basis(0), "bad_time"),
        (0, INT64_MAX + 1, basis(0), "bad_time"),
        (0, 1, 2 * basis(0), "not_unit"),
        (0, 1, np.full(DIM, np.nan, np.float32), "not_unit"),
    ],
)
def test_records_the_matcher_refuses_are_named(t0, t1, emb, problem):
    assert entry_problem(record(t0, t1, emb)) == problem
