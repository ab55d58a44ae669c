"""Who may use the console. The rule: on a loopback address it needs no token; on any other address it needs one
(`check_bind` refuses to start without it), and then every request must carry it: `Authorization: Bearer T`,
or `?token=T` once, after which the browser holds an HttpOnly SameSite=Strict session cookie (so that links,
the live stream and forms work). Tokens are compared in constant time (hmac.compare_digest). Without a token no
cookie is ever set, and requests must name a loopback host (a web page cannot reach the console through DNS
rebinding). Either way, a form POST from another site is refused (cross-site request forgery).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from urllib.parse import urlencode

from starlette.datastructures import URL, Headers
from starlette.requests import Request
from starlette.responses import RedirectResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from .web import problem

TOKEN_ENV = "BINDSTREAM_UI_TOKEN"
MIN_TOKEN_CHARS = 16  # a shorter secret could be guessed; `python -c 'import secrets; print(secrets.token_urlsafe())'`
COOKIE = "bindstream_session"
TOKEN_PARAM = "token"
LOOPBACK_NAMES = frozenset({"localhost"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SAME_SITE = frozenset({"same-origin", "none"})  # Sec-Fetch-Site of a request this site (or the user) made


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, IPv6 with or without brackets) names this machine only."""
    host = host.strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_token(token: str | None) -> None:
    """ValueError, in one line, for a token that is set but too short to be a secret."""
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ValueError(
            f"the console's token must be at least {MIN_TOKEN_CHARS} characters "
            "(make one: python -c 'import secrets; print(secrets.token_urlsafe())')"
        )


def check_bind(host: str, token: str | None) -> None:
    """ValueError, in one line, unless the console may listen on `host` with `token`."""
    check_token(token)
    if token is None and not is_loopback(host):
        raise ValueError(
            f"the console on {host} would be open to the network: give --token or ${TOKEN_ENV} (or listen on 127.0.0.1)"
        )


def session_value(token: str) -> str:
    """The session cookie's value: derived from the token, so the cookie is not the token itself."""
    return hmac.new(token.encode(), b"bindstream console session", hashlib.sha256).hexdigest()


class Guard:
    """ASGI middleware in front of the whole console (pages, the live stream, static files): the rule above."""

    def __init__(self, app: ASGIApp, token: str | None):
        check_token(token)
        self.app, self.token = app, token
        self.session = session_value(token) if token else ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        response = self.refusal(request) or (self.login(request) if self.token else None)
        if response is None:
            await self.app(scope, receive, send)
        else:
            await response(scope, receive, send)

    def refusal(self, request: Request):
        """The page refusing `request`, or None when it may go on."""
        headers = request.headers
        if self.token is None and not is_loopback(request.url.hostname or ""):
            return problem(request, 403, "this console answers only requests for a loopback host (127.0.0.1)")
        if request.method not in SAFE_METHODS and not same_site(request.url, headers):
            return problem(request, 403, "a form sent from another site is refused")
        if self.token and not self.authorised(request):
            return problem(
                request,
                401,
                "this console needs its token: open it once with ?token=TOKEN, or send Authorization: Bearer TOKEN",
                {"WWW-Authenticate": "Bearer"},
            )
        return None

    def authorised(self, request: Request) -> bool:
        assert self.token is not None
        given = [request.query_params.get(TOKEN_PARAM, "")]
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            given.append(credentials.strip())
        cookie = request.cookies.get(COOKIE, "")
        # every candidate is compared, each in constant time: which one matched does not show in the timing
        matches = [hmac.compare_digest(g.encode(), self.token.encode()) for g in given]
        return any([*matches, hmac.compare_digest(cookie.encode(), self.session.encode())])

    def login(self, request: Request):
        """After a correct ?token=: the session cookie, and the same URL without the token (kept out of the
        address bar, the history and Referer headers); None for any other request."""
        if TOKEN_PARAM not in request.query_params:
            return None
        rest = [(k, v) for k, v in request.query_params.multi_items() if k != TOKEN_PARAM]
        response = RedirectResponse(str(request.url.replace(query=urlencode(rest))), status_code=303)
        response.set_cookie(COOKIE, self.session, httponly=True, samesite="strict", path="/")
        return response


def same_site(url: URL, headers: Headers) -> bool:
    """Whether a request that changes something came from the console's own pages: its Origin is the console's,
    or, without an Origin, its Sec-Fetch-Site says so (a client without either, such as curl, is no browser)."""
    origin = headers.get("origin")
    if origin is not None:
        return origin == f"{url.scheme}://{url.netloc}"
    return headers.get("sec-fetch-site", "same-origin") in SAME_SITE
