"""The Queries page: the standing queries; adding one by text, an uploaded example clip or an uploaded .npy vector;
editing its decision settings and sinks; removing it; tuning its threshold from its reviewed events.

Every step is the library's, as `bindstream alert add / rm / tune --from-reviews` takes it (streaming/alerts:
records.py checks, prompts.py embeds, queries.py stores and tells the matchers, tuning.py fits), so a query added
here is the one the command would add. A request the page cannot carry out raises HTTPException, which the app
shows as one line on a 4xx page. Posted forms are bounded before they are read (`read_form`). The encoder is
loaded once per app, at its first use (`EncoderSlot`); the `tiny` model has RANDOM weights, which the pages say.
"""

from __future__ import annotations

import io
import re
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Annotated, TypeVar

import numpy as np
import redis
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import RedirectResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

import encoders
from encoders.api import has_random_weights
from encoders.weights import default_model_name
from streaming.alerts.prompts import check_modality, ensemble
from streaming.alerts.queries import (
    delete_query,
    ensure_background,
    load_background,
    load_query,
    read_queries,
    save_query,
    set_decision,
    update_query,
)
from streaming.alerts.records import ALL_DEVICES, Decision, Query, QueryError, unit
from streaming.alerts.sinks import SinkError, parse_sink, sink_label
from streaming.alerts.tuning import MIN_PER_LABEL, fit, reviewed_scores
from streaming.records import QUERY_MODALITIES
from streaming.redis_layout import QUERY_SET, sink_id

from ..web import BadParam, ConsoleSettings, client, page, settings_of

T = TypeVar("T")
MIB = 1024 * 1024
SOURCES = ("text", "example", "vector")  # what a new query's vector is made from
DEFAULT_MODALITY = "audio"  # preselected in the add form
SUFFIX = re.compile(r"\.[a-z0-9]{1,8}")  # an uploaded file's extension, which tells load_file its format
MAX_NAME = 100  # characters of an uploaded file's name kept in a query's `source`
DECISION_FIELDS = {"threshold": float, "k": int, "n": int, "cooldown_s": float, "hysteresis": float}

router = APIRouter()


class EncoderSlot:
    """The encoder the pages embed texts and examples with: the model named when the app was made (as `--model`
    and `--checkpoint` name it), loaded once, at its first use."""

    def __init__(self, model: str | None = None, checkpoint: str | None = None):
        self.name = default_model_name(model, checkpoint)
        self.checkpoint = checkpoint
        self.random_weights = has_random_weights(self.name, checkpoint)
        self._encoder = None
        self._lock = threading.Lock()  # two first requests at once load it once

    def get(self):
        """The loaded encoder; a 503 page of one line when it cannot be loaded (a missing checkpoint, no device)."""
        with self._lock:
            if self._encoder is None:
                try:
                    self._encoder = encoders.load(self.name, checkpoint=self.checkpoint)
                except (FileNotFoundError, ValueError, RuntimeError) as err:
                    raise HTTPException(503, f"cannot load model {self.name}: {err}") from None
            return self._encoder


def encoder_slot(request: Request) -> EncoderSlot:
    """The app's encoder slot (a FastAPI dependency)."""
    return request.app.state.encoder


Db = Annotated[redis.Redis, Depends(client)]
Slot = Annotated[EncoderSlot, Depends(encoder_slot)]
Settings = Annotated[ConsoleSettings, Depends(settings_of)]
Fields = Mapping[str, str | UploadFile]  # a posted form, or a query string


# ----- reading a posted form -----------------------------------------------------------------------------


def size(n: int) -> str:
    return f"{n / MIB:.1f} MiB" if n >= MIB / 10 else f"{n:,} bytes"


async def read_form(request: Request, settings: ConsoleSettings) -> FormData:
    """The posted form, refused before its body is read when its declared length exceeds the bounds (the server
    holds a body to its Content-Length)."""
    length = request.headers.get("content-length", "")
    if not length.isdigit():
        raise HTTPException(411, "a form must be posted with a Content-Length")
    if int(length) > settings.max_upload_bytes + settings.max_form_bytes:
        raise HTTPException(
            413, f"the upload is {size(int(length))}; a file may have {size(settings.max_upload_bytes)}"
        )
    try:
        return await request.form(max_files=1, max_fields=settings.max_form_fields)
    except StarletteHTTPException as err:  # what Starlette makes of a malformed body
        raise HTTPException(400, f"the form does not parse: {err.detail}") from None


async def posted(request: Request, settings: ConsoleSettings, work: Callable[..., T], *args) -> T:
    """`work(*args, form)` on the posted form, in a worker thread (it embeds and waits on Redis); the form's
    files are closed afterwards."""
    form = await read_form(request, settings)
    try:
        return await run_in_threadpool(work, *args, form)
    finally:
        await form.close()


def field(values: Fields, name: str) -> str:
    """A text field of a form or query string, stripped ('' when absent)."""
    value = values.get(name, "")
    if not isinstance(value, str):
        raise BadParam(name, "must be text, not a file")
    return value.strip()


def choice(values: Fields, name: str, allowed: tuple[str, ...], default: str) -> str:
    value = field(values, name) or default
    if value not in allowed:
        raise BadParam(name, f"{value!r} is not one of {', '.join(allowed)}")
    return value


def number(values: Fields, name: str, kind: type, default):
    """The number in field `name` (`default` when empty)."""
    raw = field(values, name)
    if not raw:
        return default
    try:
        return kind(raw)
    except ValueError:
        raise BadParam(name, f"{raw!r} is not {'an integer' if kind is int else 'a number'}") from None


def decision(form: Fields, current: Decision) -> Decision:
    """The decision settings of the form, an empty field keeping `current`'s; a 400 naming the setting (Decision's
    own check) when one is out of range."""
    values = {name: number(form, name, kind, getattr(current, name)) for name, kind in DECISION_FIELDS.items()}
    try:
        return Decision(**values)
    except QueryError as err:
        raise HTTPException(400, str(err)) from None


def sink_urls(form: Fields) -> tuple[str, ...]:
    """The `notify` field's URLs, one a line, each checked as `alert add --notify` checks it."""
    urls = tuple(line.strip() for line in field(form, "notify").splitlines() if line.strip())
    for url in urls:
        try:
            parse_sink(url)
        except SinkError as err:
            raise BadParam("notify", str(err)) from None
    return urls


def uploaded(form: FormData, settings: ConsoleSettings) -> tuple[str, bytes]:
    """(file name, bytes) of the form's `file`, which must be given, not empty, and within the bound."""
    upload = form.get("file")
    if not isinstance(upload, UploadFile) or not upload.filename:
        raise BadParam("file", "choose a file to upload")
    name = Path(upload.filename).name[:MAX_NAME]
    data = upload.file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise HTTPException(413, f"{name} is larger than {size(settings.max_upload_bytes)}")
    if not data:
        raise BadParam("file", f"{name} is empty")
    return name, data


def example_vector(encoder, name: str, data: bytes, modality: str) -> np.ndarray:
    """An uploaded clip or image embedded as `modality`, as `alert add --example` embeds a file (load_file, then
    the encoder); a 400 in one line when it does not load as that modality."""
    from encoders.transforms import load_file

    suffix = Path(name).suffix.lower()
    if not SUFFIX.fullmatch(suffix):
        raise BadParam("file", f"{name} needs an extension that tells its format (.wav, .png, .mp4, ...)")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"upload{suffix}"
        path.write_bytes(data)
        try:
            _, tensor = load_file(path, modality)
        except (ValueError, OSError) as err:
            raise BadParam("file", f"{name} does not load as {modality}: {str(err).replace(str(path), name)}") from None
    return encoder.embed(modality, tensor.unsqueeze(0))[0]


def npy_vector(name: str, data: bytes, dim: int) -> np.ndarray:
    """An uploaded .npy vector, normalised, of the model's dimension, as `alert add --vector` takes it."""
    if Path(name).suffix.lower() != ".npy":
        raise BadParam("file", f"{name}: a vector is uploaded as a .npy file")
    try:
        v = unit(np.load(io.BytesIO(data), allow_pickle=False), name)
    except (ValueError, OSError, EOFError) as err:
        raise BadParam("file", f"{name} is not a usable .npy vector: {err}") from None
    if v.shape[0] != dim:
        raise BadParam("file", f"{name} has {v.shape[0]} dimensions; the model embeds in {dim}")
    return v


# ----- the pages -----------------------------------------------------------------------------------------


def active(db: redis.Redis, query_id: str) -> Query:
    """The active query `query_id`: a 404 when there is none, a 409 when its record does not load."""
    if not db.sismember(QUERY_SET, query_id):
        raise HTTPException(404, f"no query {query_id!r} (see the Queries page)")
    try:
        return load_query(db, query_id)
    except QueryError as err:
        raise HTTPException(409, str(err)) from None


def shown(q: Query) -> dict:
    """What the pages show of a query: its sinks without their secrets, keyed by sink id."""
    return {"q": q, "d": q.decision, "sinks": {sink_id(url): sink_label(url) for url in q.notify}}


@router.get("/queries")
def list_page(request: Request, db: Db, slot: Slot):
    queries, malformed = read_queries(db)
    return page(
        request,
        "queries.html",
        rows=[shown(q) for q in queries],
        malformed=sorted(malformed.items()),
        modalities=QUERY_MODALITIES,
        default_modality=DEFAULT_MODALITY,
        defaults=Decision(),
        slot=slot,
        added=request.query_params.get("added", ""),
        removed=request.query_params.get("removed", ""),
    )


def new_query(db: redis.Redis, slot: EncoderSlot, settings: ConsoleSettings, form: FormData) -> Query:
    """The query the add form describes, stored, with its modality's background embedded first when missing."""
    text = field(form, "text")
    if not text:
        raise BadParam("text", "the query text is empty")
    modality = choice(form, "modality", QUERY_MODALITIES, DEFAULT_MODALITY)
    source = choice(form, "source", SOURCES, "text")
    rule = decision(form, Decision())
    min_dbfs = number(form, "min_dbfs", float, None)
    notify = sink_urls(form)
    try:
        if source == "vector":
            from encoders.config import resolve_config

            name, data = uploaded(form, settings)
            emb, label = npy_vector(name, data, resolve_config(slot.name).out_embed_dim), f"vector:{name}"
        else:
            encoder = slot.get()
            check_modality(encoder, modality)
            if source == "example":
                if modality == "fused":
                    raise BadParam("file", "a fused query takes a text or a vector, not a clip")
                name, data = uploaded(form, settings)
                emb, label = example_vector(encoder, name, data, modality), f"example:{name}"
            else:
                emb, label = ensemble(encoder, [text], modality)[0], "text"
        q = Query(
            text,
            modality,
            emb,
            slot.name,
            device=field(form, "device") or ALL_DEVICES,
            decision=rule,
            min_dbfs=min_dbfs,
            source=label,
            notify=notify,
        )
        if load_background(db, slot.name, modality) is None:  # after every check: a refusal leaves nothing behind
            ensure_background(db, slot.get(), modality)
    except QueryError as err:
        raise HTTPException(400, str(err)) from None
    return save_query(db, q)


@router.post("/queries")
async def add(request: Request, db: Db, slot: Slot, settings: Settings):
    q = await posted(request, settings, new_query, db, slot, settings)
    return RedirectResponse(f"/queries?added={q.id}", status_code=303)


@router.get("/queries/{query_id}")
def query_page(request: Request, query_id: str, db: Db):
    return page(request, "query.html", saved=bool(request.query_params.get("saved")), **shown(active(db, query_id)))


def edited(db: redis.Redis, query_id: str, form: FormData) -> None:
    """The query with the form's decision settings, and its sinks ticked to keep plus the new URLs, stored."""
    q = active(db, query_id)
    keep = set(form.getlist("keep"))
    notify = tuple(url for url in q.notify if sink_id(url) in keep) + sink_urls(form)
    try:
        update_query(db, replace(q, decision=decision(form, q.decision), notify=notify))
    except QueryError as err:  # removed meanwhile
        raise HTTPException(404, str(err)) from None


@router.post("/queries/{query_id}")
async def edit(request: Request, query_id: str, db: Db, settings: Settings):
    await posted(request, settings, edited, db, query_id)
    return RedirectResponse(f"/queries/{query_id}?saved=1", status_code=303)


@router.post("/queries/{query_id}/remove")
def remove(query_id: str, db: Db):
    try:
        delete_query(db, query_id)
    except QueryError as err:
        raise HTTPException(404, str(err)) from None
    return RedirectResponse(f"/queries?removed={query_id}", status_code=303)


@router.post("/queries/{query_id}/tune")
def tune(request: Request, query_id: str, db: Db):
    """`alert tune ID --from-reviews` with its defaults: fit on the reviewed events, store the threshold (and a
    hysteresis below it), show the fit; or a 409 with the one line saying why it cannot."""
    q = active(db, query_id)
    try:
        background = load_background(db, q.model, q.modality)
        if background is None:
            raise HTTPException(409, f"no background stored for {q.model}/{q.modality}")
        reviewed = reviewed_scores(db, q, background)
        if min(len(reviewed.positives), len(reviewed.negatives)) < MIN_PER_LABEL:
            raise HTTPException(
                409,
                f"query {q.id}: tuning needs at least {MIN_PER_LABEL} confirmed and {MIN_PER_LABEL} false-positive "
                f"events; it has {len(reviewed.positives)} and {len(reviewed.negatives)} (review its events on the "
                "Events page)",
            )
        fitted = fit(reviewed.positives, reviewed.negatives, q.decision)
        if not fitted.separates:
            raise HTTPException(
                409, f"no threshold separates query {q.id}'s reviewed events (F1 0 on them): threshold not changed"
            )
        set_decision(db, q.id, replace(q.decision, threshold=fitted.threshold, hysteresis=fitted.hysteresis))
    except QueryError as err:  # a background that does not load, or the query removed meanwhile
        raise HTTPException(409, str(err)) from None
    return page(request, "tuned.html", q=q, fitted=fitted, reviewed=reviewed)
