"""The Device timeline page: each query watching a device, its calibrated score per window over a chosen while
(streaming/alerts/timeline.py, as `bindstream timeline` scores it), its threshold, and the device's events in that
while (their records), drawn with uPlot (static/timeline.js: drag to zoom, hover for values). The same data is
at /devices/{device}/timeline.json; /timeline lists the devices to choose from.
"""

from __future__ import annotations

from urllib.parse import quote

import numpy as np
import redis
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import RedirectResponse

from sensors.protocol import DEVICE_PATTERN, NS_PER_S
from streaming.alerts.events import list_events
from streaming.alerts.search import duration_text, parse_duration_ms
from streaming.alerts.timeline import downsample, timeline
from streaming.redis_layout import QUERY_EVENT, parse_key
from streaming.subscriber import stream_keys

from ..web import BadParam, ConsoleSettings, duration_param, page, text_param
from .queries import Db, Settings

DEFAULT_SINCE = "10m"  # the while a timeline shows unless ?since= says
PRESETS = ("5m", "10m", "30m", "1h", "6h", "1d", "7d")  # the whiles offered as links
DIGITS = 4  # decimals of the scores sent to the browser (a score is a share in [0, 1])

router = APIRouter()


def devices(db: redis.Redis) -> list[str]:
    """The devices with an embedding stream."""
    return sorted({parse_key(k)[0] for k in stream_keys(db)})


def known_device(db: redis.Redis, device: str) -> str:
    """`device`, when it is a device id with an embedding stream; a 404 otherwise."""
    if not DEVICE_PATTERN.fullmatch(device) or not stream_keys(db, device):
        raise HTTPException(404, f"no device {device!r}: it has no embedding streams (see the Devices page)")
    return device


def since_of(request: Request) -> tuple[str, int]:
    """(the while as text, in ms) of ?since= (DEFAULT_SINCE when absent); a 400 naming it when unreadable."""
    since_ms = duration_param(request, "since")
    if since_ms is None:
        since_ms = parse_duration_ms(DEFAULT_SINCE)
    if since_ms <= 0:
        raise BadParam("since", "the while must be longer than 0")
    return duration_text(since_ms), since_ms


def timeline_data(db: redis.Redis, device: str, since: str, since_ms: int, settings: ConsoleSettings) -> dict:
    """Each query's scores and thresholds, and the device's events, in seconds of device time from the first
    window or event shown (`origin_ns`)."""
    series = timeline(db, device, since_ms)
    events, _ = list_events(db, device, since_ms=since_ms, limit=settings.max_marked_events, kind=QUERY_EVENT)
    origin = min([int(s.t0.min()) for s in series if len(s.t0)] + [e.start_ns for e in events], default=0)
    queries = []
    for s in series:
        order = np.argsort(s.t0, kind="stable")  # uPlot wants x ascending; a device restart may repeat times
        t, y = downsample(s.t0[order], s.scores[order], settings.timeline_points)
        d = s.query.decision
        queries.append(
            {
                "id": s.query.id,
                "text": s.query.text,
                "modality": s.query.modality,
                "threshold": d.threshold,
                "rearm": d.threshold - d.hysteresis,
                "windows": len(s.scores),
                "peak": round(float(s.scores.max()), DIGITS) if len(s.scores) else None,
                "t": ((t - origin) / NS_PER_S).round(3).tolist(),
                "score": y.round(DIGITS).tolist(),
            }
        )
    return {
        "device": device,
        "since": since,
        "origin_ns": origin,
        "queries": queries,
        "events": [
            {
                "id": e.id,
                "query": e.query,
                "text": e.query_text,
                "start_s": round((e.start_ns - origin) / NS_PER_S, 3),
                "end_s": round((e.end_ns - origin) / NS_PER_S, 3),
                "peak": e.peak,
                "state": e.state,
                "review": e.review,
                "detected_ns": e.detected_ns,
            }
            for e in events
        ],
    }


@router.get("/timeline")
def choose(request: Request, db: Db):
    """The devices to draw a timeline of; ?device= goes to that device's timeline."""
    device = text_param(request, "device")
    if device is not None:
        return RedirectResponse(f"/devices/{quote(known_device(db, device), safe='')}/timeline", status_code=303)
    return page(request, "timeline_devices.html", devices=devices(db))


@router.get("/devices/{device}/timeline.json")
def timeline_json(request: Request, device: str, db: Db, settings: Settings) -> dict:
    return timeline_data(db, known_device(db, device), *since_of(request), settings)


@router.get("/devices/{device}/timeline")
def timeline_page(request: Request, device: str, db: Db, settings: Settings):
    data = timeline_data(db, known_device(db, device), *since_of(request), settings)
    return page(request, "timeline.html", data=data, presets=PRESETS)
