"""The console's ASGI app: `create_app(redis_url)` mounts every page's router and the packaged static files,
behind the token rule of auth.py; `ConsoleServer` serves it with uvicorn, in this thread or beside other work.

It reads and writes only Redis (streaming/redis_layout.py), so it runs on any node and needs no Ray. Whatever
goes wrong in a request ends as a page of one line with a status, never a traceback: a malformed parameter 400,
an unknown id or page 404, Redis unreachable 503, and a bug 500 (its traceback goes to the log).
"""

from __future__ import annotations

import importlib
import logging
import socket
import threading
import time

import redis
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from streaming.redis_access import connect, redact_url

from .auth import Guard
from .pages import PAGES
from .pages.queries import EncoderSlot
from .web import STATIC_DIR, ConsoleSettings, problem

log = logging.getLogger(__name__)
START_TIMEOUT_S = 30.0  # ConsoleServer.start: longest wait for uvicorn to serve


def create_app(
    redis_url: str,
    token: str | None = None,
    settings: ConsoleSettings | None = None,
    model: str | None = None,
    checkpoint: str | None = None,
) -> FastAPI:
    """The console over the Redis at `redis_url`; with `token`, every request must carry it (auth.py). `model` and
    `checkpoint` name the encoder of the Queries and Search pages, as `--model` and `--checkpoint` do."""
    app = FastAPI(title="bindstream", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.redis = connect(redis_url)
    app.state.redis_url = redis_url
    app.state.settings = settings or ConsoleSettings()
    app.state.live = 0  # /live streams open now
    app.state.live_dropped = 0  # alerts channel messages that did not decode (pages/events.py)
    app.state.encoder = EncoderSlot(model, checkpoint)  # loaded at its first use
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    for name in PAGES:
        app.include_router(importlib.import_module(f"{__package__}.pages.{name}").router)

    @app.get("/", include_in_schema=False)
    def home() -> RedirectResponse:
        return RedirectResponse("/devices")

    @app.exception_handler(HTTPException)
    def http_problem(request: Request, exc: HTTPException):
        message = f"no page {request.url.path}" if exc.status_code == 404 and exc.detail == "Not Found" else exc.detail
        return problem(request, exc.status_code, str(message), dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    def bad_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())[1:]) or "request"
        return problem(request, 400, f"{where}: {first.get('msg', 'malformed')}")

    @app.exception_handler(redis.RedisError)
    def redis_down(request: Request, exc: redis.RedisError):
        log.warning("console: Redis at %s: %s", redact_url(redis_url), exc)
        return problem(request, 503, f"Redis at {redact_url(redis_url)} failed: {exc}")

    app.add_middleware(OneLineErrors)
    app.add_middleware(Guard, token=token)  # added last: the outermost, so nothing is served before it
    return app


class OneLineErrors:
    """ASGI middleware: an exception no handler turned into a page (a bug) is logged with its traceback and
    answered with a 500 page of one line; once a response has started (a live stream), it is only logged."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            log.exception("console: %s %s failed", scope.get("method"), scope.get("path"))
            if not started:
                response = problem(Request(scope), 500, f"the console failed on this request ({type(exc).__name__})")
                await response(scope, receive, send)


class ConsoleError(RuntimeError):
    """The console cannot listen where it was asked to (one line)."""


class ConsoleServer:
    """uvicorn serving `app` on a socket bound when this is built (so a busy port is one line before anything
    starts, and port 0 takes a free one): `run()` in this thread until Ctrl-C, or `start()` on a daemon thread
    beside other work, then `stop()`. Open live streams get `shutdown_s` to end at a stop."""

    def __init__(self, app: FastAPI, host: str, port: int):
        self.host, self.shutdown_s = host, app.state.settings.shutdown_s
        config = uvicorn.Config(
            app, log_config=None, log_level="warning", timeout_graceful_shutdown=self.shutdown_s, lifespan="off"
        )
        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((host, port))
            self.socket.listen(config.backlog)  # from now on connections wait until uvicorn serves them
        except OSError as err:
            self.socket.close()
            raise ConsoleError(f"the console cannot listen on {host}:{port}: {err.strerror or err}") from None
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.socket.getsockname()[1]}"

    def run(self) -> None:
        self.server.run(sockets=[self.socket])

    def start(self) -> ConsoleServer:
        """Serve on a daemon thread; returns once it serves (ConsoleError if it stopped instead)."""
        self.thread = threading.Thread(target=self.run, name="bindstream-console", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ConsoleError(f"the console did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(self.shutdown_s + START_TIMEOUT_S)
        self.socket.close()
