"""Bounds on the connections of a ZeroMQ server socket (ingest's PULL): how many peers, how long silent.

libzmq accepts every TCP connection and keeps it for as long as the peer keeps it open; it has no limit
of its own, so idle connections would use up the process's file descriptors and each may hold a partial
message of up to MAXMSGSIZE bytes. `ConnectionGuard` reads a monitor of the socket, which reports each
connection's file descriptor as it is accepted and as it closes, and learns from every received message
the descriptor it came from (`seen`). With these it:
- keeps at most `max_connections`: a new connection beyond them takes the place of the connection silent
  longest, if that one delivered nothing for `evict_idle_s` (`evicted_idle`), else it is closed at once
  (`refused_connection_cap`); so devices that send keep their connections, and idle ones cannot lock
  newcomers out;
- closes a connection that delivered no valid message for `idle_timeout_s` (`closed_idle`): a silent
  peer, one stuck inside a large message (whose buffer is then freed), or one sending only garbage;
and sets libzmq's handshake timeout and heartbeats, which close peers that never finish the handshake or
no longer answer. So the memory of partial messages is at most max_connections x MAXMSGSIZE, and no
longer than idle_timeout_s.

Silence is judged only while the receiving thread keeps up (`drained` recently): when it falls behind,
messages wait in libzmq's queues and their senders would look silent. A device loses nothing when its
idle connection is closed: its PUSH socket reconnects by itself and keeps unsent messages across the
reconnect. Closing is `shutdown()` on a duplicate of the descriptor, so that libzmq sees the peer go and
closes its own end (the descriptor stays libzmq's to close), and only if the descriptor still has the
peer address it had when accepted (a descriptor number is reused once closed).

A socket has one monitor: other readers of its events (the CurveZMQ accounting) are passed as listeners.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import socket as pysocket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import zmq
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger(__name__)
POLL_MS = 100
EVENTS_PER_TICK = 1000
SWEEP_S = 1.0  # how often idle connections are looked for
KEEPING_UP_S = 1.0  # the receiving thread found the socket empty this recently: silence means silence
FD_RESERVE = 64  # descriptors kept for everything else the process opens (Ray, Redis, files)


@dataclass(frozen=True)
class ConnectionLimits:
    """Per ingest socket; the TOML table [connections] of the pipeline config."""

    max_connections: int = 1024  # peers connected at once (also capped by the process's file limit)
    idle_timeout_s: float = 30.0  # a connection delivering no complete message this long is closed
    evict_idle_s: float = 1.0  # at the cap, a connection silent this long makes room for a new one
    handshake_timeout_s: float = 10.0  # a ZMTP (and CurveZMQ) handshake must finish within this
    heartbeat_s: float = 5.0  # ZMTP heartbeat interval; a peer silent for 3 of them is dropped by libzmq
    max_devices: int = 2000  # device ids an ingest serves at once (its per-device state)
    device_idle_s: float = 300.0  # a device silent this long gives up its place
    device_evict_idle_s: float = 5.0  # at the cap, one silent this long makes room for a new one, else refused


class EventListener(Protocol):
    def on_monitor_event(self, event: dict) -> None: ...

    def tick(self) -> None: ...


def _malloc_trim() -> Callable[[], None]:
    """glibc's malloc_trim: gives freed heap memory back to the system (a no-op elsewhere)."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


def read_monitor(monitor: zmq.Socket, handle: Callable[[dict], None], tick: Callable[[], None]) -> None:
    """Read a socket monitor until its socket closes (libzmq then sends MONITOR_STOPPED): `handle` each
    event, then `tick` once the pending events are handled (a closed descriptor may have been reused) or
    EVENTS_PER_TICK were, at least every POLL_MS. libzmq writes monitor events with a blocking send from its
    I/O thread, so a monitor nobody reads stalls every socket of the context: nothing but the socket's end
    stops this."""
    try:
        while True:
            try:
                wait = POLL_MS
                for _ in range(EVENTS_PER_TICK):  # then tick, also while events keep coming
                    if not monitor.poll(wait):
                        break
                    wait = 0
                    event = dict(parse_monitor_message(monitor.recv_multipart()))
                    if event["event"] == zmq.EVENT_MONITOR_STOPPED:
                        return
                    handle(event)
                tick()
            except zmq.ZMQError:
                raise
            except Exception:  # keep reading whatever happens: see the docstring
                log.exception("socket monitor event not handled")
    except zmq.ZMQError as err:
        if err.errno != zmq.ETERM:
            log.exception("socket monitor stopped")
    finally:
        monitor.close(linger=0)


def raise_file_limit(wanted: int) -> int:
    """Raise the soft limit of open files towards the hard one; returns the descriptors available."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard == resource.RLIM_INFINITY else max(soft, min(hard, wanted))
    if target != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


class ConnectionGuard:
    """Enforces `ConnectionLimits` on one server socket (set up before it is bound). `count(event)` is
    called for each connection refused or closed; `stats()` gives the connections open now."""

    def __init__(
        self,
        socket: zmq.Socket,
        limits: ConnectionLimits,
        count: Callable[[str], None],
        listeners: tuple[EventListener, ...] = (),
    ):
        self.limits = limits
        self.count = count
        self.listeners = listeners
        files = raise_file_limit(limits.max_connections + FD_RESERVE)
        self.max_connections = min(limits.max_connections, max(files - FD_RESERVE, 1))
        if self.max_connections < limits.max_connections:
            log.warning(
                "open-file limit %d: at most %d connections (not %d)",
                files,
                self.max_connections,
                limits.max_connections,
            )
        socket.setsockopt(zmq.HANDSHAKE_IVL, int(limits.handshake_timeout_s * 1000))
        socket.setsockopt(zmq.HEARTBEAT_IVL, int(limits.heartbeat_s * 1000))
        socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(3 * limits.heartbeat_s * 1000))
        self.opened: dict[int, tuple[float, object]] = {}  # descriptor -> (time accepted, peer address)
        self.last_message: dict[int, float] = {}  # descriptor -> time of its last valid message
        self.last_drained = time.monotonic()  # when the receiving thread last found nothing waiting
        self._freed = False  # connections closed since the last sweep
        self._trim = _malloc_trim()
        self._next_sweep = time.monotonic() + SWEEP_S
        self._thread = threading.Thread(
            target=read_monitor,
            name="ingest-connections",
            daemon=True,
            args=(socket.get_monitor_socket(zmq.EVENT_ALL), self._handle, self._tick),
        )
        self._thread.start()

    def seen(self, frame: zmq.Frame) -> None:
        """A valid message arrived on `frame`'s connection (called by the receiving thread)."""
        try:
            self.last_message[frame.get(zmq.SRCFD)] = time.monotonic()
        except zmq.ZMQError:
            pass

    def drained(self) -> None:
        """The receiving thread found nothing waiting: it keeps up (called by it)."""
        self.last_drained = time.monotonic()

    def _keeping_up(self) -> bool:
        return time.monotonic() - self.last_drained < KEEPING_UP_S

    def stats(self) -> dict:
        return {"connections": len(self.opened)}

    def _tick(self) -> None:
        if time.monotonic() >= self._next_sweep:
            self._close_idle(time.monotonic())
            self._next_sweep = time.monotonic() + SWEEP_S
        for listener in self.listeners:
            listener.tick()

    def _handle(self, event: dict) -> None:
        kind, fd = event["event"], event["value"]
        if kind == zmq.EVENT_ACCEPTED:
            peer = _peer(fd)
            if len(self.opened) < self.max_connections or self._evict_one():
                self.opened[fd] = (time.monotonic(), peer)
                self.last_message.pop(fd, None)
            else:
                _close(fd, peer)
                self.count("refused_connection_cap")
        elif kind == zmq.EVENT_DISCONNECTED:
            self.opened.pop(fd, None)
            self.last_message.pop(fd, None)
            self._freed = True
        for listener in self.listeners:
            listener.on_monitor_event(event)

    def _silent_since(self, fd: int) -> float:
        return max(self.opened[fd][0], self.last_message.get(fd, 0.0))

    def _evict_one(self) -> bool:
        """Close the connection silent longest, if it has been silent `evict_idle_s`; whether one was."""
        fd = min(self.opened, key=self._silent_since)
        if not self._keeping_up() or time.monotonic() - self._silent_since(fd) < self.limits.evict_idle_s:
            return False
        _close(fd, self.opened.pop(fd)[1])
        self.count("evicted_idle")
        return True

    def _close_idle(self, now: float) -> None:
        if not self._keeping_up():
            return
        idle = [fd for fd in self.opened if now - self._silent_since(fd) > self.limits.idle_timeout_s]
        for fd in idle:
            _close(fd, self.opened.pop(fd)[1])
            self.count("closed_idle")
        if self._freed:
            self._trim()  # closed connections freed their buffers (and partial messages): return the memory
            self._freed = False


def _peer(fd: int) -> object:
    """The remote address of the connection on descriptor `fd` (None if it is gone)."""
    try:
        with pysocket.socket(fileno=os.dup(fd)) as conn:
            return conn.getpeername()
    except OSError:
        return None


def _close(fd: int, peer: object) -> None:
    """Shut the connection on `fd` down, if it is still the one from `peer`."""
    try:
        with pysocket.socket(fileno=os.dup(fd)) as conn:
            if peer is not None and conn.getpeername() == peer:
                conn.shutdown(pysocket.SHUT_RDWR)
    except OSError:  # already gone
        pass
