"""Looking back over the stored embedding streams: brute-force text search, and each query's score timeline.

Both read the streams with XRANGE in chunks from a stream id at `now - since` (stream ids are the server's
ms clock at XADD), decode the float32 vectors and score them with numpy. ALERTS.md gives the measured
cost per million windows and when to move to a vector index.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import numpy as np
import redis

from sensors.protocol import NS_PER_S

from .alerts.records import Query, QueryError
from .matcher import ModalityIndex, build_indexes, entry_problem
from .queries import load_background, load_queries, read_backgrounds
from .redis_layout import ALERTS_STREAM, Alert, BadRecord, EmbeddingRecord, decode_embedding, stream_key
from .subscriber import stream_keys

XRANGE_CHUNK = 10_000  # entries per XRANGE call (bounds the memory of one read)
DURATION_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}

# the HTML timeline
SVG_WIDTH, SVG_HEIGHT, SVG_MARGIN = 900, 150, 40
MAX_POINTS = 2000  # per query; longer series keep each bucket's maximum (peaks stay visible)


def parse_duration_ms(text: str) -> int:
    """'90s', '10m', '2h', '1d', '500ms' -> milliseconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*", text)
    if not match:
        raise ValueError(f"cannot read the duration {text!r}; write e.g. 30s, 10m, 2h or 1d")
    return int(float(match[1]) * DURATION_UNITS_MS[match[2]])


def since_id(client: redis.Redis, since_ms: int | None) -> str:
    """The smallest stream id at most `since_ms` old by the server's clock ('-': everything)."""
    if since_ms is None:
        return "-"
    seconds, micros = client.time()
    return f"{max(seconds * 1000 + micros // 1000 - since_ms, 0)}-0"


def read_chunks(client: redis.Redis, key: str, start: str = "-",
                chunk: int = XRANGE_CHUNK) -> Iterator[tuple[list[EmbeddingRecord], int]]:
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
    score: float  # calibrated score (softmax share against the modality's background)
    cosine: float
    record: EmbeddingRecord


def search(client: redis.Redis, vectors: dict[str, np.ndarray], model: str, device: str = "*",
           since_ms: int | None = None, top: int = 20, chunk: int = XRANGE_CHUNK) -> tuple[list[Hit], int]:
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


# ----- timeline ----------------------------------------------------------------------------------------


@dataclass
class Series:
    """One query's calibrated score over one device's windows, and its alerts there."""

    query: Query
    t0: np.ndarray  # window starts, device clock, ns
    scores: np.ndarray
    alerts: list[Alert] = field(default_factory=list)


def timeline(client: redis.Redis, device: str, since_ms: int | None = None,
             chunk: int = XRANGE_CHUNK) -> list[Series]:
    """Every query watching `device`, scored over the device's stored windows of its modality."""
    queries = [q for q in load_queries(client) if fnmatchcase(device, q.device)]
    indexes = build_indexes(queries, read_backgrounds(client, {(q.model, q.modality) for q in queries})[0])
    start = since_id(client, since_ms)
    alerts = [a for a in (Alert.from_entry(i, f) for i, f in client.xrange(ALERTS_STREAM, min=start))
              if a.device == device]
    out = []
    for (model, modality), index in indexes.items():
        cols = index.columns(device)
        t0, scores = [], []
        for records, _ in read_chunks(client, stream_key(device, modality), start, chunk):
            usable = [r for r in records if r.model == model and r.emb.shape[0] == index.dim]
            if usable:
                t0 += [r.t0 for r in usable]
                scores.append(index.shares(np.stack([r.emb for r in usable]))[:, cols])
        matrix = np.concatenate(scores) if scores else np.zeros((0, len(cols)))
        for j, c in enumerate(cols):
            q = index.queries[c]
            out.append(Series(q, np.array(t0, dtype=np.int64), matrix[:, j], [a for a in alerts if a.query == q.id]))
    return out


def _downsample(t: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    if len(y) <= max_points:
        return t, y
    buckets = np.array_split(np.arange(len(y)), max_points)
    return np.array([t[b[0]] for b in buckets]), np.array([y[b].max() for b in buckets])


def _svg(s: Series, t_min: int, span_s: float) -> str:
    w, h, m = SVG_WIDTH, SVG_HEIGHT, SVG_MARGIN

    def x(t_ns) -> float:
        return m + (w - 2 * m) * ((t_ns - t_min) / NS_PER_S) / span_s

    def y(score) -> float:
        return h - m / 2 - (h - m) * score

    d = s.query.decision
    t, v = _downsample(s.t0, s.scores, MAX_POINTS)
    points = " ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in zip(t, v))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
        f'<rect x="{m}" y="{m / 2}" width="{w - 2 * m}" height="{h - m}" fill="#fafafa" stroke="#ccc"/>',
        f'<line x1="{m}" x2="{w - m}" y1="{y(d.threshold):.1f}" y2="{y(d.threshold):.1f}" stroke="#d62728" '
        f'stroke-dasharray="6,4"><title>threshold {d.threshold:.3f}</title></line>',
        f'<line x1="{m}" x2="{w - m}" y1="{y(d.threshold - d.hysteresis):.1f}" '
        f'y2="{y(d.threshold - d.hysteresis):.1f}" stroke="#ff9896" stroke-dasharray="2,4">'
        f'<title>re-arm below {d.threshold - d.hysteresis:.3f}</title></line>',
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{points}"/>',
        f'<text x="{m}" y="{m / 2 - 6}">{html.escape(s.query.text)} — {s.query.modality}, query {s.query.id}, '
        f'{len(s.alerts)} alert(s)</text>',
        f'<text x="{m - 4}" y="{y(1) + 4:.1f}" text-anchor="end">1</text>',
        f'<text x="{m - 4}" y="{y(0) + 4:.1f}" text-anchor="end">0</text>',
        f'<text x="{m}" y="{h - 4}">0 s</text>',
        f'<text x="{w - m}" y="{h - 4}" text-anchor="end">{span_s:.0f} s (device time)</text>',
    ]
    for a in s.alerts:
        parts.append(f'<circle cx="{x(a.t0):.1f}" cy="{y(a.score):.1f}" r="5" fill="#d62728">'
                     f'<title>alert {a.id}: score {a.score:.3f}</title></circle>')
    parts.append("</svg>")
    return "\n".join(parts)


def _time_span(series: list[Series]) -> tuple[int, float]:
    starts = [int(s.t0.min()) for s in series if len(s.t0)] or [0]
    ends = [int(s.t0.max()) for s in series if len(s.t0)] or [1]
    t_min = min(starts)
    return t_min, max((max(ends) - t_min) / NS_PER_S, 1.0)


def timeline_html(series: list[Series], device: str) -> str:
    t_min, span_s = _time_span(series)
    body = "\n".join(f"<div>{_svg(s, t_min, span_s)}</div>" for s in series)
    title = f"bindstream timeline: {html.escape(device)}"
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title></head>\n"
            f"<body style=\"font-family: sans-serif\"><h2>{title}</h2>\n<p>Calibrated score per window (blue), "
            f"threshold (red dashes), re-arm level (pink dots), alerts (red dots).</p>\n{body}\n</body></html>\n")


def timeline_png(series: list[Series], device: str, path: str) -> None:
    """The same plot with matplotlib (ImportError when it is not installed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t_min, _ = _time_span(series)
    fig, axes = plt.subplots(len(series), 1, figsize=(10, 2 * len(series)), squeeze=False, sharex=True)
    for ax, s in zip(axes[:, 0], series):
        d = s.query.decision
        ax.plot((s.t0 - t_min) / NS_PER_S, s.scores, color="#1f77b4")
        ax.axhline(d.threshold, color="#d62728", linestyle="--")
        ax.axhline(d.threshold - d.hysteresis, color="#ff9896", linestyle=":")
        ax.scatter([(a.t0 - t_min) / NS_PER_S for a in s.alerts], [a.score for a in s.alerts], color="#d62728")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{s.query.text} — {s.query.modality}, query {s.query.id}", fontsize=9)
    axes[-1, 0].set_xlabel(f"device time (s) on {device}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
