"""Scoring: each window's calibrated score per query, in [0, 1]. A text query's is its softmax share among
the query and the background prompts of its (model, modality). An example or vector query's is its cosine to
the window calibrated against the stream itself (`Baselines`: how close the stream's windows usually come to
the example) and an absolute floor: text prompts are no yardstick for a clip. An audio query with `min_dbfs`
scores 0 on quieter windows. Plain numpy: the matcher, search and the timeline all score through here.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from fnmatch import fnmatchcase

import numpy as np

from sensors.protocol import INT64_MAX

from ..redis_layout import EmbeddingRecord, id_tuple
from .records import Background, Query

MAX_LOGIT = 50.0  # |logit| of a calibrated cosine is clipped here: the score is 0 or 1 within 2e-22 beyond

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


# A running estimate's fields: windows absorbed, mean and variance of the cosine, entry id (ms, seq) of the last
N, MEAN, VAR, LAST_MS, LAST_SEQ = range(5)
FRESH = np.array([0.0, 0.0, 0.0, -1.0, -1.0])


class Baselines:
    """Per stream, a running estimate for each example query of the mean and variance of its cosine to the
    stream's windows. Kept in the matcher's memory for the `max_streams` most recently scored streams: an
    estimate dropped, or lost with its process, forms again within its query's `warmup` windows."""

    def __init__(self, max_streams: int):
        self.max_streams = max_streams
        self.kept: OrderedDict[str, tuple[tuple[str, ...], np.ndarray]] = OrderedDict()

    def take(self, stream: str, query_ids: tuple[str, ...]) -> np.ndarray:
        """(len(query_ids), 5) the stream's estimates for those queries, FRESH where it has none (a copy)."""
        kept = self.kept.get(stream)
        if kept is not None and kept[0] == query_ids:
            return kept[1].copy()
        known = dict(zip(*kept)) if kept else {}
        return np.array([known.get(q, FRESH) for q in query_ids]).reshape(len(query_ids), len(FRESH))

    def put(self, stream: str, query_ids: tuple[str, ...], state: np.ndarray) -> None:
        self.kept[stream] = (query_ids, state)
        self.kept.move_to_end(stream)
        while len(self.kept) > self.max_streams:
            self.kept.popitem(last=False)


def calibrate(
    state: np.ndarray, cos: np.ndarray, ids: np.ndarray, watch: np.ndarray, params: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One window of each of L streams, for e example queries: (its scores (L, e), the estimates after it).
    `state` (L, e, 5) the estimates before it, `cos` (L, e) its cosines, `ids` (L, 2) its entry ids, `watch`
    (L, e) whether the query watches the stream's device, `params` (5, e) the queries' min_cos, z, min_sd,
    1 / memory, warmup. The score is sigmoid(min((c - mean) / sd - z, (c - min_cos) / min_sd)), sd =
    max(spread, min_sd): 0.5 where c lies `z` spreads above the stream's usual cosine and at the floor; 0
    before `warmup` windows. The window then joins the estimate, clipped to mean +- z sd (an event shifts it
    only slowly), weighing max(1 / windows so far, 1 / memory); a window not after the last one absorbed (read
    again after a failed commit) is scored but not absorbed twice."""
    n, mean, var, last_ms, last_seq = np.moveaxis(state, -1, 0)
    min_cos, z, min_sd, rate, warmup = params
    sd = np.maximum(np.sqrt(var), min_sd)
    ready = n >= warmup
    logit = np.clip(np.minimum((cos - mean) / sd - z, (cos - min_cos) / min_sd), -MAX_LOGIT, MAX_LOGIT)
    scores = np.where(watch & ready, 1.0 / (1.0 + np.exp(-logit)), 0.0)
    ms, seq = ids[:, :1], ids[:, 1:]
    new = watch & ((ms > last_ms) | ((ms == last_ms) & (seq > last_seq)))
    d = np.where(ready, np.clip(cos, mean - z * sd, mean + z * sd), cos) - mean
    a = np.where(new, np.maximum(1.0 / (n + 1), rate), 0.0)
    after = (
        n + new,
        mean + a * d,
        (1 - a) * (var + a * d * d),
        np.where(new, ms, last_ms),
        np.where(new, seq, last_seq),
    )
    return scores, np.stack(after, axis=-1)


class ModalityIndex:
    """The active queries of one (model, modality) and its background, as one matrix to score against."""

    def __init__(self, queries: list[Query], background: Background):
        self.queries = queries
        self.m = len(queries)
        q = np.stack([x.emb for x in queries])
        self.weights_t = np.ascontiguousarray(np.vstack([q, background.emb]).T)  # (dim, m + b)
        self.include = (q @ background.emb.T < background.exclude_cos).T.astype(np.float64)  # (b, m)
        self.scale = background.logit_scale
        self.examples = np.array([i for i, x in enumerate(queries) if x.by_example], dtype=np.intp)
        self.example_ids = tuple(queries[i].id for i in self.examples)
        cal = [queries[i].calibration for i in self.examples]
        self.calibration = np.array([[c.min_cos, c.z, c.min_sd, 1 / c.memory, c.warmup] for c in cal]).T.reshape(5, -1)
        self.min_dbfs = np.array([-np.inf if x.min_dbfs is None else x.min_dbfs for x in queries])
        self._columns: dict[str, np.ndarray] = {}
        self._watches: dict[str, np.ndarray] = {}

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

    def scores(self, records: Sequence[EmbeddingRecord], baselines: Baselines) -> np.ndarray:
        """(N, m) the records' scores, the rule of each query: text queries their share; example and vector
        queries, for the devices they watch, their calibrated cosine (updating `baselines`; each stream's
        records must come in stream order); 0 where a record's loudness lies below a query's `min_dbfs`
        (records without a loudness are not gated)."""
        x = np.stack([r.emb for r in records])
        out = self.shares(x)
        if len(self.examples):
            cos = (x @ self.weights_t[:, self.examples]).astype(np.float64)
            out[:, self.examples] = self._calibrated(records, cos, baselines)
        loudness = np.array([np.inf if r.dbfs is None else r.dbfs for r in records])
        out[loudness[:, None] < self.min_dbfs[None, :]] = 0.0
        return out

    def _calibrated(self, records: Sequence[EmbeddingRecord], cos: np.ndarray, baselines: Baselines) -> np.ndarray:
        """The example queries' scores: the i-th new window of every stream in the batch at once."""
        rows: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(records):
            rows[r.stream].append(i)
        streams = list(rows)
        watch = np.stack([self.watches(records[rows[s][0]].device) for s in streams])
        state = np.stack([baselines.take(s, self.example_ids) for s in streams])  # (streams, e, 5)
        ids = np.array([id_tuple(r.id) for r in records], dtype=np.float64)
        out = np.zeros_like(cos)
        for i in range(max(map(len, rows.values()))):
            live = np.array([len(rows[s]) > i for s in streams])
            at = [rows[s][i] for s in streams if len(rows[s]) > i]
            out[at], state[live] = calibrate(state[live], cos[at], ids[at], watch[live], self.calibration)
        for s, estimate in zip(streams, state):
            baselines.put(s, self.example_ids, estimate)
        return out

    def columns(self, device: str) -> np.ndarray:
        """Indices of the queries that watch `device`."""
        if device not in self._columns:
            self._columns[device] = np.array(
                [i for i, q in enumerate(self.queries) if fnmatchcase(device, q.device)], dtype=np.intp
            )
        return self._columns[device]

    def watches(self, device: str) -> np.ndarray:
        """(e,) whether each example query watches `device`."""
        if device not in self._watches:
            mask = np.zeros(self.m, dtype=bool)
            mask[self.columns(device)] = True
            self._watches[device] = mask[self.examples]
        return self._watches[device]

    def forget(self, device: str) -> None:
        self._columns.pop(device, None)
        self._watches.pop(device, None)


def build_indexes(
    queries: list[Query], backgrounds: dict[tuple[str, str], Background | None]
) -> dict[tuple[str, str], ModalityIndex]:
    """One ModalityIndex per (model, modality) that has queries and a background of their dimension; a text
    query that every background prompt is too close to (its share would always be 1) is left out too."""
    groups: dict[tuple[str, str], list[Query]] = defaultdict(list)
    for q in queries:
        groups[q.model, q.modality].append(q)
    out = {}
    for key, qs in groups.items():
        bg = backgrounds.get(key)
        if bg is None:
            continue
        usable = [
            q
            for q in qs
            if q.emb.shape[0] == bg.emb.shape[1] and (q.by_example or (bg.emb @ q.emb < bg.exclude_cos).any())
        ]
        if usable:
            out[key] = ModalityIndex(usable, bg)
    return out
