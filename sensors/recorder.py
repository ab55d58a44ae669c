"""Session files: record raw messages with their arrival time, and replay them over ZeroMQ.

A session file is a sequence of msgpack maps: one file header {"format", "version"} written
when the file is created, then one record per message {"rx": arrival time (ns since the
epoch), "f": [frame bytes, ...]}. Every record is flushed when written, so a reader sees
each complete record while the file grows; a torn last record (a crash) is skipped.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack
import zmq

from .clock import Pacer
from .protocol import DEFAULT_LIMITS
from .publisher import DEFAULT_SNDHWM, connect_push

FORMAT = "bindstream-session"
FORMAT_VERSION = 1
MAX_RECORD_BYTES = 2 * DEFAULT_LIMITS.max_payload_bytes  # room for a payload over the limit, as received
RECORD_OVERHEAD_BYTES = 1024  # msgpack framing of one record around its frames
POLL_MS = 100  # how often record() checks its deadline
REPLAY_LINGER_MS = -1  # close() waits until the receiver has taken every message, like the blocking sends
FILE_BUFFER_BYTES = 1 << 20


@dataclass
class SessionRecord:
    """One received message exactly as it arrived."""

    frames: list[bytes]
    rx_ns: int  # wall clock (time.time_ns) at arrival


class Recorder:
    """Appends messages to a session file (created with a file header if new)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.skipped = 0  # messages `record` could not store (too large)
        self._file = open(self.path, "ab", buffering=FILE_BUFFER_BYTES)
        if self._file.tell() == 0:
            self._write({"format": FORMAT, "version": FORMAT_VERSION})

    def _write(self, record: dict) -> None:
        self._file.write(msgpack.packb(record))
        self._file.flush()

    def write(self, frames, rx_ns: int | None = None) -> None:
        """Store one message's frames (bytes, memoryview or zmq.Frame), valid or not. A message too large
        for `read_session` to read back (over MAX_RECORD_BYTES) raises ValueError and is not stored."""
        data = [f.bytes if isinstance(f, zmq.Frame) else bytes(f) for f in frames]
        if sum(map(len, data)) > MAX_RECORD_BYTES - RECORD_OVERHEAD_BYTES:
            raise ValueError(f"a message of {sum(map(len, data))} bytes is over the session file's record limit")
        self._write({"rx": time.time_ns() if rx_ns is None else rx_ns, "f": data})

    def record(self, socket: zmq.Socket, *, seconds: float | None = None, count: int | None = None) -> int:
        """Store what arrives on a bound PULL socket until `seconds` pass or `count` messages; returns how many.
        Messages too large to store are skipped and counted in `self.skipped`."""
        deadline = None if seconds is None else time.monotonic() + seconds
        stored = 0
        while (count is None or stored < count) and (deadline is None or time.monotonic() < deadline):
            if socket.poll(POLL_MS):
                try:
                    self.write(socket.recv_multipart(copy=False))
                    stored += 1
                except ValueError:
                    self.skipped += 1
        return stored

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_session(path: str | Path) -> Iterator[SessionRecord]:
    """Every complete record of a session file, in arrival order."""
    with open(path, "rb") as f:
        unpacker = msgpack.Unpacker(f, max_buffer_size=MAX_RECORD_BYTES)
        try:
            header = next(unpacker)
        except StopIteration:
            return
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} file")
        if header.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported session format version {header.get('version')}")
        for record in unpacker:
            yield SessionRecord(record["f"], record["rx"])


def _device_clock(frames: list[bytes]) -> tuple[str, int] | None:
    """(device, t_ns) from a header frame, or None when the header does not carry them."""
    try:
        header = msgpack.unpackb(frames[0])
        device, t_ns = header["device"], header["t_ns"]
    except (ValueError, TypeError, KeyError, IndexError, msgpack.UnpackException):
        return None
    return (device, t_ns) if isinstance(device, str) and type(t_ns) is int else None


class Replay:
    """Plays a session file back to an ingest endpoint, byte for byte."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def records(self) -> Iterator[SessionRecord]:
        return read_session(self.path)

    def play(
        self,
        endpoint: str,
        speed: float | None = 1.0,
        *,
        sndhwm: int = DEFAULT_SNDHWM,
        linger_ms: int = REPLAY_LINGER_MS,
        context: zmq.Context | None = None,
    ) -> int:
        """Send every record in file order; returns the number sent.

        Timing follows each device's own clock (`t_ns`), anchored at that device's first
        arrival so devices keep their relative offsets; records without a readable header
        follow their arrival time. `speed=None` sends as fast as possible. Sends block
        while the receiver is slow: nothing is dropped.
        """
        pacer = Pacer(speed)
        anchors: dict[str, int] = {}  # device -> (arrival - device clock) of its first message
        sock = connect_push(endpoint, sndhwm=sndhwm, linger_ms=linger_ms, context=context)
        sent = 0
        try:
            for record in self.records():
                clock = _device_clock(record.frames)
                if clock is None:
                    session_ns = record.rx_ns
                else:
                    device, t_ns = clock
                    session_ns = t_ns + anchors.setdefault(device, record.rx_ns - t_ns)
                pacer.wait(session_ns)
                sock.send_multipart(record.frames, copy=False)
                sent += 1
        finally:
            sock.close()
        return sent
