"""Few-shot tuning: how a threshold splits labelled scores, the threshold that splits them best (F1) on a training
split with its figures on the held-out one (`fit`: what `alert tune` and the console's Queries page store), and
the labelled scores a query's reviewed events give: each event's peak window, scored now by the query's rule
through the matcher's own `ModalityIndex.scores`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import redis

from ..redis_layout import CONFIRMED, FALSE_POSITIVE, BadRecord, EmbeddingRecord, decode_embedding, id_tuple
from .events import list_events
from .records import Background, Decision, Query
from .scoring import Baselines, ModalityIndex, entry_problem
from .search import XRANGE_CHUNK, read_chunks

THRESHOLD_BOUNDS = (1e-6, 1 - 1e-6)  # a fitted threshold stays strictly inside (0, 1)
HOLDOUT = 0.3  # share of each label kept out of the fit, to report precision and recall on
MIN_PER_LABEL = 2  # examples of each label a fit needs: a positive and a negative in each split
MAX_REVIEWED_EVENTS = 10_000  # a query's events read, newest first, for their reviews: a week at one a minute


@dataclass(frozen=True)
class Confusion:
    """The confusion matrix of a threshold on labelled scores, and the figures read from it."""

    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def confusion(scores: np.ndarray, labels: np.ndarray, threshold: float) -> Confusion:
    pred, labels = scores >= threshold, labels.astype(bool)
    return Confusion(
        int((pred & labels).sum()),
        int((pred & ~labels).sum()),
        int((~pred & labels).sum()),
        int((~pred & ~labels).sum()),
    )


def fit_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold with the best F1 on (scores, labels) (ties: the highest), placed halfway to the next
    lower score for margin, inside THRESHOLD_BOUNDS."""
    candidates = np.unique(scores)[::-1]  # descending
    f1 = [confusion(scores, labels, t).f1 for t in candidates]
    best = int(np.argmax(f1))
    threshold = candidates[best] if best + 1 == len(candidates) else (candidates[best] + candidates[best + 1]) / 2
    return float(np.clip(threshold, *THRESHOLD_BOUNDS))


@dataclass(frozen=True)
class Fit:
    """A threshold fitted on labelled scores (best F1 on a training split) and how it splits them."""

    threshold: float
    hysteresis: float  # the decision's, or half the new threshold where the old one was not below it
    rows: tuple[tuple[str, float, Confusion], ...]  # (split, threshold, confusion): train, then held out at new and old

    @property
    def separates(self) -> bool:
        """Whether the threshold tells the training examples apart at all (F1 above 0 on them)."""
        return self.rows[0][2].f1 > 0


def split(n: int, holdout: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) indices of n examples: a `holdout` share held out, at least one of each when > 0."""
    order = rng.permutation(n)
    held = min(max(int(round(holdout * n)), 1), n - 1) if holdout > 0 else 0
    return order[held:], order[:held]


def fit(
    positives: list[float], negatives: list[float], decision: Decision, holdout: float = HOLDOUT, seed: int = 0
) -> Fit:
    """The threshold with the best F1 on a training split of each label (`holdout` of each held out, the split
    drawn with `seed`), with its confusion on both splits and the held-out one at `decision`'s threshold."""
    scores = np.array(positives + negatives)
    labels = np.array([1] * len(positives) + [0] * len(negatives))
    rng = np.random.default_rng(seed)
    pos_train, pos_held = split(len(positives), holdout, rng)
    neg_train, neg_held = split(len(negatives), holdout, rng)  # drawn after the positives: one seed, one split
    train = np.concatenate([pos_train, len(positives) + neg_train])
    held = np.concatenate([pos_held, len(positives) + neg_held])
    threshold = fit_threshold(scores[train], labels[train])
    rows = [("train", threshold, confusion(scores[train], labels[train], threshold))]
    if len(held):
        rows += [
            ("held out", threshold, confusion(scores[held], labels[held], threshold)),
            ("held out, old threshold", decision.threshold, confusion(scores[held], labels[held], decision.threshold)),
        ]
    hysteresis = decision.hysteresis if decision.hysteresis < threshold else threshold / 2
    return Fit(threshold, hysteresis, tuple(rows))


@dataclass
class Reviewed:
    """A query's reviewed events as labelled scores: each event's peak window scored as a matcher scores the
    query now (its current vector, background, gate and calibration)."""

    positives: list[float] = field(default_factory=list)  # confirmed events
    negatives: list[float] = field(default_factory=list)  # false positives
    trimmed: int = 0  # reviewed events whose peak window is no longer in its stream (MAXLEN, retention)
    unusable: int = 0  # peak windows still stored that no matcher scores (malformed, another model or dimension)


def reviewed_scores(
    client: redis.Redis,
    query: Query,
    background: Background,
    limit: int = MAX_REVIEWED_EVENTS,
    chunk: int = XRANGE_CHUNK,
) -> Reviewed:
    """The confirmed and false-positive events among `query`'s newest `limit`, each scored at its peak window
    (the entry `peak_source_id` of its `source` stream). A text query scores that window alone (its share); an
    example or vector query's score depends on the stream before it, so each stream is replayed from its first
    stored window with a fresh estimate, as a matcher reading it from there scores it (ALERTS.md, "Review")."""
    index = ModalityIndex([query], background)

    def scorable(r: EmbeddingRecord) -> bool:
        return r.model == query.model and r.emb.shape[0] == index.dim and entry_problem(r) is None

    events, _ = list_events(client, query=query.id, limit=limit)
    reviewed = [e for e in events if e.review in (CONFIRMED, FALSE_POSITIVE)]
    pipe = client.pipeline(transaction=False)
    for e in reviewed:
        pipe.xrange(e.source, min=e.peak_source_id, max=e.peak_source_id)
    out = Reviewed()
    peaks: list[tuple[bool, EmbeddingRecord]] = []  # (confirmed, the peak window)
    for e, reply in zip(reviewed, pipe.execute(raise_on_error=False)):
        if isinstance(reply, redis.ResponseError):  # the key holds no stream now
            out.unusable += 1
        elif not reply:
            out.trimmed += 1
        else:
            try:
                record = decode_embedding(e.source, *reply[0])
            except BadRecord:
                out.unusable += 1
                continue
            if scorable(record):
                peaks.append((e.review == CONFIRMED, record))
            else:
                out.unusable += 1
    scores: dict[tuple[str, str], float] = {}  # (stream, entry id) -> score
    if not query.by_example:
        if peaks:
            records = [r for _, r in peaks]
            scores = {(r.stream, r.id): float(s) for r, s in zip(records, index.scores(records, Baselines(1))[:, 0])}
    else:
        wanted: dict[str, set[str]] = defaultdict(set)
        for _, r in peaks:
            wanted[r.stream].add(r.id)
        for stream, ids in wanted.items():
            last = max(map(id_tuple, ids))
            baselines = Baselines(1)  # the stream's estimate, formed again from its first stored window
            for records, _ in read_chunks(client, stream, "-", chunk):
                usable = [r for r in records if scorable(r)]
                if usable:
                    values = index.scores(usable, baselines)[:, 0]
                    scores.update({(stream, r.id): float(s) for r, s in zip(usable, values) if r.id in ids})
                if records and id_tuple(records[-1].id) >= last:
                    break
    for confirmed, r in peaks:
        score = scores.get((r.stream, r.id))
        if score is None:  # trimmed between the two reads
            out.trimmed += 1
        else:
            (out.positives if confirmed else out.negatives).append(score)
    return out
