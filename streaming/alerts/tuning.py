"""Few-shot tuning: how a threshold splits labelled scores, and the threshold that splits them best (F1)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

THRESHOLD_BOUNDS = (1e-6, 1 - 1e-6)  # a fitted threshold stays strictly inside (0, 1)


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
