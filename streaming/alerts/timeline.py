"""Each query's score timeline over one device's stored windows, and its rendering as HTML (SVG) or PNG."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import numpy as np
import redis

from sensors.protocol import NS_PER_S

from ..redis_layout import ALERTS_STREAM, START, Alert, stream_key
from .queries import load_queries, read_backgrounds
from .records import Query
from .scoring import Baselines, build_indexes
from .search import XRANGE_CHUNK, read_chunks, since_id

SVG_WIDTH, SVG_HEIGHT, SVG_MARGIN = 900, 150, 40
MAX_POINTS = 2000  # per query; longer series keep each bucket's maximum (peaks stay visible)


@dataclass
class Series:
    """One query's calibrated score over one device's windows, and its alerts there."""

    query: Query
    t0: np.ndarray  # window starts, device clock, ns
    scores: np.ndarray
    alerts: list[Alert] = field(default_factory=list)


def timeline(client: redis.Redis, device: str, since_ms: int | None = None, chunk: int = XRANGE_CHUNK) -> list[Series]:
    """Every query watching `device`, scored over the device's stored windows of its modality."""
    queries = [q for q in load_queries(client) if fnmatchcase(device, q.device)]
    indexes = build_indexes(queries, read_backgrounds(client, {(q.model, q.modality) for q in queries})[0])
    start = since_id(client, since_ms)
    alerts = [  # the entries that start an event: an update or end is no new alert
        a
        for a in (Alert.from_entry(i, f) for i, f in client.xrange(ALERTS_STREAM, min=start))
        if a.device == device and a.state == START
    ]
    out = []
    for (model, modality), index in indexes.items():
        cols = index.columns(device)
        t0, scores = [], []
        baselines = Baselines(1)  # example queries: the stream's estimate as a matcher starting at `since` forms it
        for records, _ in read_chunks(client, stream_key(device, modality), start, chunk):
            usable = [r for r in records if r.model == model and r.emb.shape[0] == index.dim]
            if usable:
                t0 += [r.t0 for r in usable]
                scores.append(index.scores(usable, baselines)[:, cols])
        matrix = np.concatenate(scores) if scores else np.zeros((0, len(cols)))
        for j, c in enumerate(cols):
            q = index.queries[c]
            out.append(Series(q, np.array(t0, dtype=np.int64), matrix[:, j], [a for a in alerts if a.query == q.id]))
    return out


def downsample(t: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most `max_points` of a series: a longer one keeps the maximum of each bucket, so peaks stay visible."""
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
    t, v = downsample(s.t0, s.scores, MAX_POINTS)
    points = " ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in zip(t, v))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
        f'<rect x="{m}" y="{m / 2}" width="{w - 2 * m}" height="{h - m}" fill="#fafafa" stroke="#ccc"/>',
        f'<line x1="{m}" x2="{w - m}" y1="{y(d.threshold):.1f}" y2="{y(d.threshold):.1f}" stroke="#d62728" '
        f'stroke-dasharray="6,4"><title>threshold {d.threshold:.3f}</title></line>',
        f'<line x1="{m}" x2="{w - m}" y1="{y(d.threshold - d.hysteresis):.1f}" '
        f'y2="{y(d.threshold - d.hysteresis):.1f}" stroke="#ff9896" stroke-dasharray="2,4">'
        f"<title>re-arm below {d.threshold - d.hysteresis:.3f}</title></line>",
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{points}"/>',
        f'<text x="{m}" y="{m / 2 - 6}">{html.escape(s.query.text)} — {s.query.modality}, query {s.query.id}, '
        f"{len(s.alerts)} alert(s)</text>",
        f'<text x="{m - 4}" y="{y(1) + 4:.1f}" text-anchor="end">1</text>',
        f'<text x="{m - 4}" y="{y(0) + 4:.1f}" text-anchor="end">0</text>',
        f'<text x="{m}" y="{h - 4}">0 s</text>',
        f'<text x="{w - m}" y="{h - 4}" text-anchor="end">{span_s:.0f} s (device time)</text>',
    ]
    for a in s.alerts:
        parts.append(
            f'<circle cx="{x(a.t0):.1f}" cy="{y(a.score):.1f}" r="5" fill="#d62728">'
            f"<title>alert {a.id}: score {a.score:.3f}</title></circle>"
        )
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
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{title}</title></head>\n'
        f'<body style="font-family: sans-serif"><h2>{title}</h2>\n<p>Calibrated score per window (blue), '
        f"threshold (red dashes), re-arm level (pink dots), alerts (red dots).</p>\n{body}\n</body></html>\n"
    )


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
