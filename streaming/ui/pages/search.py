"""The Search page: the stored windows most like a text (GET /search?text=...) or an uploaded example clip or image
(POST /search), ranked as `bindstream search` ranks them (streaming/alerts/search.py), each with its time, device,
modality and score, and a link to the event that covers it, whose page has the evidence where it was kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis
from fastapi import APIRouter, HTTPException, Request
from starlette.datastructures import FormData

from streaming.alerts.events import list_events
from streaming.alerts.prompts import ensemble
from streaming.alerts.queries import ensure_background
from streaming.alerts.records import ALL_DEVICES, QueryError
from streaming.alerts.search import Hit, covers, parse_duration_ms, search
from streaming.records import QUERY_MODALITIES, STREAM_MODALITIES
from streaming.redis_layout import QUERY_EVENT, id_tuple, parse_key
from streaming.subscriber import stream_keys

from ..web import BadParam, ConsoleSettings, page, text_param
from .queries import Db, EncoderSlot, Fields, Settings, Slot, choice, example_vector, field, posted, uploaded

ALL = "all"  # every modality that has a stream

router = APIRouter()


@dataclass(frozen=True)
class Asked:
    """One search as its form gives it, checked."""

    modality: str
    device: str
    since: str
    since_ms: int | None
    top: int


def asked(values: Fields, settings: ConsoleSettings, modalities: tuple[str, ...]) -> Asked:
    """The search that the query string or form `values` asks for; a 400 naming the field that is wrong."""
    modality = choice(values, "modality", modalities, modalities[0])
    since, top = field(values, "since"), field(values, "top") or str(settings.search_top)
    try:
        since_ms = parse_duration_ms(since) if since else None
    except ValueError as err:
        raise BadParam("since", str(err)) from None
    if not top.isdigit() or not 1 <= int(top) <= settings.max_search_top:
        raise BadParam("top", f"{top!r} is not a whole number from 1 to {settings.max_search_top}")
    return Asked(modality, field(values, "device") or ALL_DEVICES, since, since_ms, int(top))


def rows(db: redis.Redis, hits: list[Hit], a: Asked, settings: ConsoleSettings) -> list[dict]:
    """The ranked hits as table rows, each with the event that covers its window (None where none does)."""
    events, _ = list_events(db, a.device, since_ms=a.since_ms, limit=settings.max_marked_events, kind=QUERY_EVENT)
    return [
        {
            "rank": rank,
            "hit": h,
            "r": h.record,
            "stored_ns": id_tuple(h.record.id)[0] * 1_000_000,
            "event": next((e for e in events if covers(e, h)), None),
        }
        for rank, h in enumerate(hits, 1)
    ]


def results(db: redis.Redis, slot: EncoderSlot, a: Asked, settings: ConsoleSettings, vectors_of) -> dict:
    """The page's context for the search `a`: `vectors_of(encoder, modalities)` gives the query vector of each
    asked modality that has a stream there (each modality's background is embedded first where missing)."""
    present = {parse_key(k)[1] for k in stream_keys(db, a.device)} & set(QUERY_MODALITIES)
    modalities = sorted(present) if a.modality == ALL else [m for m in (a.modality,) if m in present]
    if not modalities:
        return {"note": f"no {'' if a.modality == ALL else a.modality + ' '}embedding streams of devices {a.device!r}"}
    encoder = slot.get()
    try:
        for m in modalities:
            ensure_background(db, encoder, m)
        found = search(db, vectors_of(encoder, modalities), encoder.name, a.device, a.since_ms, a.top)
    except QueryError as err:
        raise HTTPException(400, str(err)) from None
    note = f"{found.skipped} stored windows skipped (malformed, or embedded by another model)" if found.skipped else ""
    return {"rows": rows(db, found.hits, a, settings), "note": note}


def render(request: Request, slot: EncoderSlot, **context):
    return page(
        request,
        "search.html",
        slot=slot,
        modalities=(ALL, *QUERY_MODALITIES),
        example_modalities=STREAM_MODALITIES,
        **context,
    )


@router.get("/search")
def text_search(request: Request, db: Db, slot: Slot, settings: Settings):
    text = text_param(request, "text")
    a = asked(request.query_params, settings, (ALL, *QUERY_MODALITIES))
    found = results(db, slot, a, settings, lambda e, ms: {m: ensemble(e, [text], m)[0] for m in ms}) if text else {}
    return render(request, slot, text=text or "", asked=a, searched=bool(text), **found)


def example_search(db: redis.Redis, slot: EncoderSlot, settings: ConsoleSettings, form: FormData) -> dict:
    """The search of the upload form: its file embedded as its modality, as an example query's is."""
    a = asked(form, settings, STREAM_MODALITIES)
    name, data = uploaded(form, settings)
    vector = example_vector(slot.get(), name, data, a.modality)  # before the search: a bad file is refused first
    return {"example": name, "asked": a, **results(db, slot, a, settings, lambda e, ms: {ms[0]: vector})}


@router.post("/search")
async def upload_search(request: Request, db: Db, slot: Slot, settings: Settings):
    found = await posted(request, settings, example_search, db, slot, settings)
    return render(request, slot, text="", searched=True, **found)
