"""Security helpers: CurveZMQ for device connections (encryption + a public-key allow-list), and Redis URL
checks that fail with a clear message. SECURITY.md describes the setup.

CurveZMQ on the ingest PULL socket, called once before `bind`:

    auth = secure_server(socket, CurveSettings("keys/server.key_secret", "keys/devices"),
                         lambda reason: metrics.count("refused_" + reason))
    socket.bind(endpoint)
    ...
    socket.close()
    auth.stop()          # after the socket is closed

Every connection attempt that does not end with an authenticated CURVE session calls `on_refused(reason)`:

    curve_unknown_key    the client's public key is not in the allow-list (ZAP refused it)
    curve_no_key         the client is not using CURVE at all (plain/NULL or PLAIN mechanism)
    curve_bad_handshake  CURVE handshake that does not decrypt: wrong server key on the device, or forged data
    curve_protocol_error any other ZMTP protocol error during the handshake (garbage on the port)
    curve_handshake_failed  the peer went away or timed out during the handshake (port probes, half-open links)
    curve_zap_error      the allow-list check itself failed (a bug; the connection is refused)

How it works: libzmq asks a ZAP handler (RFC 27) on `inproc://zeromq.zap.01` of the socket's context for each
CURVE handshake. One handler thread per context serves every secured socket of that context, each under its
own ZAP domain. ZAP_ENFORCE_DOMAIN is set, so if the handler is gone, connections are refused (fail closed) rather
than accepted. Handshake failures that never reach ZAP (wrong mechanism, bad crypto) are read from a socket
monitor on a second small thread.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import zmq
import zmq.auth
from zmq.utils import z85

from .connections import read_monitor

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_VERSION = b"1.0"
POLL_MS = 100
BIND_RETRY_S = 2.0  # how long a new ZAP handler waits for a stopped one to release its endpoint

UNKNOWN_KEY = "curve_unknown_key"
NO_KEY = "curve_no_key"
BAD_HANDSHAKE = "curve_bad_handshake"
PROTOCOL_ERROR = "curve_protocol_error"
HANDSHAKE_FAILED = "curve_handshake_failed"
ZAP_ERROR = "curve_zap_error"
REFUSED_REASONS = (UNKNOWN_KEY, NO_KEY, BAD_HANDSHAKE, PROTOCOL_ERROR, HANDSHAKE_FAILED, ZAP_ERROR)

# handshake failures the monitor reports; HANDSHAKE_FAILED_AUTH (ZAP said no) is counted by the ZAP handler
_MONITORED = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
_PROTOCOL_REASONS = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: NO_KEY,
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: BAD_HANDSHAKE,
    zmq.PROTOCOL_ERROR_ZMTP_KEY_EXCHANGE: BAD_HANDSHAKE,
}


@dataclass(frozen=True)
class CurveSettings:
    """CurveZMQ for an ingest socket. `server_secret_file`: the server's secret certificate (the `.key_secret`
    file `generate_keys` writes); `allowed_clients_dir`: a folder of device public certificates (`*.key`), the
    allow-list. The folder is re-read every `reload_every_s` seconds when its content changed (0: only on
    `reload()`); a removed key stops new connections, not ones already established."""

    server_secret_file: str
    allowed_clients_dir: str
    reload_every_s: float = 5.0


def generate_keys(folder: str | os.PathLike, name: str) -> tuple[str, str]:
    """Create a CURVE key pair as zmq certificate files `folder/name.key` (public: give it to the other side)
    and `folder/name.key_secret` (secret: keep it on this machine, mode 0600). Returns (public, secret) paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = zmq.auth.create_certificates(folder, name)
    os.chmod(secret_file, 0o600)
    return str(public_file), str(secret_file)


def load_public_key(path: str | os.PathLike) -> bytes:
    """The Z85 public key (40 characters) of a certificate file; ValueError if it has none or it is invalid."""
    public, _ = zmq.auth.load_certificate(path)
    _raw_key(public, path)
    return public


def load_secret_certificate(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys of a secret certificate file; ValueError if the secret key is missing."""
    public, secret = zmq.auth.load_certificate(path)
    if not secret:
        raise ValueError(f"{path} holds no secret key: pass the .key_secret file that generate_keys wrote")
    _raw_key(public, path)
    _raw_key(secret, path)
    return public, secret


def _raw_key(key: bytes, source) -> bytes:
    if len(key) != 40:
        raise ValueError(f"{source}: a CURVE key is 40 Z85 characters, got {len(key)}")
    try:
        return z85.decode(key)
    except (ValueError, KeyError, IndexError, TypeError):
        raise ValueError(f"{source}: the key is not valid Z85") from None


def load_allow_list(folder: str | os.PathLike) -> dict[bytes, str]:
    """{raw 32-byte public key: certificate name} for every `*.key` file in `folder`. Files that cannot be read
    or hold no valid key are skipped with a warning; a missing folder raises FileNotFoundError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"allow-list folder {folder} does not exist")
    allowed = {}
    for path in sorted(folder.glob("*.key")):
        try:
            allowed[_raw_key(zmq.auth.load_certificate(path)[0], path)] = path.stem
        except (OSError, ValueError) as err:
            log.warning("skipping %s in the CURVE allow-list: %s", path, err)
    return allowed


def _folder_signature(folder: Path) -> tuple:
    """What changes when a key file is added, removed or rewritten."""
    entries = []
    try:
        for path in folder.glob("*.key"):
            stat = path.stat()
            entries.append((path.name, stat.st_mtime_ns, stat.st_size))
    except OSError:
        return ()
    return tuple(sorted(entries))


class CurveAuth:
    """What `secure_server` returns: the allow-list of one socket, its refusal counts, `reload()` and `stop()`."""

    def __init__(self, settings: CurveSettings, domain: bytes, on_refused: Callable[[str], None]):
        self.settings = settings
        self.domain = domain
        self.on_refused = on_refused
        self.refused: Counter[str] = Counter()
        self.accepted: Counter[str] = Counter()  # certificate name -> handshakes accepted
        self._lock = threading.Lock()
        self._folder = Path(settings.allowed_clients_dir)
        self._signature = _folder_signature(self._folder)
        self._allowed = load_allow_list(self._folder)
        self._stopped = threading.Event()
        self._monitor: threading.Thread | None = None
        self._socket: zmq.Socket | None = None
        self._handler: _ZapHandler | None = None
        self._next_reload = time.monotonic() + settings.reload_every_s

    def reload(self) -> int:
        """Re-read the allow-list folder; returns the number of keys allowed. If the folder is gone the previous
        list stays and FileNotFoundError is raised."""
        signature = _folder_signature(self._folder)
        allowed = load_allow_list(self._folder)
        with self._lock:
            self._allowed, self._signature = allowed, signature
        log.info("CURVE allow-list %s: %d keys", self._folder, len(allowed))
        return len(allowed)

    def allowed_names(self) -> list[str]:
        with self._lock:
            return sorted(self._allowed.values())

    def check(self, mechanism: bytes, credentials: list[bytes]) -> tuple[bool, str, str]:
        """ZAP decision: (allowed, user id or refusal reason, status text)."""
        if mechanism != b"CURVE" or not credentials:
            return False, NO_KEY, "CURVE required"
        with self._lock:
            name = self._allowed.get(credentials[0])
        if name is None:
            return False, UNKNOWN_KEY, "unknown public key"
        return True, name, "OK"

    def refuse(self, reason: str) -> None:
        with self._lock:
            self.refused[reason] += 1
        try:
            self.on_refused(reason)
        except Exception:  # a failing counter must not break authentication
            log.exception("on_refused(%r) raised", reason)

    def _maybe_reload(self) -> None:
        if self.settings.reload_every_s and _folder_signature(self._folder) != self._signature:
            try:
                self.reload()
            except OSError as err:
                log.error("CURVE allow-list reload failed, keeping the previous list: %s", err)

    def on_monitor_event(self, event: dict) -> None:
        """Counts the handshake failures ZAP never sees (from a monitor of the socket)."""
        if self._stopped.is_set():
            return
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            self.refuse(_PROTOCOL_REASONS.get(event["value"], PROTOCOL_ERROR))
        elif event["event"] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            self.refuse(HANDSHAKE_FAILED)

    def tick(self) -> None:
        """Called now and then by the monitor's reader: re-reads a changed allow-list folder."""
        if self.settings.reload_every_s and not self._stopped.is_set() and time.monotonic() >= self._next_reload:
            self._next_reload = time.monotonic() + self.settings.reload_every_s
            self._maybe_reload()

    def stats(self) -> dict:
        with self._lock:
            return {"allowed_keys": len(self._allowed), "refused": dict(self.refused),
                    "accepted": dict(self.accepted)}

    def stop(self) -> None:
        """Stop counting and leave the ZAP handler (stopped when no secured socket of its context is left).
        Call it after closing the socket: while the socket is open and the handler is gone, every new
        connection is refused (fail closed). The monitor thread ends when the socket is closed."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._handler is not None:
            _unregister(self._handler, self.domain)
        if self._socket is not None and self._socket.closed and self._monitor is not None \
                and self._monitor is not threading.current_thread():
            self._monitor.join(timeout=2)  # ends at MONITOR_STOPPED; with the socket open it keeps draining


class _ZapHandler:
    """The ZAP handler thread of one zmq context; answers for the CurveAuth registered under each domain."""

    def __init__(self, context: zmq.Context):
        self.context = context
        self.domains: dict[bytes, CurveAuth] = {}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: Exception | None = None
        self.thread = threading.Thread(target=self._run, name="bindstream-zap", daemon=True)
        self.thread.start()
        self._ready.wait()
        if self._error is not None:
            raise RuntimeError(f"cannot start the ZAP handler on {ZAP_ENDPOINT}: {self._error}. Is another "
                               f"authenticator (zmq.auth.ThreadAuthenticator) running in this context?")

    def _run(self) -> None:
        sock = None
        deadline = time.monotonic() + BIND_RETRY_S
        while True:
            try:
                sock = self.context.socket(zmq.REP)
                sock.linger = 0
                sock.bind(ZAP_ENDPOINT)
                break
            except zmq.ZMQError as err:
                if sock is not None:
                    sock.close(linger=0)
                # a handler of this context that just stopped releases the endpoint asynchronously
                if err.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                    self._error = err
                    self._ready.set()
                    return
                time.sleep(0.02)
        self._ready.set()
        try:
            while not self._stop.is_set():
                if sock.poll(POLL_MS):
                    sock.send_multipart(self._answer(sock.recv_multipart()))
        except zmq.ZMQError as err:
            if err.errno != zmq.ETERM:
                log.exception("ZAP handler stopped; secured sockets now refuse every connection")
        finally:
            sock.close(linger=0)

    def _answer(self, request: list[bytes]) -> list[bytes]:
        request_id = request[1] if len(request) > 1 else b""
        auth = None
        try:
            version, request_id, domain, _address, _identity, mechanism = request[:6]
            if version != ZAP_VERSION:
                return [ZAP_VERSION, request_id, b"400", b"bad ZAP version", b"", b""]
            auth = self.domains.get(domain)
            if auth is None:  # a socket of this context that secure_server did not set up
                if mechanism == b"NULL":
                    return [ZAP_VERSION, request_id, b"200", b"OK", b"", b""]
                return [ZAP_VERSION, request_id, b"400", b"unknown ZAP domain", b"", b""]
            ok, who, text = auth.check(mechanism, request[6:])
            if ok:
                with auth._lock:
                    auth.accepted[who] += 1
                return [ZAP_VERSION, request_id, b"200", text.encode(), who.encode(), b""]
            auth.refuse(who)
            return [ZAP_VERSION, request_id, b"400", text.encode(), b"", b""]
        except Exception:
            log.exception("ZAP request failed; refusing the connection")
            if auth is not None:
                auth.refuse(ZAP_ERROR)
            return [ZAP_VERSION, request_id, b"500", b"internal error", b"", b""]

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)


_registry_lock = threading.Lock()
_handlers: dict[int, _ZapHandler] = {}  # context address -> its handler
_domain_ids = itertools.count()


def _register(context: zmq.Context, domain: bytes, auth: CurveAuth) -> _ZapHandler:
    with _registry_lock:
        handler = _handlers.get(context.underlying)
        if handler is None or not handler.thread.is_alive():
            previous = handler
            handler = _handlers[context.underlying] = _ZapHandler(context)
            if previous is not None:  # the old thread died: its sockets are refusing everyone; take them over
                handler.domains.update(previous.domains)
        handler.domains[domain] = auth
        return handler


def _unregister(handler: _ZapHandler, domain: bytes) -> None:
    with _registry_lock:
        handler.domains.pop(domain, None)
        if not handler.domains:
            handler.stop()
            if _handlers.get(handler.context.underlying) is handler:
                del _handlers[handler.context.underlying]


def secure_server(socket: zmq.Socket, settings: CurveSettings, on_refused: Callable[[str], None],
                  monitor: bool = True) -> CurveAuth:
    """Make `socket` (not yet bound) a CURVE server that accepts only the clients in the allow-list folder.
    `on_refused(reason)` is called, from a helper thread, for every refused connection attempt. With
    `monitor=False` the caller reads the socket's monitor and passes its events to the returned object's
    `on_monitor_event` and calls its `tick` (a socket has one monitor: see streaming/connections.py)."""
    if socket.getsockopt(zmq.LAST_ENDPOINT):
        raise RuntimeError("secure_server must be called before socket.bind")
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq was built without CURVE support")
    public, secret = load_secret_certificate(settings.server_secret_file)
    domain = f"bindstream-{os.getpid()}-{next(_domain_ids)}".encode()
    auth = CurveAuth(settings, domain, on_refused)  # reads the allow-list: fails before touching the socket
    socket.curve_server = True
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.zap_domain = domain
    try:
        socket.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no ZAP handler -> refuse, never accept
    except (zmq.ZMQError, AttributeError):
        log.warning("libzmq lacks ZAP_ENFORCE_DOMAIN: connections would be accepted if the ZAP handler died")
    auth._handler = _register(socket.context, domain, auth)
    auth._socket = socket
    if monitor:
        events = socket.get_monitor_socket(_MONITORED | zmq.EVENT_MONITOR_STOPPED)
        auth._monitor = threading.Thread(target=read_monitor, args=(events, auth.on_monitor_event, auth.tick),
                                         name="bindstream-curve-monitor", daemon=True)
        auth._monitor.start()
    return auth


def peer_user_id(frame: zmq.Frame) -> str | None:
    """The certificate name (file stem in the allow-list) of the device that sent `frame` (received with
    copy=False on a secured socket); None on a plain socket."""
    try:
        return frame.get("User-Id") or None
    except zmq.ZMQError:
        return None


# ---- Redis -------------------------------------------------------------------------------------------------

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
    import redis

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
