"""Looking back over the stored embedding streams: brute-force search for the windows most like a query.

The streams are read with XRANGE in chunks from a stream id at `now - since` (stream ids are the server's
ms clock at XADD), the float32 vectors decoded and scored with numpy as the matcher scores them (the
timeline reads the same way). ALERTS.md gives the measured cost per million windows and when to move to a
vector index.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import redis

from ..redis_layout import BadRecord, EmbeddingRecord, decode_embedding
from ..subscriber import stream_keys
from .queries import load_background
from .records import Query, QueryError
from .scoring import ModalityIndex, entry_problem

XRANGE_CHUNK = 10_000  # entries per XRANGE call (bounds the memory of one read)
DURATION_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration_ms(text: str) -> int:
    """'90s', '10m', '2h', '1d', '500ms' -> milliseconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*", text)
    if not match:
        raise ValueError(f"cannot read the duration {text!r}; write e.g. 30s, 10m, 2h or 1d")
    return int(float(match[1]) * DURATION_UNITS_MS[match[2]])


def duration_text(ms: int) -> str:
    """A Duration's milliseconds as text in the largest unit that divides them ('10m' for 600000)."""
    if not ms:
        return "0"
    size, unit = max((size, unit) for unit, size in DURATION_UNITS_MS.items() if ms % size == 0)
    return f"{ms // size}{unit}"


def since_id(client: redis.Redis, since_ms: int | None) -> str:
    """The smallest stream id at most `since_ms` old by the server's clock ('-': everything)."""
    if since_ms is None:
        return "-"
    seconds, micros = client.time()
    return f"{max(seconds * 1000 + micros // 1000 - since_ms, 0)}-0"


def read_chunks(
    client: redis.Redis, key: str, start: str = "-", chunk: int = XRANGE_CHUNK
) -> Iterator[tuple[list[EmbeddingRecord], int]]:
    """(records, malformed entries skipped) per XRANGE chunk of one stream, from `start` on; a record
    the matcher would not score (entry_problem: times out of range, not a finite unit vector) counts as
    malformed."""
    while True:
        entries = client.xrange(key, min=start, count=chunk)
        if not entries:
            return
        records, bad = [], 0
        for entry_id, f in entries:
            try:
                r = decode_embedding(key, entry_id, f)
            except BadRecord:
                bad += 1
                continue
            if entry_problem(r) is None:
                records.append(r)
            else:
                bad += 1
        yield records, bad
        if len(entries) < chunk:
            return
        start = "(" + entries[-1][0].decode()


@dataclass
class Hit:
    """One stored window found by `search`, with its scores against the query."""

    score: float  # calibrated score (softmax share against the modality's background)
    cosine: float
    record: EmbeddingRecord


def search(
    client: redis.Redis,
    vectors: dict[str, np.ndarray],
    model: str,
    device: str = "*",
    since_ms: int | None = None,
    top: int = 20,
    chunk: int = XRANGE_CHUNK,
) -> tuple[list[Hit], int]:
    """The `top` stored windows most like the query, over the modalities of `vectors` (modality -> the
    query's unit vector for it) and the devices matching `device`. Ranked by calibrated score, so that
    modalities compare, then by cosine (the share saturates at 1). Returns (hits, records skipped:
    malformed or of another model)."""
    hits: list[Hit] = []
    skipped = 0
    start = since_id(client, since_ms)
    for modality, vector in vectors.items():
        background = load_background(client, model, modality)
        if background is None:
            raise QueryError(f"no background for {model}/{modality}: add a query of that modality first")
        index = ModalityIndex([Query("search", modality, vector, model)], background)
        for key in stream_keys(client, device, modality):
            for records, bad in read_chunks(client, key, start, chunk):
                usable = [r for r in records if r.model == model and r.emb.shape[0] == index.dim]
                skipped += bad + len(records) - len(usable)
                if not usable:
                    continue
                x = np.stack([r.emb for r in usable])
                scores, cosines = index.shares(x)[:, 0], x @ index.weights_t[:, 0]
                best = np.lexsort((cosines, scores))[::-1][:top]
                hits += [Hit(float(scores[i]), float(cosines[i]), usable[i]) for i in best]
                hits = sorted(hits, key=lambda h: (h.score, h.cosine), reverse=True)[:top]
    return hits, skipped
