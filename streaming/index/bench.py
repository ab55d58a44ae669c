"""`bindstream bench search`: the search index (shard.py) on synthetic embeddings, against exact search.

The data: `windows` unit vectors in `dim` dimensions (1024: imagebind_huge's joint space) in scenes, runs of
`per_scene` consecutive windows around a random centre (a wearable sees one scene for a while): each window is the
centre plus Gaussian noise of norm `spread`, normalised (spread 1: cosine ~0.71 to its centre, ~0.5 to another
window of its scene). Windows go round robin to `devices` devices, one ms of stream id apart. Queries are new
windows of random scenes. The truth is numpy's exact top 10 by cosine over the float32 vectors (a matrix product),
computed chunk by chunk while the index is built: memory holds the index and one chunk of the data.

Figures: the ingest rate (vectors/s into the index), memory (usearch's own count, and the side table), the
latency and recall@10 of a top-10 search at each `expansion_search`, the same with filters (one device: 1 % of the
windows with 100 devices; the newest 10 % of the windows, asked by queries of its scenes, the usual case, and by
queries of any scene, whose true top 10 then lies far from them) through each of the two ways a segment is
searched under a filter (its graph, oversampled; exactly, over the vectors that pass), each for the first
FILTERED_QUERIES queries, and a snapshot's save and open. Latencies are of one query at a time, on one thread,
through `Shard.search` (the candidates' vectors included).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .shard import ROW, Found, IndexSettings, Shard

BASE_MS = 1_700_000_000_000  # the stream id (ms) of the first window
DEVICE_SHARE_OF = 7  # the device whose windows the device filter keeps
NEWEST = 0.1  # the share of the windows the time filter keeps
EXACT_EVERYTHING = 1 << 62  # an exact_max that sends every filtered segment to the exact search
FILTERED_QUERIES = 100  # queries of each filtered measurement (an exact one over 100,000 windows takes ~1 s)


@dataclass(frozen=True)
class SearchBench:
    """What `bench search` builds and asks."""

    windows: int = 100_000
    dim: int = 1024
    queries: int = 300
    per_scene: int = 1_000
    spread: float = 1.0
    devices: int = 100
    settings: IndexSettings = field(default_factory=lambda: IndexSettings(max_vectors=1 << 40))
    expansion_search: tuple[int, ...] = (32, 64, 128, 256, 512)
    chunk: int = 20_000  # windows made, indexed and scored at a time
    k: int = 10
    seed: int = 0


@dataclass
class Point:
    """Recall@k and latency of one way of searching."""

    label: str
    recall: float
    p50_ms: float
    p99_ms: float


@dataclass
class SearchFigures:
    build_s: float
    ingest_per_s: float
    memory_bytes: int
    segments: int
    points: list[Point]  # unfiltered, one per expansion_search
    filtered: list[Point]
    exact_ms: float  # one query against every window with numpy (float32 matrix product), extrapolated
    save_s: float
    snapshot_bytes: int
    open_s: float
    reopened_recall: float  # of the snapshot opened read-only, against the live index's answers


class TopK:
    """The running exact top k of each query over the chunks seen, by cosine, among the windows `keep` passes."""

    def __init__(self, n_queries: int, k: int):
        self.k = k
        self.labels = np.full((n_queries, 0), -1, np.int64)
        self.scores = np.zeros((n_queries, 0), np.float32)

    def update(self, sims: np.ndarray, first: int, keep: np.ndarray | None = None) -> None:
        if keep is not None:
            sims = np.where(keep[None, :], sims, -np.inf)
        labels = np.concatenate([self.labels, np.broadcast_to(np.arange(first, first + sims.shape[1]), sims.shape)], 1)
        scores = np.concatenate([self.scores, sims], 1)
        best = np.argpartition(-scores, self.k - 1, axis=1)[:, : self.k]
        self.labels = np.take_along_axis(labels, best, 1)
        self.scores = np.take_along_axis(scores, best, 1)

    def truth(self) -> list[set[int]]:
        """Each query's top k labels (fewer where fewer windows passed)."""
        pairs = zip(self.labels, self.scores)
        return [{int(x) for x, score in zip(row, scores) if np.isfinite(score)} for row, scores in pairs]


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def run_search_bench(b: SearchBench, on_progress: Callable[[str, int, int], None] | None = None) -> SearchFigures:
    """Build the index of `b.windows` synthetic windows, then measure it (see the module's docstring)."""
    progress = on_progress or (lambda phase, done, total: None)
    rng = np.random.default_rng(b.seed)
    scenes = unit_rows(rng.standard_normal((max(1, -(-b.windows // b.per_scene)), b.dim)))

    def draw(which: np.ndarray) -> np.ndarray:
        noise = rng.standard_normal((len(which), b.dim)).astype(np.float32) * (b.spread / np.sqrt(b.dim))
        return unit_rows(scenes[which] + noise)

    newest_from = int(b.windows * (1 - NEWEST))
    queries = draw(rng.integers(0, len(scenes), b.queries))
    recent = draw(rng.integers(min(-(-newest_from // b.per_scene), len(scenes) - 1), len(scenes), b.queries))
    everything, one_device, newest, newest_any = (TopK(b.queries, b.k) for _ in range(4))
    shard = Shard("bench", "vision", b.dim, b.settings)
    codes = np.array([shard.code(f"dev-{i:03d}") for i in range(b.devices)], np.int32)
    build_s = exact_s = 0.0
    for first in range(0, b.windows, b.chunk):
        labels = np.arange(first, min(first + b.chunk, b.windows))
        x = draw(labels // b.per_scene)
        rows = np.zeros(len(labels), ROW)
        rows["ms"], rows["t0"], rows["device"] = BASE_MS + labels, labels * 1_000_000_000, codes[labels % b.devices]
        start = time.perf_counter()
        shard.add_rows(x, rows)
        build_s += time.perf_counter() - start
        start = time.perf_counter()
        x @ queries[0]
        exact_s += time.perf_counter() - start
        sims = queries @ x.T
        everything.update(sims, first)
        one_device.update(sims, first, labels % b.devices == DEVICE_SHARE_OF)
        newest_any.update(sims, first, labels >= newest_from)
        newest.update(recent @ x.T, first, labels >= newest_from)
        progress("indexing", int(labels[-1]) + 1, b.windows)
    points = []
    for ef in b.expansion_search:
        shard.tune(ef)
        points.append(measure(f"expansion_search {ef}", lambda q: shard.search(q, b.k), queries, everything.truth()))
    shard.tune(b.settings.expansion_search)
    device = f"dev-{DEVICE_SHARE_OF:03d}"
    since = BASE_MS + newest_from
    filtered = []
    asked = slice(0, FILTERED_QUERIES)
    filters = [  # label, device glob, since, queries, truth, searched exactly too
        (f"one device ({100 / b.devices:g} %)", device, None, queries, one_device.truth(), True),
        (f"newest {100 * NEWEST:g} %, queries of its scenes", "*", since, recent, newest.truth(), True),
        (f"newest {100 * NEWEST:g} %, queries of any scene", "*", since, queries, newest_any.truth(), False),
    ]
    for how, exact_max in (("graph, oversampled", 0), ("exact", EXACT_EVERYTHING)):
        shard.settings = replace(b.settings, exact_max=exact_max)
        for label, glob, since_ms, asking, truth, exact_too in filters:
            if exact_max and not exact_too:
                continue

            def search(q: np.ndarray, g: str = glob, t: int | None = since_ms) -> Found:
                return shard.search(q, b.k, g, t)

            filtered.append(measure(f"{label}, {how}", search, asking[asked], truth[asked]))
    shard.settings = b.settings
    progress("saving", 0, 1)
    live = [set(shard.search(q, b.k).labels.tolist()) for q in queries]
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        shard.save(Path(folder))
        save_s = time.perf_counter() - start
        size = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
        start = time.perf_counter()
        reopened = Shard.open(Path(folder), view=True)
        open_s = time.perf_counter() - start
        assert reopened is not None
        again = measure("reopened", lambda q: reopened.search(q, b.k), queries, live)
    return SearchFigures(
        build_s,
        b.windows / build_s,
        shard.memory_bytes,
        len(shard.segments),
        points,
        filtered,
        1000 * exact_s,
        save_s,
        size,
        open_s,
        again.recall,
    )


def measure(label: str, search: Callable[[np.ndarray], Found], queries: np.ndarray, truth: list[set[int]]) -> Point:
    """Recall@k (the share of each query's true top k found, averaged) and the latency of `search`."""
    times, found = [], []
    for q in queries:
        start = time.perf_counter()
        result = search(q)
        times.append(time.perf_counter() - start)
        found.append(set(result.labels.tolist()))
    recall = float(np.mean([len(f & t) / len(t) if t else 1.0 for f, t in zip(found, truth)]))
    ms = 1000 * np.array(times)
    return Point(label, recall, float(np.percentile(ms, 50)), float(np.percentile(ms, 99)))


TARGET_RECALL = 0.95  # recall@10 of an unfiltered search (issue 16)
TARGET_P99_MS = 20.0  # its latency p99, on the 2-core development machine


def figure_rows(b: SearchBench, f: SearchFigures) -> list[tuple[str, str, str]]:
    """The figures as (figure, measured, target) rows, for a table."""
    per_million = f.memory_bytes * 1e6 / b.windows
    rows = [
        (
            f"ingest: vectors/s into the index ({b.settings.threads} thread, expansion_add {b.settings.expansion_add})",
            f"{f.ingest_per_s:,.0f} ({f.build_s:.0f} s)",
            "",
        ),
        (
            f"memory: graph + {b.settings.dtype} vectors + side table ({f.segments} segments)",
            f"{f.memory_bytes / 2**20:,.0f} MiB ({per_million / 2**30:.2f} GiB per million windows)",
            "",
        ),
        ("exact search, numpy float32 matrix product, one query", f"{f.exact_ms:.1f} ms", ""),
    ]
    for p in f.points:
        rows.append(
            (
                f"top-{b.k}, {p.label}: recall@{b.k}, latency p50 / p99",
                f"{p.recall:.3f}, {p.p50_ms:.2f} / {p.p99_ms:.2f} ms",
                f">= {TARGET_RECALL}, p99 <= {TARGET_P99_MS:g} ms",
            )
        )
    for p in f.filtered:
        rows.append((f"filtered: {p.label}", f"{p.recall:.3f}, {p.p50_ms:.2f} / {p.p99_ms:.2f} ms", ""))
    rows.append(
        (
            "snapshot: save / size on disk / open read-only",
            f"{f.save_s:.1f} s / {f.snapshot_bytes / 2**20:,.0f} MiB / {1000 * f.open_s:.0f} ms",
            "",
        )
    )
    rows.append(("snapshot opened read-only: the live index's top-10 found", f"{f.reopened_recall:.3f}", "1.000"))
    return rows
