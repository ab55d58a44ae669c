"""Scoring: each window's calibrated score per query, its softmax share among the query and the background
prompts of its (model, modality). Plain numpy: the matcher, search and the timeline all score through here.
"""

from __future__ import annotations

from collections import defaultdict
from fnmatch import fnmatchcase

import numpy as np

from sensors.protocol import INT64_MAX

from ..redis_layout import EmbeddingRecord
from .records import Background, Query

UNIT_TOLERANCE = 0.01  # |norm - 1| of a stored embedding (bf16 encoders normalise to ~0.4 %)


def is_unit(v: np.ndarray) -> bool:
    """A finite unit-norm vector, as every stored embedding must be."""
    norm = float(np.linalg.norm(v))
    return np.isfinite(norm) and abs(norm - 1) <= UNIT_TOLERANCE


def entry_problem(r: EmbeddingRecord) -> str | None:
    """Why a decoded record cannot be scored, or None: `bad_time` unless 0 <= t0 <= t1 <= 2^63 - 1 (the
    protocol's t_ns range, in which device-time arithmetic is exact in int64), `not_unit` unless its
    embedding is a finite unit vector."""
    if not 0 <= r.t0 <= r.t1 <= INT64_MAX:
        return "bad_time"
    if not is_unit(r.emb):
        return "not_unit"
    return None


class ModalityIndex:
    """The active queries of one (model, modality) and its background, as one matrix to score against."""

    def __init__(self, queries: list[Query], background: Background):
        self.queries = queries
        self.m = len(queries)
        q = np.stack([x.emb for x in queries])
        self.weights_t = np.ascontiguousarray(np.vstack([q, background.emb]).T)  # (dim, m + b)
        self.include = (q @ background.emb.T < background.exclude_cos).T.astype(np.float64)  # (b, m)
        self.scale = background.logit_scale
        self._columns: dict[str, np.ndarray] = {}

    @property
    def dim(self) -> int:
        return self.weights_t.shape[0]

    def shares(self, x: np.ndarray) -> np.ndarray:
        """(N, dim) unit embeddings -> (N, m) calibrated scores: each query's softmax share among itself and
        the background prompts not too close to it, at logit scale `scale`. One matrix product."""
        z = (x @ self.weights_t).astype(np.float64) * self.scale
        zq, zb = z[:, : self.m], z[:, self.m :]
        top = zb.max(axis=1, keepdims=True)
        background = np.exp(zb - top) @ self.include  # (N, m) sum of exp over each query's background
        with np.errstate(divide="ignore", over="ignore"):
            return 1.0 / (1.0 + np.exp(np.log(background) + top - zq))

    def columns(self, device: str) -> np.ndarray:
        """Indices of the queries that watch `device`."""
        if device not in self._columns:
            self._columns[device] = np.array(
                [i for i, q in enumerate(self.queries) if fnmatchcase(device, q.device)], dtype=np.intp
            )
        return self._columns[device]

    def forget(self, device: str) -> None:
        self._columns.pop(device, None)


def build_indexes(
    queries: list[Query], backgrounds: dict[tuple[str, str], Background | None]
) -> dict[tuple[str, str], ModalityIndex]:
    """One ModalityIndex per (model, modality) that has queries and a background of their dimension; a
    query that every background prompt is too close to (it would always score 1) is left out too."""
    groups: dict[tuple[str, str], list[Query]] = defaultdict(list)
    for q in queries:
        groups[q.model, q.modality].append(q)
    out = {}
    for key, qs in groups.items():
        bg = backgrounds.get(key)
        if bg is None:
            continue
        usable = [q for q in qs if q.emb.shape[0] == bg.emb.shape[1] and (bg.emb @ q.emb < bg.exclude_cos).any()]
        if usable:
            out[key] = ModalityIndex(usable, bg)
    return out
