"""Reaching Redis from a URL: every failure is told in one message that names its cause (a URL it cannot use,
refused credentials, TLS, unreachable) and never the password (`redact_url`). SECURITY.md section 3."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import redis


def redact_url(url: str) -> str:
    """`url` with its password replaced by *** (for logs and error messages); without a scheme, everything
    before an `@` is taken for credentials."""
    if "://" not in url:
        return f"***@{url.rsplit('@', 1)[1]}" if "@" in url else url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class RedisAccessError(RuntimeError):
    """Redis refused the credentials, the TLS handshake, or the connection."""


def check_redis(url: str, timeout_s: float = 5.0) -> None:
    """Connect to `url` and PING, raising RedisAccessError with a message that names the cause (wrong
    password or user, TLS certificate, unreachable) and never the password."""
    where = redact_url(url)
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    except ValueError as err:  # no scheme, a port that is no number
        hint = f"it needs a scheme, e.g. redis://{where}{'' if '/' in where else '/0'}" if "://" not in url else err
        raise RedisAccessError(f"{where!r} is not a Redis URL: {hint}") from None
    try:
        client.ping()
    except redis.AuthenticationError as err:
        raise RedisAccessError(f"Redis at {where} refused the credentials: {err}") from None
    except redis.ResponseError as err:
        if "NOAUTH" in str(err) or "NOPERM" in str(err):
            raise RedisAccessError(f"Redis at {where} refused access: {err}") from None
        raise
    except redis.ConnectionError as err:
        text = str(err)
        if "CERTIFICATE" in text.upper() or "SSL" in text.upper():
            raise RedisAccessError(f"TLS to Redis at {where} failed: {text}") from None
        raise RedisAccessError(f"cannot reach Redis at {where}: {text}") from None
    finally:
        client.close()
