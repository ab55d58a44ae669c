"""One shard of the search index: the embeddings of one (model, modality), in segments of consecutive labels, each
a usearch HNSW graph storing its vectors quantised (f16, or i8) with a side table of what each vector is: device,
epoch, t0/t1 and the stream entry id. Labels are handed out in arrival order; a segment is sealed when it holds
`segment_vectors` and never changes again, and the oldest sealed segment is evicted whole once the shard holds
more than `max_vectors`. Segments also bound the work of a time filter (only the segments stored since are
searched) and of a snapshot (a sealed segment is written once).

A search picks candidates by cosine, filtered by a device glob and a time (the entry ids' ms, the server's clock,
as brute-force search filters). In each segment: without a filter, the graph's top `count`; when the filter leaves
at most `exact_max` of its vectors, an exact search over those; otherwise the graph's top k, k oversampled by the
share the filter keeps and widened until `count` pass (usearch's Python binding takes no filter predicate).

Snapshots: in the shard's directory, a folder per segment (`seg-<first label>-<count>`: its graph and side
table), written once, and a manifest `snap-<serial>.json` (the segments, the device ids, each stream's position)
that the file CURRENT names (replaced atomically). Files the current and the previous manifest do not name are
removed; the previous one stays for a reader that opened it. A reader opens a snapshot read-only and
memory-mapped, and so does the indexer its sealed segments. Needs neither Ray nor torch: `bindstream search` and
the web console open snapshots with it. (Where Ray is installed it imports Ray's compiled module before usearch's:
usearch 2.26 loaded first makes Ray abort with std::regex_error when the process then creates a Ray metric.)
"""

from __future__ import annotations

import bisect
import json
import math
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import cast

import numpy as np

try:  # before usearch: loaded after it, Ray's compiled module aborts as it creates a metric (std::regex_error)
    import ray._raylet  # noqa: F401
except ImportError:  # no Ray in this process (the web console runs without): nothing to protect
    pass
from usearch.index import Index

from sensors.recorder import fsync_path

from ..redis_layout import EmbeddingRecord, id_tuple, stream_key

DTYPES = ("f16", "i8")  # usearch's storage of a vector: 2 bytes a dimension, or 1 (README: recall of each)
ROW = np.dtype([("ms", "<i8"), ("seq", "<i8"), ("t0", "<i8"), ("t1", "<i8"), ("epoch", "<i4"), ("device", "<i4")])
VECTORS, ROWS, CURRENT = "vectors.usearch", "rows.npy", "CURRENT"
MANIFEST = re.compile(r"snap-(\d{8})\.json")
SEGMENT = re.compile(r"seg-\d{12}-\d{9}")
SNAPSHOT_VERSION = 1
OVERSAMPLE = 1.5  # graph candidates asked per wanted one, beyond what the filter's share of vectors implies
WIDEN = 4  # when too few candidates pass a filter, the graph is asked for this many times more
OPEN_TRIES = 3  # a reader that lost a race with two snapshots of the writer reads CURRENT again


class SnapshotError(RuntimeError):
    """A snapshot that cannot be used: a file missing or unreadable, or files that disagree."""


@dataclass(frozen=True)
class IndexSettings:
    """How a shard stores and searches its vectors (the `[index]` table of the pipeline config), and how its
    indexer reads the streams and saves; checked when built. dtype, connectivity and expansion_add apply to new
    segments: a snapshot's keep their own."""

    dtype: str = "f16"  # "f16" or "i8" (half the memory; lower recall: README, "Search index")
    connectivity: int = 16  # HNSW edges per vector (M): more raise recall, memory and insertion time
    expansion_add: int = 128  # candidates weighed per insertion (efConstruction)
    expansion_search: int = 256  # candidates weighed per search (ef): recall against latency (README's table)
    max_vectors: int = 1_000_000  # per shard; beyond, the oldest segment is evicted (counted as `evicted`)
    segment_vectors: int = 250_000  # per segment (at most max_vectors): eviction's step, the most a snapshot rewrites
    exact_max: int = 2_000  # a filter leaving at most this many vectors of a segment searches them exactly
    save_s: float = 120.0  # snapshot this often while there is news (search reads newer windows by brute force)
    read_count: int = 100  # entries per stream per read
    read_streams: int = 50  # streams per read (a read holds at most read_count * read_streams entries)
    block_ms: int = 100  # wait after a read that found nothing (the stream registry is polled that often)
    lease_s: float = 30.0  # an indexer that stops renewing its shard's lease is replaced after this long
    retry_max_s: float = 2.0  # backoff cap while Redis or the disk fails
    max_logged: int = 1_000  # (reason, device) pairs warned about in the log; later ones are only counted
    threads: int = 1  # usearch threads per insertion batch (the matchers' rule: one core each)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        least = {"connectivity": 2, "expansion_add": 2, "expansion_search": 2, "max_vectors": 1, "read_count": 1}
        least |= {"segment_vectors": 1, "read_streams": 1, "block_ms": 1, "max_logged": 1, "threads": 1}
        for name, low in (least | {"exact_max": 0}).items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer of at least {low}, got {value!r}")
        for name in ("save_s", "lease_s", "retry_max_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:  # NaN too
                raise ValueError(f"{name} must be a finite number of seconds above 0, got {value!r}")


@dataclass
class Found:
    """A search's candidates, best first: their labels, cosines to the query and (unit) vectors as stored."""

    labels: np.ndarray  # (k,) int64
    cosines: np.ndarray  # (k,) float32
    vectors: np.ndarray  # (k, dim) float32


class Segment:
    """Consecutive labels from `first`: their graph and side table (row i describes label first + i)."""

    def __init__(self, index: Index, rows: np.ndarray, first: int):
        self.index, self.first = index, first
        self._rows, self._n = rows, len(rows)  # rows[:n] are used (room to grow in the active segment)
        self._max_ms: int | None = None  # of a sealed segment, once asked

    def __len__(self) -> int:
        return self._n

    @property
    def rows(self) -> np.ndarray:
        return self._rows[: self._n]

    @property
    def name(self) -> str:
        """Its folder in a snapshot: the first label and the count, so that a grown segment is a new folder."""
        return f"seg-{self.first:012d}-{self._n:09d}"

    def max_ms(self, sealed: bool) -> int:
        if self._max_ms is not None:
            return self._max_ms
        value = int(self.rows["ms"].max()) if self._n else -1
        if sealed:
            self._max_ms = value
        return value

    def add(self, vectors: np.ndarray, rows: np.ndarray, threads: int) -> None:
        start = self.first + self._n
        self.index.add(np.arange(start, start + len(rows), dtype=np.uint64), vectors, threads=threads)
        if self._n + len(rows) > len(self._rows):
            grown = np.empty(max(self._n + len(rows), 2 * len(self._rows)), ROW)
            grown[: self._n] = self.rows
            self._rows = grown
        self._rows[self._n : self._n + len(rows)] = rows
        self._n += len(rows)

    def vectors(self, labels: np.ndarray, dtype: str) -> np.ndarray:
        """The stored vectors of `labels` (of this segment, stored as `dtype`), as unit float32 rows (quantisation
        moves their norm off 1). Read in the stored type: usearch converts to float32 key by key, numpy at once."""
        if not len(labels):
            return np.zeros((0, int(self.index.ndim)), np.float32)
        stored = np.stack(cast(tuple, self.index.get(labels.astype(np.uint64), dtype=dtype))).astype(np.float32)
        return stored / np.maximum(np.linalg.norm(stored, axis=1, keepdims=True), 1e-12)

    def save(self, folder: Path) -> None:
        """Write the segment into `folder` (made here, whole or not at all)."""
        part = folder.with_name(folder.name + ".part")
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir()
        self.index.save(str(part / VECTORS))
        np.save(part / ROWS, self.rows)
        for file in (VECTORS, ROWS):
            fsync_path(part / file)
        os.rename(part, folder)

    @classmethod
    def open(cls, folder: Path, first: int, view: bool) -> Segment:
        """The segment saved in `folder`; read-only and memory-mapped with `view`."""
        rows = np.load(folder / ROWS, mmap_mode="r" if view else None, allow_pickle=False)
        index = Index.restore(str(folder / VECTORS), view=view)
        if index is None or rows.dtype != ROW or len(rows) != len(index):
            raise SnapshotError(f"segment {folder}: its graph and side table disagree")
        return cls(index, rows, first)


class Shard:
    """The segments of one (model, modality), the device ids of their side tables, and the last entry id added of
    each stream (`positions`: where the indexer resumes, and where `bindstream search` reads on by brute force)."""

    def __init__(
        self,
        model: str,
        modality: str,
        dim: int,
        settings: IndexSettings,
        segments: list[Segment] | None = None,
        meta: dict | None = None,
    ):
        self.model, self.modality, self.dim, self.settings = model, modality, dim, settings
        self.segments = segments or []
        meta = meta or {}
        self.dtype: str = meta.get("dtype", settings.dtype)
        self.evicted: int = meta.get("evicted", 0)
        self.devices: list[str] = list(meta.get("devices", []))  # side table device code -> id
        self.codes = {d: i for i, d in enumerate(self.devices)}
        self.positions: dict[str, str] = dict(meta.get("positions", {}))  # stream key -> last entry id added
        self._next: int = meta.get("next", 0)  # the label the next vector gets

    def __len__(self) -> int:
        return sum(len(s) for s in self.segments)

    @property
    def memory_bytes(self) -> int:
        """usearch's accounting of the graphs and vectors (mapped files included), and the side tables."""
        return sum(int(s.index.memory_usage) + s.rows.nbytes for s in self.segments)

    # ----- adding and evicting -----

    def add(self, records: Sequence[EmbeddingRecord]) -> None:
        """Index records (checked by the caller: this shard's model and dimension, finite unit vectors)."""
        rows = np.empty(len(records), ROW)
        for i, r in enumerate(records):
            ms, seq = id_tuple(r.id)
            rows[i] = (ms, seq, r.t0, r.t1, r.epoch, self.code(r.device))
            last = self.positions.get(r.stream)
            if last is None or (ms, seq) > id_tuple(last):
                self.positions[r.stream] = r.id
        self.add_rows(np.stack([r.emb for r in records]), rows)

    def add_rows(self, vectors: np.ndarray, rows: np.ndarray) -> None:
        """Index (n, dim) vectors described by n side-table rows (ROW; device codes from `code`), sealing the
        active segment when it is full."""
        size, done = min(self.settings.segment_vectors, self.settings.max_vectors), 0
        while done < len(rows):
            if not self.segments or len(self.segments[-1]) >= size:
                self.segments.append(Segment(self._new_index(), np.empty(0, ROW), self._next))
            take = min(size - len(self.segments[-1]), len(rows) - done)
            self.segments[-1].add(vectors[done : done + take], rows[done : done + take], self.settings.threads)
            done += take
            self._next += take

    def _new_index(self) -> Index:
        s = self.settings
        return Index(
            ndim=self.dim,
            metric="cos",
            dtype=self.dtype,
            connectivity=s.connectivity,
            expansion_add=s.expansion_add,
            expansion_search=s.expansion_search,
        )

    def code(self, device: str) -> int:
        """The side table's code of `device` (a new device gets the next one)."""
        if device not in self.codes:
            self.codes[device] = len(self.devices)
            self.devices.append(device)
        return self.codes[device]

    def evict(self) -> int:
        """Drop the oldest sealed segments while the shard holds more than `max_vectors`; returns the vectors
        dropped."""
        dropped = 0
        while len(self) > self.settings.max_vectors and len(self.segments) > 1:
            dropped += len(self.segments.pop(0))
        self.evicted += dropped
        return dropped

    # ----- searching -----

    def search(self, vector: np.ndarray, count: int, device: str = "*", since_ms: int | None = None) -> Found:
        """The `count` vectors closest to the unit `vector` by cosine among those of the devices matching
        `device` whose entry was stored at or after `since_ms` (server clock; None: any time)."""
        vector = np.ascontiguousarray(vector, np.float32)
        matching = None
        if device != "*":
            matching = np.array([fnmatchcase(d, device) for d in self.devices], dtype=bool)
        labels, cosines = [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
        last = len(self.segments) - 1
        for i, seg in enumerate(self.segments if count > 0 else []):
            if not len(seg) or (since_ms is not None and seg.max_ms(i < last) < since_ms):
                continue
            found = self._search_segment(seg, vector, count, self._allowed(seg, matching, since_ms))
            labels.append(found[0])
            cosines.append(found[1])
        merged, cos = np.concatenate(labels), np.concatenate(cosines)
        best = np.argsort(-cos, kind="stable")[:count]
        vectors = self._vectors(merged[best])
        return Found(merged[best], vectors @ vector, vectors)

    def _allowed(self, seg: Segment, matching: np.ndarray | None, since_ms: int | None) -> np.ndarray | None:
        """Which rows of `seg` pass the filters; None when all do."""
        mask = None
        if matching is not None and not matching.all():
            mask = matching[seg.rows["device"]]
        if since_ms is not None:
            recent = seg.rows["ms"] >= since_ms
            mask = recent if mask is None else mask & recent
        return None if mask is not None and mask.all() else mask

    def _search_segment(
        self, seg: Segment, vector: np.ndarray, count: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(labels, cosines) of the segment's best `count` that pass `allowed`: exactly when at most `exact_max`
        pass, else from its graph, asked for `count` oversampled by the share that passes, WIDEN times more
        while too few do."""
        n = len(seg)
        kept = n if allowed is None else int(np.count_nonzero(allowed))
        if kept == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if allowed is not None and kept <= self.settings.exact_max:
            labels = np.flatnonzero(allowed) + seg.first
            cosines = seg.vectors(labels, self.dtype) @ vector
            best = np.argsort(-cosines, kind="stable")[:count]
            return labels[best], cosines[best]
        k = min(n, math.ceil(count * n / kept * (OVERSAMPLE if allowed is not None else 1)))
        while True:
            matches = seg.index.search(vector, k, threads=1)
            labels = np.asarray(matches.keys, dtype=np.int64)
            cosines = 1 - np.asarray(matches.distances, dtype=np.float32)
            if allowed is not None:
                passed = allowed[labels - seg.first]
                labels, cosines = labels[passed], cosines[passed]
            if len(labels) >= count or k >= n:
                return labels[:count], cosines[:count]
            k = min(n, k * WIDEN)

    def tune(self, expansion_search: int) -> None:
        """Weigh `expansion_search` candidates per graph search (a snapshot's graphs keep the value they were
        saved with until told)."""
        for seg in self.segments:
            seg.index.expansion_search = expansion_search  # type: ignore[misc]  # usearch has the setter

    def _segment_of(self, label: int) -> Segment:
        return self.segments[bisect.bisect_right([s.first for s in self.segments], label) - 1]

    def _vectors(self, labels: np.ndarray) -> np.ndarray:
        out = np.zeros((len(labels), self.dim), np.float32)
        for seg in self.segments:
            mine = (labels >= seg.first) & (labels < seg.first + len(seg))
            if mine.any():
                out[mine] = seg.vectors(labels[mine], self.dtype)
        return out

    def records(self, found: Found) -> list[EmbeddingRecord]:
        """The candidates as stream records (their vectors the stored ones)."""
        out = []
        for label, vector in zip(found.labels, found.vectors):
            seg = self._segment_of(int(label))
            row = seg.rows[int(label) - seg.first]
            device = self.devices[row["device"]]
            out.append(
                EmbeddingRecord(
                    stream=stream_key(device, self.modality),
                    id=f"{row['ms']}-{row['seq']}",
                    device=device,
                    modality=self.modality,
                    t0=int(row["t0"]),
                    t1=int(row["t1"]),
                    model=self.model,
                    emb=vector,
                    epoch=int(row["epoch"]),
                )
            )
        return out

    # ----- snapshots -----

    def save(self, directory: Path) -> str:
        """Write the segments not yet in `directory` and a manifest, name it in CURRENT, and remove what neither
        it nor the previous manifest names. Returns the manifest's name."""
        directory.mkdir(parents=True, exist_ok=True)
        previous = current_snapshot(directory)
        keep = set(_manifest(directory, previous)["segments"]) if previous else set()
        for seg in self.segments:
            if not (directory / seg.name).exists():
                seg.save(directory / seg.name)
        serial = int(MANIFEST.fullmatch(previous)[1]) + 1 if previous else 1  # type: ignore[index]
        name = f"snap-{serial:08d}.json"
        _write_whole(directory / name, json.dumps(self._meta()))
        _write_whole(directory / CURRENT, name)
        keep |= {seg.name for seg in self.segments} | {name, previous or "", CURRENT}
        for path in directory.iterdir():
            if path.name in keep:
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        return name

    def _meta(self) -> dict:
        return {
            "version": SNAPSHOT_VERSION,
            "model": self.model,
            "modality": self.modality,
            "dim": self.dim,
            "dtype": self.dtype,
            "segments": [s.name for s in self.segments],
            "next": self._next,
            "evicted": self.evicted,
            "devices": self.devices,
            "positions": self.positions,
            "expansion_search": self.settings.expansion_search,
            "exact_max": self.settings.exact_max,
            "saved_ms": time.time_ns() // 1_000_000,
        }

    @classmethod
    def open(cls, directory: Path, settings: IndexSettings | None = None, view: bool = False) -> Shard | None:
        """The shard of the snapshot CURRENT names in `directory` (None when there is none): read-only and
        memory-mapped with `view`, else with its active (last) segment loaded to be added to; searched with
        `settings`, or without them with the search settings of the indexer that saved it. SnapshotError when it
        cannot be used."""
        for attempt in range(OPEN_TRIES):
            name = current_snapshot(directory)
            if name is None:
                return None
            try:
                meta = _manifest(directory, name)
                if meta.get("version") != SNAPSHOT_VERSION:
                    raise SnapshotError(f"{directory / name}: version {meta.get('version')}, not {SNAPSHOT_VERSION}")
                names = meta["segments"]
                segments = [
                    Segment.open(directory / n, int(n.split("-")[1]), view or i < len(names) - 1)
                    for i, n in enumerate(names)
                ]
            except FileNotFoundError:
                if attempt + 1 < OPEN_TRIES:
                    continue  # the writer replaced CURRENT twice meanwhile
                raise SnapshotError(f"snapshot {directory / name} vanished while it was read") from None
            except (OSError, ValueError, KeyError, RuntimeError) as err:
                raise SnapshotError(f"snapshot {directory / name} does not load: {err!r}") from err
            if settings is None:
                settings = IndexSettings(expansion_search=meta["expansion_search"], exact_max=meta["exact_max"])
            shard = cls(meta["model"], meta["modality"], meta["dim"], settings, segments, meta)
            shard.tune(settings.expansion_search)
            return shard
        return None


def current_snapshot(directory: Path) -> str | None:
    """The name of the manifest CURRENT names in `directory`; None without one."""
    try:
        name = (directory / CURRENT).read_text().strip()
    except FileNotFoundError:
        return None
    if not MANIFEST.fullmatch(name):
        raise SnapshotError(f"{directory / CURRENT} names no snapshot: {name[:80]!r}")
    return name


def _manifest(directory: Path, name: str) -> dict:
    meta = json.loads((directory / name).read_text())
    if not all(SEGMENT.fullmatch(n) for n in meta["segments"]):
        raise SnapshotError(f"{directory / name} names a segment folder that is not one")
    return meta


def _write_whole(path: Path, content: str) -> None:
    """Write `path` whole or not at all (a reader never sees it half written)."""
    part = path.with_name(path.name + ".part")
    part.write_text(content)
    fsync_path(part)
    os.replace(part, path)
    fsync_path(path.parent)
