"""Looking back over the stored embedding streams: the windows most like a query, and the events that cover them.

Where an indexer keeps a search index of a (model, modality) (streaming/index/) and its snapshot is on this
machine, the index picks candidates by cosine and the windows stored since its snapshot are read by brute force;
elsewhere every window is (`search` says which, and why). Brute force reads the streams with XRANGE in chunks
from a stream id at `now - since` (stream ids are the server's ms clock at XADD) and decodes the float32 vectors.
Either way the windows are ranked by the calibrated score of scoring.py, as the matcher scores them (the
timeline reads the same way). ALERTS.md "Search" gives the measured costs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import redis

from ..index.shard import Shard, SnapshotError
from ..redis_layout import (
    QUERY_EVENT,
    BadRecord,
    EmbeddingRecord,
    Event,
    IndexInfo,
    decode_embedding,
    evidence_key,
    id_tuple,
    search_index_key,
)
from ..subscriber import stream_keys
from .events import list_events
from .queries import load_background
from .records import Query, QueryError
from .scoring import ModalityIndex, entry_problem

XRANGE_CHUNK = 10_000  # entries per XRANGE call (bounds the memory of one read)
CANDIDATES_PER_HIT = 4  # index candidates per hit asked for: ranking by calibrated score reorders the cosine's
MIN_CANDIDATES = 100  # index candidates asked for at least
MAX_MARKED_EVENTS = 1_000  # newest events looked at for the ones covering the hits
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
    """One stored window found by `search`, with its scores against the query, and the event covering it."""

    score: float  # calibrated score (softmax share against the modality's background)
    cosine: float
    record: EmbeddingRecord  # found through the index: its vector as the index stores it
    event: str = ""  # id of the query event whose windows cover this one ("": none found), see `mark_events`
    evidence: bool = False  # whether that event kept evidence (`bindstream event show ID --save DIR` plays it)


@dataclass
class Searched:
    """What `search` found, and how."""

    hits: list[Hit]
    skipped: int = 0  # windows read by brute force and skipped: malformed, or of another model
    indexed: list[str] = field(default_factory=list)  # the modalities searched through their index
    notes: list[str] = field(default_factory=list)  # why the others were searched by brute force, one line each


def open_index(client: redis.Redis, model: str, modality: str) -> tuple[Shard | None, str]:
    """(the newest snapshot of the (model, modality) search index, read-only, or None, and then why not: no
    indexer has written one, or it lies on another machine, or it does not load)."""
    try:
        info = IndexInfo.decode(client.hgetall(search_index_key(model, modality)))
        if info is None or not info.dir:
            return None, "no search index (`bindstream index` or `run --index-dir DIR` keeps one)"
        shard = Shard.open(Path(info.dir))
    except (BadRecord, SnapshotError) as err:
        return None, str(err)
    if shard is None:
        return None, f"its search index lies in {info.host}:{info.dir}, not on this machine"
    return shard, ""


def ranked(index: ModalityIndex, records: list[EmbeddingRecord], top: int) -> list[Hit]:
    """The `top` of `records` by calibrated score, then by cosine (the share saturates at 1)."""
    if not records:
        return []
    x = np.stack([r.emb for r in records])
    scores, cosines = index.shares(x)[:, 0], x @ index.weights_t[:, 0]
    best = np.lexsort((cosines, scores))[::-1][:top]
    return [Hit(float(scores[i]), float(cosines[i]), records[i]) for i in best]


def search(
    client: redis.Redis,
    vectors: dict[str, np.ndarray],
    model: str,
    device: str = "*",
    since_ms: int | None = None,
    top: int = 20,
    chunk: int = XRANGE_CHUNK,
    use_index: bool = True,
) -> Searched:
    """The `top` stored windows most like the query, over the modalities of `vectors` (modality -> the
    query's unit vector for it) and the devices matching `device`, ranked by calibrated score so that
    modalities compare, then by cosine. Through each modality's search index where there is one (`use_index`),
    plus the windows stored since its snapshot; by brute force elsewhere."""
    out = Searched([])
    start = since_id(client, since_ms)
    for modality, vector in vectors.items():
        background = load_background(client, model, modality)
        if background is None:
            raise QueryError(f"no background for {model}/{modality}: add a query of that modality first")
        index = ModalityIndex([Query("search", modality, vector, model)], background)
        shard, why = open_index(client, model, modality) if use_index else (None, "")
        if shard is not None and shard.dim != index.dim:
            why = f"its search index has dimension {shard.dim}, the query {index.dim}"
            shard = None
        if shard is not None:
            wanted = max(top * CANDIDATES_PER_HIT, MIN_CANDIDATES)
            found = shard.search(index.weights_t[:, 0], wanted, device, None if start == "-" else id_tuple(start)[0])
            out.hits = best_hits(out.hits + ranked(index, shard.records(found), top), top)
            out.indexed.append(modality)
        elif why:
            out.notes.append(f"{modality}: {why}")
        for key in stream_keys(client, device, modality):
            after = shard.positions.get(key) if shard else None
            if after is not None and (start == "-" or id_tuple(after) >= id_tuple(start)):
                begin = "(" + after  # the snapshot holds the stream up to `after`
            else:
                begin = start
            for records, bad in read_chunks(client, key, begin, chunk):
                usable = [r for r in records if r.model == model and r.emb.shape[0] == index.dim]
                out.skipped += bad + len(records) - len(usable)
                out.hits = best_hits(out.hits + ranked(index, usable, top), top)
    return out


def best_hits(hits: list[Hit], top: int) -> list[Hit]:
    return sorted(hits, key=lambda h: (h.score, h.cosine), reverse=True)[:top]


def covers(event: Event, hit: Hit) -> bool:
    """Whether `event` was raised on the hit's stream over the hit's window (device time; an open event's end is
    its last window's)."""
    r = hit.record
    return event.source == r.stream and event.start_ns <= r.t0 < event.end_ns


def mark_events(
    client: redis.Redis, hits: list[Hit], device: str = "*", since_ms: int | None = None, limit: int = MAX_MARKED_EVENTS
) -> None:
    """Set each hit's `event` to the query event covering its window, among the newest `limit` of the devices
    matching `device` started in the last `since_ms`, and `evidence` to whether that event kept evidence."""
    events, _ = list_events(client, device, since_ms=since_ms, limit=limit, kind=QUERY_EVENT)
    for h in hits:
        h.event = next((e.id for e in events if covers(e, h)), "")
    marked = [h for h in hits if h.event]
    pipe = client.pipeline(transaction=False)
    for h in marked:
        pipe.exists(evidence_key(h.event))
    for h, exists in zip(marked, pipe.execute()):
        h.evidence = bool(exists)
