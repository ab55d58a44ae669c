"""The Events pages: /events (a live feed of event changes over the history table, filtered by device, query,
time and kind), /events/{id} (one event: its record, its audio in an <audio> element, its frames, its IMU rows,
and the Ack / False positive buttons), the evidence it serves (/events/{id}/audio.wav, /events/{id}/frames/F),
and /live, the server-sent events every live page listens to.

Events, reviews and evidence are read and written through streaming/alerts/events.py and redis_layout.py only.
The live stream relays the alerts channel (ALERTS.md): each entry once, decoded as an Alert and sent as JSON
with its stream id, so that a browser that reconnects (Last-Event-ID) first gets what it missed, from the
alerts stream. A message that does not decode is dropped and counted (`app.state.live_dropped`).
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import asdict, dataclass
from typing import Annotated
from urllib.parse import urlencode

import anyio
import cv2
import numpy as np
import redis
from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse

from streaming.alerts.events import HEX, NoEvent, find_event_id, list_events, load_event, set_review
from streaming.alerts.queries import load_queries
from streaming.alerts.records import ID_BYTES
from streaming.alerts.sinks import sink_label
from streaming.records import FRAME_SENSORS, text
from streaming.redis_access import connect_async
from streaming.redis_layout import (
    ALERTS_CHANNEL,
    ALERTS_STREAM,
    AUDIO_CHANNELS,
    AUDIO_PCM,
    AUDIO_RATE,
    AUDIO_T0,
    EVENT_ID_CHARS,
    HEALTH_EVENT,
    HEALTH_QUERY,
    IMU_CSV,
    MISSING,
    PARSE_ERRORS,
    QUERY_EVENT,
    REVIEWS,
    Alert,
    BadRecord,
    Event,
    evidence_audio_s,
    evidence_key,
    evidence_wav,
    id_tuple,
    parse_frame_field,
)

from ..web import (
    BadParam,
    ConsoleSettings,
    RedisClient,
    choice_param,
    duration_param,
    int_param,
    page,
    problem,
    settings_of,
    text_param,
)

router = APIRouter()
log = logging.getLogger(__name__)
IMAGE_TYPES = {"jpg": "image/jpeg", "png": "image/png"}  # frames served as the device sent them
NPY = "npy"  # raw depth and thermal frames: rendered to PNG, false-coloured per sensor
COLORMAPS = {"depth": cv2.COLORMAP_VIRIDIS, "thermal": cv2.COLORMAP_INFERNO}


@dataclass
class Filters:
    """The history's filters, from the query string; BadParam (a 400 page) for one that is malformed."""

    device: str | None  # an id or glob
    query: str | None  # a query id, or "health"
    since: str | None  # as typed: 30s, 10m, 2h, 1d
    since_ms: int | None
    kind: str | None
    limit: int

    @classmethod
    def of(cls, request: Request) -> Filters:
        settings = settings_of(request)
        query = text_param(request, "query")
        if query is not None and query != HEALTH_QUERY and (len(query) != 2 * ID_BYTES or not set(query) <= HEX):
            raise BadParam("query", f"{query!r} is neither a query id ({2 * ID_BYTES} hex characters) nor health")
        return cls(
            device=text_param(request, "device"),
            query=query,
            since=text_param(request, "since"),
            since_ms=duration_param(request, "since"),
            kind=choice_param(request, "kind", (QUERY_EVENT, HEALTH_EVENT)),
            limit=int_param(request, "limit", settings.events_limit, 1, settings.max_events_limit),
        )

    def query_string(self) -> str:
        given = {"device": self.device, "query": self.query, "since": self.since, "kind": self.kind}
        return urlencode({k: v for k, v in given.items() if v is not None} | {"limit": self.limit})


def history(redis_client: redis.Redis, f: Filters) -> dict:
    """The template context of the history table: the events, which have evidence, how many did not decode."""
    events, skipped = list_events(redis_client, f.device, f.query, f.since_ms, f.limit, f.kind)
    pipe = redis_client.pipeline(transaction=False)
    for e in events:
        pipe.exists(evidence_key(e.id))
    return {"events": events, "evidence": dict(zip((e.id for e in events), pipe.execute())), "skipped": skipped}


@router.get("/events")
def events_page(request: Request, redis_client: RedisClient):
    f = Filters.of(request)
    queries = sorted(((q.text, q.id) for q in load_queries(redis_client)), key=lambda pair: pair[0].lower())
    return page(
        request,
        "events.html",
        filters=f,
        queries=queries,
        settings=settings_of(request),
        **history(redis_client, f),
    )


@router.get("/events/table")
def events_table(request: Request, redis_client: RedisClient):
    """The history table alone, for the page's refresh."""
    return page(request, "events_table.html", **history(redis_client, Filters.of(request)))


# ----- one event ------------------------------------------------------------------------------------------------


def event_of(redis_client: redis.Redis, ref: str) -> Event:
    """The event `ref` (an id, or the start of exactly one) names; 404 when it names none."""
    if len(ref) > EVENT_ID_CHARS:
        raise HTTPException(404, f"no event {ref[:EVENT_ID_CHARS]}...: event ids are {EVENT_ID_CHARS} hex characters")
    try:
        return load_event(redis_client, find_event_id(redis_client, ref))
    except NoEvent as err:
        raise HTTPException(404, str(err)) from None
    except BadRecord as err:
        raise HTTPException(404, f"event {ref} does not decode: {err}") from None


@dataclass
class Frame:
    sensor: str
    t_ns: int
    field: str  # its field in the evidence hash, and its name in /events/{id}/frames/{field}


@dataclass
class Evidence:
    """What an event's page shows of its evidence hash: names and sizes, never the media (served one by one)."""

    audio_s: float | None  # None: no audio stored, or it does not decode (audio_problem says why)
    audio_problem: str  # why stored audio cannot be played ('' when it can)
    audio_rate: int
    audio_channels: int
    audio_t0_ns: int
    frames: dict[str, list[Frame]]  # per sensor, by time: the ones shown
    frames_total: dict[str, int]  # per sensor, every frame stored
    imu_rows: int
    missing: list[str]


def spread(items: list, count: int) -> list:
    """At most `count` of `items`, evenly spread from the first to the last."""
    if len(items) <= count:
        return items
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)] if count > 1 else items[:1]


def read_evidence(redis_client: redis.Redis, event_id: str, settings: ConsoleSettings) -> Evidence | None:
    key = evidence_key(event_id)
    names = [text(n) for n in redis_client.hkeys(key)]
    if not names:
        return None
    rate, channels, t0, imu, missing = redis_client.hmget(key, [AUDIO_RATE, AUDIO_CHANNELS, AUDIO_T0, IMU_CSV, MISSING])
    audio_s, why = None, ""
    if AUDIO_PCM in names:  # its length only: the samples stay in Redis until the <audio> element asks
        try:
            audio_s = evidence_audio_s(redis_client.hstrlen(key, AUDIO_PCM), int(rate), int(channels))
        except PARSE_ERRORS as err:
            why = str(err)
    frames: dict[str, list[Frame]] = {}
    for name in names:
        parsed = parse_frame_field(name)
        if parsed and parsed[0] in FRAME_SENSORS and (parsed[2] in IMAGE_TYPES or parsed[2] == NPY):
            frames.setdefault(parsed[0], []).append(Frame(parsed[0], parsed[1], name))
    for found in frames.values():
        found.sort(key=lambda fr: fr.t_ns)
    return Evidence(
        audio_s=audio_s,
        audio_problem=why,
        audio_rate=int(rate) if audio_s is not None else 0,
        audio_channels=int(channels) if audio_s is not None else 0,
        audio_t0_ns=int(t0) if audio_s is not None and text(t0 or b"").isdigit() else 0,
        frames={sensor: spread(found, settings.frames_shown) for sensor, found in sorted(frames.items())},
        frames_total={sensor: len(found) for sensor, found in frames.items()},
        imu_rows=max(len((imu or b"").splitlines()) - 1, 0),  # the first line is the header
        missing=[kind for kind in text(missing or b"").split(",") if kind],
    )


@router.get("/events/{event_ref}")
def event_page(event_ref: str, request: Request, redis_client: RedisClient):
    e = event_of(redis_client, event_ref)
    if e.id != event_ref:  # the start of an id: the shareable address is the whole id's
        return RedirectResponse(f"/events/{e.id}", status_code=307)
    return page(
        request,
        "event.html",
        e=e,
        evidence=read_evidence(redis_client, e.id, settings_of(request)),
        sinks=[sink_label(url) for url in e.notify],
        reviews=REVIEWS,
    )


@router.get("/events/{event_ref}/audio.wav")
def event_audio(event_ref: str, redis_client: RedisClient):
    e = event_of(redis_client, event_ref)
    pcm, rate, channels = redis_client.hmget(evidence_key(e.id), [AUDIO_PCM, AUDIO_RATE, AUDIO_CHANNELS])
    if pcm is None:
        raise HTTPException(404, f"no audio stored for event {e.id} (none written, or expired)")
    try:
        wav, _ = evidence_wav(pcm, int(rate), int(channels))
    except PARSE_ERRORS as err:
        raise HTTPException(404, f"the audio of event {e.id} does not decode: {err}") from None
    return Response(wav, media_type="audio/wav", headers={"Content-Disposition": f'inline; filename="{e.id}.wav"'})


def render_npy(raw: bytes, sensor: str) -> bytes:
    """A raw depth or thermal frame (.npy) as a PNG: scaled from its lowest to its highest value, false-coloured;
    ValueError for what is no 2-D array of numbers."""
    array = np.load(io.BytesIO(raw), allow_pickle=False)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim != 2 or array.size == 0 or array.dtype.kind not in "uif":
        raise ValueError(f"a {array.dtype} array of shape {array.shape} is no frame")
    values = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = values.min(), values.max()
    scaled = ((values - low) * (255 / (high - low) if high > low else 0.0)).astype(np.uint8)
    ok, png = cv2.imencode(".png", cv2.applyColorMap(scaled, COLORMAPS.get(sensor, cv2.COLORMAP_BONE)))
    if not ok:
        raise ValueError("OpenCV could not encode it")
    return png.tobytes()


@router.get("/events/{event_ref}/frames/{field}")
def event_frame(event_ref: str, field: str, redis_client: RedisClient):
    e = event_of(redis_client, event_ref)
    parsed = parse_frame_field(field)
    if parsed is None or parsed[0] not in FRAME_SENSORS or not (parsed[2] in IMAGE_TYPES or parsed[2] == NPY):
        raise HTTPException(404, f"{field!r} is not a frame of event {e.id}")
    raw = redis_client.hget(evidence_key(e.id), field)
    if raw is None:
        raise HTTPException(404, f"event {e.id} has no frame {field} (not kept, or expired)")
    if parsed[2] in IMAGE_TYPES:
        return Response(raw, media_type=IMAGE_TYPES[parsed[2]])
    try:
        return Response(render_npy(raw, parsed[0]), media_type="image/png")
    except (ValueError, OSError) as err:
        raise HTTPException(404, f"frame {field} of event {e.id} does not decode: {err}") from None


@router.post("/events/{event_ref}/review")
def event_review(event_ref: str, review: Annotated[str, Form()], redis_client: RedisClient):
    """A person's verdict (Ack: confirmed; False positive; none: taken back), then back to the event's page."""
    e = event_of(redis_client, event_ref)
    if review not in REVIEWS:
        raise BadParam("review", f"{review!r} is not one of {', '.join(REVIEWS)}")
    try:
        set_review(redis_client, e.id, review)
    except NoEvent as err:  # expired since it was read
        raise HTTPException(404, str(err)) from None
    return RedirectResponse(f"/events/{e.id}", status_code=303)


# ----- the live stream ------------------------------------------------------------------------------------------


def alert_json(alert: Alert) -> str:
    return json.dumps(asdict(alert), separators=(",", ":"))


@router.get("/live")
async def live(request: Request):
    """Server-sent events: `alert` (an Alert as JSON) for each entry of the alerts channel, from the moment the
    stream opens (or, after a reconnect, from the Last-Event-ID on), and a comment every keepalive_s."""
    state, settings = request.app.state, settings_of(request)
    if state.live >= settings.max_live:
        return problem(request, 503, f"{settings.max_live} live streams are open already; try again later")
    resume = request.headers.get("last-event-id", "")
    try:
        id_tuple(resume)
    except ValueError:
        resume = ""
    return StreamingResponse(
        relay(state, settings, resume),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def relay(state, settings: ConsoleSettings, resume: str):
    try:
        source = await connect_async(state.redis_url)  # a Redis Cluster answers here: its nodes are asked for
    except (redis.RedisError, OSError) as err:
        log.warning("console: the live stream cannot reach Redis: %s", err)
        return
    state.live += 1
    channel = source.pubsub(ignore_subscribe_messages=True)
    try:
        await channel.subscribe(ALERTS_CHANNEL)  # before the catch-up: nothing falls between the two
        yield f"retry: {int(settings.refresh_s * 1000)}\n\n"
        sent = resume
        if resume:
            for entry_id, fields in await source.xrange(ALERTS_STREAM, min=f"({resume}", count=settings.live_feed):
                if (line := decoded(state, text(entry_id), fields)) is not None:
                    sent = text(entry_id)
                    yield line
        while True:
            message = await channel.get_message(timeout=settings.keepalive_s)
            if message is None:
                yield ": keepalive\n\n"
                continue
            try:
                fields = json.loads(message["data"])
                entry_id = str(fields["id"])
            except (ValueError, TypeError, KeyError):
                fields, entry_id = None, ""
            if sent and entry_id and entry_order(entry_id) <= entry_order(sent):
                continue  # already sent by the catch-up
            if (line := decoded(state, entry_id, fields)) is not None:
                yield line
    except (redis.RedisError, OSError) as err:
        log.warning("console: the live stream lost Redis: %s", err)
    finally:
        state.live -= 1
        with anyio.CancelScope(shield=True):  # a browser that left cancelled the stream: close its connections anyway
            await channel.aclose()
            await source.aclose()


def entry_order(entry_id: str) -> tuple[int, int]:
    """A stream id's order; an id that is none comes first."""
    try:
        return id_tuple(entry_id)
    except ValueError:
        return (-1, -1)


def decoded(state, entry_id: str, fields: dict | None) -> str | None:
    """One `alert` server-sent event, or None (dropped and counted) for what does not decode as an alert."""
    try:
        if not isinstance(fields, dict):
            raise TypeError("not an object")
        alert = Alert.from_entry(entry_id, {k: v for k, v in fields.items() if k != "id"})
        line = f"id: {entry_id}\nevent: alert\ndata: {alert_json(alert)}\n\n"
    except (*PARSE_ERRORS, AttributeError) as err:
        state.live_dropped += 1
        if state.live_dropped == 1:
            log.warning("console: dropped an alerts message that does not decode (%s); later ones are counted", err)
        return None
    return line
