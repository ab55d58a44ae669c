"""What every page of the console shares: its settings, the templates, the Redis client of the request, one-line
problems, and the parsing of query parameters (a malformed one is a 400 page, never a traceback).

Pages are routers (one module each under streaming/ui/pages/) that `app.create_app` mounts; each renders a
template that extends `base.html` (blocks `title`, `content`, `scripts`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Annotated

import redis
from fastapi import Depends, HTTPException, Request
from fastapi.templating import Jinja2Templates

from streaming.alerts.search import parse_duration_ms

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
templates = Jinja2Templates(directory=HERE / "templates")
NAV = (  # the pages in the navigation bar: (path, label); a page is current when the request's path starts with it
    ("/devices", "Devices"),
    ("/events", "Events"),
    ("/timeline", "Timeline"),
    ("/queries", "Queries"),
    ("/search", "Search"),
)
templates.env.globals["nav"] = NAV


@dataclass(frozen=True)
class ConsoleSettings:
    """The console's bounds; every one is checked to be above 0 when built."""

    refresh_s: float = 5.0  # an open Devices or Events page reloads its table this often (live events reload it too)
    keepalive_s: float = 15.0  # an idle /live stream sends a comment this often (proxies keep it; gone clients show)
    live_feed: int = 50  # lines kept in the Events page's live feed (the history table below has the rest)
    max_live: int = 64  # /live streams at once (each holds a Redis pub/sub connection); more get a 503 page
    rate_window_s: float = 60.0  # windows per minute are counted over this last while (Redis clock)
    max_rate_count: int = 1_000  # entries counted per stream in that while; beyond, the rate shows "at least"
    max_streams: int = 10_000  # embedding streams shown on the Devices page; more are counted, not shown
    stream_chunk: int = 500  # streams looked at per Redis round trip (one script call)
    max_health: int = 10_000  # health event records read to find the open ones (newest first)
    events_limit: int = 50  # events listed unless ?limit= says
    max_events_limit: int = 500  # the largest ?limit=
    max_param_chars: int = 200  # a query parameter longer than this is refused (400)
    frames_shown: int = 12  # frames per sensor on an event's page (spread over the event); the rest are counted
    shutdown_s: int = 2  # at stop, open /live streams get this long before they are cut
    max_upload_bytes: int = 20 * 1024 * 1024  # an uploaded example clip or image, or .npy vector (Queries, Search)
    max_form_bytes: int = 64 * 1024  # the rest of a posted form: texts, settings, multipart framing
    max_form_fields: int = 32  # fields of one posted form (the add-query form has 13)
    search_top: int = 20  # rows of a search unless ?top= says
    max_search_top: int = 1_000  # the largest ?top=
    max_marked_events: int = 1_000  # event records read (newest first) to mark a timeline or link search rows
    timeline_points: int = 20_000  # scores per query drawn on a timeline; a longer series keeps each bucket's maximum

    def __post_init__(self) -> None:
        for f in fields(self):
            if not getattr(self, f.name) > 0:  # NaN fails too
                raise ValueError(f"console setting {f.name} must be above 0, got {getattr(self, f.name)!r}")


def client(request: Request) -> redis.Redis:
    """The Redis client of the app (a FastAPI dependency)."""
    return request.app.state.redis


RedisClient = Annotated[redis.Redis, Depends(client)]  # a page function's parameter: the app's Redis client


def settings_of(request: Request) -> ConsoleSettings:
    """The app's settings (a FastAPI dependency)."""
    return request.app.state.settings


def page(request: Request, template: str, status_code: int = 200, **context):
    """Render `template` with the request and `context`."""
    return templates.TemplateResponse(request, template, context, status_code=status_code)


def problem(request: Request, status_code: int, message: str, headers: dict[str, str] | None = None):
    """A page that says what was wrong in one line, with a 4xx status: never a traceback."""
    response = page(request, "problem.html", status_code=status_code, message=message)
    response.headers.update(headers or {})
    return response


class BadParam(HTTPException):
    """A malformed query parameter or form field: a 400 page naming it."""

    def __init__(self, name: str, why: str):
        super().__init__(400, f"{name}: {why}")


def text_param(request: Request, name: str) -> str | None:
    """A query parameter's text, stripped; None when absent or empty; BadParam when over max_param_chars."""
    value = (request.query_params.get(name) or "").strip()
    if len(value) > settings_of(request).max_param_chars:
        raise BadParam(name, f"longer than {settings_of(request).max_param_chars} characters")
    return value or None


def choice_param(request: Request, name: str, choices: tuple[str, ...]) -> str | None:
    value = text_param(request, name)
    if value is not None and value not in choices:
        raise BadParam(name, f"{value!r} is not one of {', '.join(choices)}")
    return value


def int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    value = text_param(request, name)
    if value is None:
        return default
    if not value.isdigit() or not low <= int(value) <= high:
        raise BadParam(name, f"{value!r} is not a whole number from {low} to {high}")
    return int(value)


def duration_param(request: Request, name: str) -> int | None:
    """A while back ('30s', '10m', '2h', '1d') in milliseconds; None when absent."""
    value = text_param(request, name)
    try:
        return None if value is None else parse_duration_ms(value)
    except ValueError as err:
        raise BadParam(name, str(err)) from None


def wall_time(ns: float) -> str:
    """A wall-clock time in ns (the matcher's, or Redis's) as pages show it, in this machine's local time."""
    return datetime.fromtimestamp(ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")


templates.env.filters["wall_time"] = wall_time
