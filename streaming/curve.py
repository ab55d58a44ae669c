"""CurveZMQ, server side: device connections encrypted and accepted only from public keys in an allow-list
folder. SECURITY.md section 2 describes the setup; key files are sensors/keys.py's.

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
CURVE handshake. As in pyzmq's zmq.auth, who may connect (`AllowList`) is kept apart from the thread that
answers ZAP (`ZapServer`); `CurveAuth` ties one socket to both and counts. libzmq has one ZAP endpoint per
context, so one ZapServer serves every secured socket of its context, each under its own ZAP domain.
ZAP_ENFORCE_DOMAIN is set, so if the server is gone, connections are refused (fail closed) rather than
accepted. Handshake failures that never reach ZAP (wrong mechanism, bad crypto) are read from a socket
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

import zmq

from sensors.keys import load_allow_list, load_secret_certificate

from .connections import read_monitor

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_VERSION = b"1.0"
POLL_MS = 100
BIND_RETRY_S = 2.0  # how long a new ZAP server waits for a stopped one to release its endpoint

UNKNOWN_KEY = "curve_unknown_key"
NO_KEY = "curve_no_key"
BAD_HANDSHAKE = "curve_bad_handshake"
PROTOCOL_ERROR = "curve_protocol_error"
HANDSHAKE_FAILED = "curve_handshake_failed"
ZAP_ERROR = "curve_zap_error"
REFUSED_REASONS = (UNKNOWN_KEY, NO_KEY, BAD_HANDSHAKE, PROTOCOL_ERROR, HANDSHAKE_FAILED, ZAP_ERROR)
_ZAP_REFUSAL_TEXT = {NO_KEY: b"CURVE required", UNKNOWN_KEY: b"unknown public key"}  # the ZAP status text

# handshake failures the monitor reports; HANDSHAKE_FAILED_AUTH (ZAP said no) is counted by the ZAP server
_MONITORED = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
_PROTOCOL_REASONS = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: NO_KEY,
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: BAD_HANDSHAKE,
    zmq.PROTOCOL_ERROR_ZMTP_KEY_EXCHANGE: BAD_HANDSHAKE,
}
_domain_ids = itertools.count()


@dataclass(frozen=True)
class CurveSettings:
    """CurveZMQ for an ingest socket. `server_secret_file`: the server's secret certificate (the `.key_secret`
    file `generate_keys` writes); `allowed_clients_dir`: a folder of device public certificates (`*.key`), the
    allow-list. The folder is re-read every `reload_every_s` seconds when its content changed (0: only on
    `reload()`); a removed key stops new connections, not ones already established."""

    server_secret_file: str
    allowed_clients_dir: str
    reload_every_s: float = 5.0


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


class AllowList:
    """Who may connect: the public keys of the certificates (`*.key`) in a folder, each known by its file
    name. `reload()` re-reads the folder; `watch()`, called now and then, re-reads it at most every `every_s`
    seconds (0: never) and only when its content changed."""

    def __init__(self, folder: str | os.PathLike, every_s: float):
        self.folder = Path(folder)
        self.every_s = every_s
        self._lock = threading.Lock()
        self._signature = _folder_signature(self.folder)
        self._keys = load_allow_list(self.folder)
        self._next_look = time.monotonic() + every_s

    def reload(self) -> int:
        """Re-read the folder; returns the number of keys allowed. If the folder is gone the previous list
        stays and FileNotFoundError is raised."""
        signature = _folder_signature(self.folder)
        keys = load_allow_list(self.folder)
        with self._lock:
            self._keys, self._signature = keys, signature
        log.info("CURVE allow-list %s: %d keys", self.folder, len(keys))
        return len(keys)

    def watch(self) -> None:
        if not self.every_s or time.monotonic() < self._next_look:
            return
        self._next_look = time.monotonic() + self.every_s
        if _folder_signature(self.folder) != self._signature:
            try:
                self.reload()
            except OSError as err:
                log.error("CURVE allow-list reload failed, keeping the previous list: %s", err)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._keys.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)

    def check(self, mechanism: bytes, credentials: list[bytes]) -> tuple[bool, str]:
        """(True, certificate name) for an allowed CURVE client, else (False, refusal reason)."""
        if mechanism != b"CURVE" or not credentials:
            return False, NO_KEY
        with self._lock:
            name = self._keys.get(credentials[0])
        return (False, UNKNOWN_KEY) if name is None else (True, name)


class CurveAuth:
    """The CurveZMQ server side of one socket (made by `secure_server`): configures the socket, answers its ZAP
    requests from its allow-list (`reload`, `allowed_names`), counts what it accepts and refuses (`on_refused`,
    `stats`), and `stop()`s."""

    def __init__(
        self,
        socket: zmq.Socket,
        keys: tuple[bytes, bytes],
        allow_list: AllowList,
        on_refused: Callable[[str], None],
        monitor: bool,
    ):
        self.allow_list = allow_list
        self.on_refused = on_refused
        self.domain = f"bindstream-{os.getpid()}-{next(_domain_ids)}".encode()
        self.refused: Counter[str] = Counter()
        self.accepted: Counter[str] = Counter()  # certificate name -> handshakes accepted
        self._lock = threading.Lock()  # the counts: the ZAP and monitor threads write them
        self._stopped = threading.Event()
        self._socket = socket
        socket.curve_server = True
        socket.curve_publickey, socket.curve_secretkey = keys
        socket.zap_domain = self.domain
        try:
            socket.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no ZAP server -> refuse, never accept
        except (zmq.ZMQError, AttributeError):
            log.warning("libzmq lacks ZAP_ENFORCE_DOMAIN: connections would be accepted if the ZAP server died")
        self._zap = ZapServer.join(socket.context, self.domain, self)
        self._monitor = None
        if monitor:
            events = socket.get_monitor_socket(_MONITORED | zmq.EVENT_MONITOR_STOPPED)
            self._monitor = threading.Thread(
                target=read_monitor,
                args=(events, self.on_monitor_event, self.tick),
                name="bindstream-curve-monitor",
                daemon=True,
            )
            self._monitor.start()

    def reload(self) -> int:
        """Re-read the allow-list folder now: `AllowList.reload`."""
        return self.allow_list.reload()

    def allowed_names(self) -> list[str]:
        return self.allow_list.names()

    def authenticate(self, mechanism: bytes, credentials: list[bytes]) -> tuple[bool, str]:
        """One ZAP request of this socket, counted: (True, user id) or (False, refusal reason)."""
        allowed, who = self.allow_list.check(mechanism, credentials)
        if allowed:
            with self._lock:
                self.accepted[who] += 1
        else:
            self.refuse(who)
        return allowed, who

    def refuse(self, reason: str) -> None:
        with self._lock:
            self.refused[reason] += 1
        try:
            self.on_refused(reason)
        except Exception:  # a failing counter must not break authentication
            log.exception("on_refused(%r) raised", reason)

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
        if not self._stopped.is_set():
            self.allow_list.watch()

    def stats(self) -> dict:
        with self._lock:
            return {
                "allowed_keys": len(self.allow_list),
                "refused": dict(self.refused),
                "accepted": dict(self.accepted),
            }

    def stop(self) -> None:
        """Stop counting and leave the ZAP server (stopped when no secured socket of its context is left).
        Call it after closing the socket: while the socket is open and the server is gone, every new
        connection is refused (fail closed). The monitor thread ends when the socket is closed."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._zap.leave(self.domain)
        if self._socket.closed and self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(timeout=2)  # ends at MONITOR_STOPPED; with the socket open it keeps draining


def _zap_reply(request_id: bytes, status: bytes, text: bytes, user_id: bytes = b"") -> list[bytes]:
    return [ZAP_VERSION, request_id, status, text, user_id, b""]  # no metadata


class ZapServer:
    """The thread answering the ZAP requests of one zmq context, each from the CurveAuth that joined under the
    request's domain. A context has one ZAP endpoint, so its secured sockets share one server: `join` finds it
    or starts it (the registry of servers by context is this class's), and the last `leave` stops it."""

    _registry_lock = threading.Lock()
    _running: dict[int, ZapServer] = {}  # context address -> its server

    @classmethod
    def join(cls, context: zmq.Context, domain: bytes, auth: CurveAuth) -> ZapServer:
        with cls._registry_lock:
            server = cls._running.get(context.underlying)
            if server is None or not server.thread.is_alive():
                # a server whose thread died left its sockets refusing everyone: the new one takes them over
                server = cls._running[context.underlying] = cls(context, dict(server.domains) if server else {})
            server.domains[domain] = auth
            return server

    def __init__(self, context: zmq.Context, domains: dict[bytes, CurveAuth]):
        self.context = context
        self.domains = domains
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: Exception | None = None
        self.thread = threading.Thread(target=self._run, name="bindstream-zap", daemon=True)
        self.thread.start()
        self._ready.wait()
        if self._error is not None:
            raise RuntimeError(
                f"cannot start the ZAP handler on {ZAP_ENDPOINT}: {self._error}. Is another "
                f"authenticator (zmq.auth.ThreadAuthenticator) running in this context?"
            )

    def leave(self, domain: bytes) -> None:
        """Stop answering for `domain`; when no domain is left, stop the thread."""
        with self._registry_lock:
            self.domains.pop(domain, None)
            if not self.domains:
                self._stop.set()
                self.thread.join(timeout=5)
                if self._running.get(self.context.underlying) is self:
                    del self._running[self.context.underlying]

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
                # a server of this context that just stopped releases the endpoint asynchronously
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
                log.exception("ZAP server stopped; secured sockets now refuse every connection")
        finally:
            sock.close(linger=0)

    def _answer(self, request: list[bytes]) -> list[bytes]:
        request_id = request[1] if len(request) > 1 else b""
        auth = None
        try:
            version, request_id, domain, _address, _identity, mechanism = request[:6]
            if version != ZAP_VERSION:
                return _zap_reply(request_id, b"400", b"bad ZAP version")
            auth = self.domains.get(domain)
            if auth is None:  # a socket of this context that secure_server did not set up
                if mechanism == b"NULL":
                    return _zap_reply(request_id, b"200", b"OK")
                return _zap_reply(request_id, b"400", b"unknown ZAP domain")
            allowed, who = auth.authenticate(mechanism, request[6:])
            if allowed:
                return _zap_reply(request_id, b"200", b"OK", who.encode())
            return _zap_reply(request_id, b"400", _ZAP_REFUSAL_TEXT[who])
        except Exception:
            log.exception("ZAP request failed; refusing the connection")
            if auth is not None:
                auth.refuse(ZAP_ERROR)
            return _zap_reply(request_id, b"500", b"internal error")


def secure_server(
    socket: zmq.Socket, settings: CurveSettings, on_refused: Callable[[str], None], monitor: bool = True
) -> CurveAuth:
    """Make `socket` (not yet bound) a CURVE server that accepts only the clients in the allow-list folder.
    `on_refused(reason)` is called, from a helper thread, for every refused connection attempt. With
    `monitor=False` the caller reads the socket's monitor and passes its events to the returned object's
    `on_monitor_event` and calls its `tick` (a socket has one monitor: see streaming/connections.py)."""
    if socket.getsockopt(zmq.LAST_ENDPOINT):
        raise RuntimeError("secure_server must be called before socket.bind")
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq was built without CURVE support")
    keys = load_secret_certificate(settings.server_secret_file)
    allow_list = AllowList(settings.allowed_clients_dir, settings.reload_every_s)  # fails before touching the socket
    return CurveAuth(socket, keys, allow_list, on_refused, monitor)


def peer_user_id(frame: zmq.Frame) -> str | None:
    """The certificate name (file stem in the allow-list) of the device that sent `frame` (received with
    copy=False on a secured socket); None on a plain socket."""
    try:
        user = frame.get("User-Id")
        return str(user) if user else None
    except zmq.ZMQError:
        return None
