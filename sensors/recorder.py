"""Recordings: accepted messages into rotating MCAP files (sensors/mcap_format.py) without ever holding up the
caller, and replay of recordings over ZeroMQ.

`Recorder.put` only queues a message's frames (no copy) for a writer thread; when the queue is full (messages or
bytes) the message is left out of the recording and counted (`dropped_recording`): the caller's data path
never waits for a disk. The writer thread ends a chunk at `chunk_bytes` or `flush_s`, whichever comes first (so a
power cut loses at most that), begins a new file at `max_file_bytes` or `max_file_s`, and before each new file
deletes this recorder's oldest files beyond `max_total_bytes` and any older than `max_age_s`. A write that fails
(disk full, folder gone) abandons the file, readable up to its last chunk; messages are left out, counted
(`dropped_recording_error`), for `retry_s`, then a new file is tried.

`Replay` sends the wire frames of recordings to an ingest endpoint, in the order they were received (files that
overlap in time, one per ingest endpoint, are merged), paced by their receive times (`speed`) or as fast as the
receiver takes them; the device clocks travel unchanged in the headers, so the windows are the live run's.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, suppress
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

import zmq

from .clock import Pacer
from .mcap_format import (
    COMPRESSIONS,
    McapFileWriter,
    RecordedMessage,
    Recording,
    bindstream_version,
)
from .protocol import DEFAULT_LIMITS, VERSION, Limits, Rejected, SensorMessage, decode
from .publisher import DEFAULT_SNDHWM, connect_push, terminate

log = logging.getLogger(__name__)
MIB = 1 << 20
SUFFIX = ".mcap"
POLL_MS = 100  # how often `record` looks at its deadline
REPLAY_LINGER_MS = -1  # close() waits until the receiver has taken every message, like the blocking sends


@dataclass(frozen=True)
class RecordingSettings:
    """Bounds of a recording: `[recording]` in the pipeline's TOML file (`bindstream run --record DIR` turns it
    on), the defaults for `bindstream device record`."""

    max_file_bytes: int = 512 * MIB  # a new file is begun once a file is this large (it may pass it by a chunk)
    max_file_s: float = 3600.0  # ... or this old
    max_total_bytes: int = 20 * 1024 * MIB  # this recorder's files, the one being written counted at full size
    max_age_s: float = 7 * 86_400.0  # files older than this are deleted (0: whatever their age)
    chunk_bytes: int = 4 * MIB  # messages (uncompressed) per chunk, the unit a power cut loses at most
    flush_s: float = 2.0  # a chunk is written at least this often, however small
    fsync: bool = True  # each chunk on the disk once written (else in the page cache: a power cut may lose it)
    compression: str = "zstd"  # of each chunk: zstd, lz4 or none
    queue_messages: int = 10_000  # messages waiting for the writer; more are left out of the recording, counted
    queue_bytes: int = 256 * MIB  # ... and their bytes
    retry_s: float = 5.0  # after a failed write, how long messages are left out before a new file is tried

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("fsync", "compression"):
                continue
            zero_ok = f.name == "max_age_s"  # 0: no limit by age
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or value < 0 or (value == 0 and not zero_ok):
                raise ValueError(f"{f.name} must be a number {'of at least' if zero_ok else 'over'} 0, got {value!r}")
        if not isinstance(self.fsync, bool):
            raise ValueError(f"fsync must be true or false, got {self.fsync!r}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {self.compression!r}")
        if self.max_total_bytes < self.max_file_bytes:
            raise ValueError(f"max_total_bytes ({self.max_total_bytes}) must be at least max_file_bytes")


def _utc(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="microseconds")


class Recorder:
    """Records into `folder`, in files named `{tag}-{UTC time they began}-{n}.mcap` (oldest first by name). `source`
    says in each file's session metadata what was recorded. Counts, through `count(event, label, n)` (else in
    `counts`): `recorded`, `dropped_recording` (queue full) and `dropped_recording_error` (a write failed), per
    device; `recording_files` (files begun) and `recording_deleted` (by `max_total_bytes` or `max_age_s`)."""

    def __init__(
        self,
        folder: str | Path,
        settings: RecordingSettings,
        *,
        tag: str,
        source: str,
        count: Callable[[str, str, int], None] | None = None,
    ):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.settings, self.tag, self.source = settings, tag, source
        self.counts: Counter[str] = Counter()  # event -> n, when no `count` is given
        self._count = count or self._tally
        self._tally_lock = threading.Lock()
        self._queue: deque = deque()
        self._queued_bytes = 0
        self._ready = threading.Condition()
        self._closing = False
        self._file: McapFileWriter | None = None
        self._opened = self._flushed = 0.0  # time.monotonic() of the file's start, of its last chunk
        self._unflushed = False
        self._retry_at = 0.0
        self._files = 0
        self.session_ns = time.time_ns()
        self._thread = threading.Thread(target=self._run, name=f"recorder-{tag}", daemon=True)
        self._thread.start()

    def _tally(self, event: str, label: str = "", n: int = 1) -> None:
        with self._tally_lock:
            self.counts[event] += n

    def put(self, msg: SensorMessage, frames, rx_ns: int) -> bool:
        """Queue an accepted message (`msg` its decoded header, `frames` its two wire frames, kept as they are:
        bytes, memoryview or zmq.Frame) received at `rx_ns` (time.time_ns); False if it was left out."""
        nbytes = sum(memoryview(f).nbytes for f in frames)
        with self._ready:
            if (
                not self._closing
                and len(self._queue) < self.settings.queue_messages
                and self._queued_bytes + nbytes <= self.settings.queue_bytes
            ):
                self._queue.append((msg, frames, rx_ns, nbytes))
                self._queued_bytes += nbytes
                self._ready.notify()
                return True
        self._count("dropped_recording", msg.device, 1)
        return False

    def record(
        self,
        socket: zmq.Socket,
        *,
        seconds: float | None = None,
        count: int | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> int:
        """Record what a bound PULL socket accepts (valid by `limits`; the rest counted `rejected_{reason}` per
        device) until `seconds` pass or `count` messages were accepted; returns how many were."""
        deadline = None if seconds is None else time.monotonic() + seconds
        accepted = 0
        while (count is None or accepted < count) and (deadline is None or time.monotonic() < deadline):
            if not socket.poll(POLL_MS):
                continue
            frames = socket.recv_multipart(copy=False)
            try:
                msg = decode(frames, limits)
            except Rejected as err:
                self._count(f"rejected_{err.reason}", err.device or "unknown", 1)
                continue
            self.put(msg, frames, time.time_ns())
            accepted += 1
        return accepted

    def close(self) -> None:
        """Write what is queued, end the file (its summary makes it seekable), stop the thread."""
        with self._ready:
            self._closing = True
            self._ready.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._ready:
                if not self._queue and not self._closing:
                    self._ready.wait(self.settings.flush_s)
                item = self._queue.popleft() if self._queue else None
                if item:
                    self._queued_bytes -= item[3]
                elif self._closing:
                    break
            if item:
                self._write(*item[:3])
            self._maintain()
        if self._file:
            self._end_file()

    def _write(self, msg: SensorMessage, frames, rx_ns: int) -> None:
        if self._file is None and time.monotonic() < self._retry_at:
            self._count("dropped_recording_error", msg.device, 1)
            return
        try:
            if self._file is None:
                self._begin_file()
            assert self._file is not None
            self._file.write(msg, frames, rx_ns)
        except OSError as err:
            self._fail(err)
            self._count("dropped_recording_error", msg.device, 1)
            return
        self._unflushed = True
        self._count("recorded", msg.device, 1)

    def _maintain(self) -> None:
        """Write the chunk being filled once `flush_s` old; end the file once it is large or old enough."""
        if self._file is None:
            return
        now = time.monotonic()
        try:
            if self._unflushed and now - self._flushed >= self.settings.flush_s:
                self._file.flush()
                if self.settings.fsync:
                    os.fsync(self._file.fileno())
                self._flushed, self._unflushed = now, False
            if self._file.size() >= self.settings.max_file_bytes or now - self._opened >= self.settings.max_file_s:
                self._end_file()
        except OSError as err:
            self._fail(err)

    def _begin_file(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)  # again: it may have been removed meanwhile
        self._apply_retention()
        now_ns = time.time_ns()
        stamp = datetime.fromtimestamp(now_ns / 1e9, UTC).strftime("%Y%m%dT%H%M%S%fZ")
        session = {
            "bindstream_version": bindstream_version(),
            "protocol_version": str(VERSION),
            "source": self.source,
            "tag": self.tag,
            "session_start": _utc(self.session_ns),
            "session_start_ns": str(self.session_ns),
            "file_index": str(self._files),
            "file_start": _utc(now_ns),
            "file_start_ns": str(now_ns),
        }
        path = self.folder / f"{self.tag}-{stamp}-{self._files:04d}{SUFFIX}"
        self._file = McapFileWriter(
            path, session, chunk_bytes=self.settings.chunk_bytes, compression=self.settings.compression
        )
        self._files += 1
        self._opened = self._flushed = time.monotonic()
        self._count("recording_files", "", 1)

    def _end_file(self) -> None:
        file, self._file = self._file, None
        assert file is not None
        try:
            file.close()
            if self.settings.fsync:
                fsync_path(file.path)
        except OSError as err:
            self._fail(err)

    def _fail(self, err: OSError) -> None:
        """Abandon the file being written (readable up to its last chunk); try a new one after `retry_s`."""
        log.warning(
            "recording to %s failed: %s; messages are left out for %g s", self.folder, err, self.settings.retry_s
        )
        if self._file is not None:
            with suppress(OSError, ValueError):  # the writer may be half way through a record
                self._file.close()
        self._file = None
        self._retry_at = time.monotonic() + self.settings.retry_s

    def _apply_retention(self) -> None:
        """Delete this recorder's files older than `max_age_s`, then the oldest until, with a new file at
        `max_file_bytes`, they fit in `max_total_bytes`."""
        budget = self.settings.max_total_bytes - self.settings.max_file_bytes
        files = []
        for path in sorted(self.folder.glob(f"{self.tag}-*{SUFFIX}")):  # by name: oldest first
            with suppress(FileNotFoundError):
                files.append((path, path.stat()))
        total = sum(stat.st_size for _, stat in files)
        now = time.time()
        for path, stat in files:
            too_old = self.settings.max_age_s and now - stat.st_mtime > self.settings.max_age_s
            if too_old or total > budget:
                with suppress(FileNotFoundError):
                    path.unlink()
                    self._count("recording_deleted", "", 1)
                total -= stat.st_size


def fsync_path(path: Path) -> None:
    """Flush the file or folder at `path` to the disk (a folder: the names in it), so that a power cut keeps it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recording_files(paths: Iterable[str | Path]) -> list[Path]:
    """The files named, and the `.mcap` files in (and below) the folders named."""
    out: list[Path] = []
    for path in map(Path, paths):
        out += sorted(path.rglob(f"*{SUFFIX}")) if path.is_dir() else [path]
    return out


class Replay:
    """Plays recordings (MCAP files, or folders of them) back to an ingest endpoint, byte for byte. After a
    play, `truncated` lists the files that ended before their footer (a power cut): their complete chunks were
    sent."""

    def __init__(self, paths: Iterable[str | Path]):
        self.files = recording_files(paths)
        self.truncated: list[Path] = []

    def messages(self) -> Iterator[RecordedMessage]:
        """Every message in the order received: each file's in its order, files merged by receive time (a file
        is opened once the merge reaches its first message, so only files that overlap are open at once)."""
        self.truncated = []
        starts = []
        for path in self.files:
            recording = Recording(path)
            with closing(recording.messages()) as messages:
                first = next(messages, None)
            if first is not None:
                starts.append((first.rx_ns, str(path)))
            elif not recording.complete:
                self.truncated.append(path)
        waiting = deque(sorted(starts))
        heap: list = []
        order = itertools.count()  # ties go to the file begun first

        def advance(recording: Recording, messages: Iterator[RecordedMessage]) -> None:
            message = next(messages, None)
            if message is not None:
                heapq.heappush(heap, (message.rx_ns, next(order), message, recording, messages))
            elif not recording.complete:
                self.truncated.append(recording.path)

        while waiting or heap:
            while waiting and (not heap or waiting[0][0] <= heap[0][0]):
                recording = Recording(waiting.popleft()[1])
                advance(recording, recording.messages())
            if heap:
                _, _, message, recording, messages = heapq.heappop(heap)
                yield message
                advance(recording, messages)

    def play(
        self,
        endpoint: str,
        speed: float | None = 1.0,
        *,
        sndhwm: int = DEFAULT_SNDHWM,
        linger_ms: int = REPLAY_LINGER_MS,
        context: zmq.Context | None = None,
    ) -> int:
        """Send every message; returns the number sent. Paced by the receive times at `speed` (the first message
        at once); `speed=None` as fast as the receiver takes them. Sends block while the receiver is slow, and it
        returns once the receiver has taken the last one (`linger_ms`): nothing is dropped."""
        pacer = Pacer(speed)
        own = zmq.Context() if context is None else None  # terminated at the end: that waits for the queue
        sock = connect_push(endpoint, sndhwm=sndhwm, linger_ms=linger_ms, context=context or own)
        sent = 0
        try:
            for message in self.messages():
                pacer.wait(message.rx_ns)
                sock.send_multipart(message.frames, copy=False)
                sent += 1
        except BaseException:  # an error or Ctrl-C: do not wait for the queue
            sock.close(linger=0)
            raise
        finally:
            sock.close()  # a no-op after close(linger=0)
            if own is not None:
                terminate(own)  # ZeroMQ's close returns at once; until this, the queue's tail may still be unsent
        return sent
