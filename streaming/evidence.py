"""Evidence: what a device sent around an event, kept where the windows are cut (ALERTS.md, "Evidence").

Each windowing actor keeps the messages its windows are cut from in a `RawBuffer` (frames: those a window
samples, the only ones ingest forwards with their pixels). Its `EvidenceWriter` listens to the alerts
channel and, for events of the devices in that buffer, writes the media into the event's evidence hash
(`bindstream:evidence:{event}`, encoded as streaming/redis_layout.py says): on `start` from the opening
window's t0 less `preroll_s` to its t1; on `update` and `end` what came after what it wrote, up to the
entry's t1. What is no longer buffered is listed in `missing`, never an error.

Windowing never waits for Redis: one thread takes each alert's media from the buffer as it arrives (before
it ages out) and queues the write; another writes, retrying with backoff while Redis is away. The queue
holds at most `queue_bytes`; a write that does not fit is dropped and counted.

Counts (the windowing stage's, per device unless said): `evidence_evicted` (buffered messages cut by the
byte or device bound), `evidence_missing` (per event and kind), `evidence_truncated` (events that reached
`evidence_max_bytes`), `evidence_dropped` (writes the full queue refused), `evidence_written`,
`evidence_failed` (writes Redis refused: wrong key type, out of memory), `evidence_error` (an alert whose
evidence met a bug), `evidence_rejected` (alerts that do not decode, no label), `evidence_redis_error` (no
label).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import numpy as np
import redis

from sensors.protocol import IMU, IMU_COLUMNS, MIC, NS_PER_S, SensorMessage

from .records import text
from .redis_access import connect
from .redis_layout import (
    ALERTS_CHANNEL,
    ALERTS_STREAM,
    AUDIO_CHANNELS,
    AUDIO_PCM,
    AUDIO_RATE,
    AUDIO_T0,
    END,
    EVIDENCE_FIELD,
    IMU_CSV,
    MISSING,
    START,
    UPDATE,
    Alert,
    event_key,
    evidence_key,
    evidence_kind,
    frame_field,
    id_tuple,
    npy_bytes,
    pcm16,
)
from .retry import Backoff

log = logging.getLogger(__name__)
MIB = 1 << 20
# the order an event's media is added in: when `evidence_max_bytes` cuts, the large depth frames go first
WRITE_ORDER = (MIC, IMU, "camera", "thermal", "depth")
ITEM_OVERHEAD_BYTES = 256  # a buffered message's Python objects besides its payload (tracemalloc: ~250 bytes)
POLL_S = 0.2  # longest wait for an alert or a queued write before looking at the stop flag again
SETTING_TYPES = {  # a setting's annotation: the types its values may have (bool is no int here), in words
    "bool": ((bool,), "true or false"),
    "int": ((int,), "an integer"),
    "float": ((int, float), "a number"),
}

# One write of an event's evidence. KEYS: evidence hash, event hash. ARGV: TTL s, the event hash's evidence
# field, the number n of appends, n (field, bytes) pairs appended to hash fields (Redis has no APPEND for
# those), then field/value pairs to set. The TTL is renewed, and the event (if it exists) points to the hash.
WRITE_EVIDENCE = """
local key, event = KEYS[1], KEYS[2]
local i = 4
for _ = 1, tonumber(ARGV[3]) do
  redis.call('HSET', key, ARGV[i], (redis.call('HGET', key, ARGV[i]) or '') .. ARGV[i + 1])
  i = i + 2
end
if i <= #ARGV then
  redis.call('HSET', key, unpack(ARGV, i))
end
if redis.call('EXISTS', key) == 1 then
  redis.call('EXPIRE', key, ARGV[1])
  if redis.call('EXISTS', event) == 1 then
    redis.call('HSET', event, ARGV[2], key)
  end
end
return i
"""


@dataclass(frozen=True)
class EvidenceSettings:
    """The raw buffer's bounds and the evidence writer's (the pipeline's [evidence] table); checked when built.
    Memory: at most `max_devices * buffer_bytes` buffered and `queue_bytes` queued per windowing actor."""

    enabled: bool = True  # keep raw messages and write evidence; off: neither buffer nor writer
    buffer_s: float = 30.0  # device time kept per sensor of a device, back from its newest message
    buffer_bytes: int = 16 * MIB  # per device; beyond, its oldest messages go (evidence_evicted)
    max_devices: int = 64  # devices buffered per windowing actor; beyond, the least recently seen goes
    preroll_s: float = 2.0  # media kept from before the window that opened an event
    evidence_max_bytes: int = 8 * MIB  # per event; beyond, nothing more is added (evidence_truncated)
    evidence_ttl_s: int = 7 * 86_400  # an evidence hash expires this long after its last write
    queue_bytes: int = 32 * MIB  # media waiting for Redis; a write that does not fit is dropped (evidence_dropped)
    max_events: int = 1024  # open events whose progress is remembered; a forgotten one is written afresh
    catch_up_count: int = 256  # alerts entries per XRANGE when catching up after the channel was lost
    retry_max_s: float = 5.0  # longest wait between tries while Redis is away
    redis_timeout_s: float = 5.0  # connecting and each command

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            kinds, words = SETTING_TYPES[str(f.type)]
            if type(value) not in kinds:
                raise ValueError(f"{f.name} must be {words}, got {value!r}")
            if f.type != "bool" and (value < 0 or (value == 0 and f.name != "preroll_s")):
                least = "at least 0" if f.name == "preroll_s" else "above 0"
                raise ValueError(f"{f.name} must be {least}, got {value}")


def _end(msg: SensorMessage) -> int:
    """The time (exclusive) before which a message's data lies: a chunk's end, a frame's time + 1 ns."""
    return msg.end_ns() if msg.rate is not None else msg.t_ns + 1


def _size(msg: SensorMessage) -> int:
    return msg.nbytes + ITEM_OVERHEAD_BYTES


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class SensorBuffer:
    """One sensor of one device: its messages of one session, in time order."""

    epoch: int
    items: deque[SensorMessage] = field(default_factory=deque)
    cut_ns: int | None = None  # data before this device time was buffered and is gone


class RawBuffer:
    """The messages windows are cut from, as received, per device: each sensor's last `buffer_s` of device time
    (back from its own newest message), at most `buffer_bytes` per device (its oldest message goes first) and
    `max_devices` devices (the least recently seen goes). The byte and device bounds count what they cut as
    `evidence_evicted`; ageing out of `buffer_s` is the buffer's purpose, not a drop, and is not counted. A new
    session of a sensor (its device restarted: the clock may repeat) starts its buffer afresh. Thread-safe:
    the windowing thread adds, the evidence writer takes."""

    def __init__(self, settings: EvidenceSettings, count: Callable[[str, str, int], None]):
        self.settings = settings
        self.count = count
        self.devices: OrderedDict[str, dict[str, SensorBuffer]] = OrderedDict()  # least recently seen first
        self.bytes: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, msg: SensorMessage, epoch: int = 0) -> None:
        """Keep a message of session `epoch` of its sensor (Windower's `keep` hook)."""
        # the payload is a view of Ray's received buffer: keep a copy, so the buffer can be let go
        msg = replace(msg, payload=msg.payload.copy())
        with self._lock:
            sensors = self.devices.get(msg.device)
            if sensors is None:
                if len(self.devices) >= self.settings.max_devices:
                    gone, old = self.devices.popitem(last=False)
                    del self.bytes[gone]
                    self.count("evidence_evicted", gone, sum(len(b.items) for b in old.values()))
                sensors = self.devices[msg.device] = {}
                self.bytes[msg.device] = 0
            self.devices.move_to_end(msg.device)
            buffer = sensors.get(msg.sensor)
            if buffer is None or buffer.epoch != epoch:
                if buffer is not None:
                    self.bytes[msg.device] -= sum(map(_size, buffer.items))
                buffer = sensors[msg.sensor] = SensorBuffer(epoch)
            buffer.items.append(msg)
            self.bytes[msg.device] += _size(msg)
            horizon = msg.end_ns() - round(self.settings.buffer_s * NS_PER_S)
            while _end(buffer.items[0]) <= horizon:
                self._cut(msg.device, buffer)
            while self.bytes[msg.device] > self.settings.buffer_bytes:
                oldest = min((b for b in sensors.values() if b.items), key=lambda b: b.items[0].t_ns)
                self._cut(msg.device, oldest)
                self.count("evidence_evicted", msg.device, 1)

    def _cut(self, device: str, buffer: SensorBuffer) -> None:
        msg = buffer.items.popleft()
        self.bytes[device] -= _size(msg)
        buffer.cut_ns = max(buffer.cut_ns or 0, _end(msg))

    def sensors(self, device: str) -> list[str]:
        """The sensors buffered for `device` (none: it is not a device of this windowing actor, or went)."""
        with self._lock:
            return list(self.devices.get(device, {}))

    def take(self, device: str, sensor: str, lo: int, hi: int) -> tuple[list[SensorMessage], bool]:
        """(the messages of a device's sensor with data in [lo, hi) device ns, in time order; whether some data
        of [lo, hi) was buffered once and is gone)."""
        with self._lock:
            buffer = self.devices.get(device, {}).get(sensor)
            if buffer is None or hi <= lo:
                return [], False
            items = [m for m in buffer.items if _end(m) > lo and m.t_ns < hi]
            return items, buffer.cut_ns is not None and lo < buffer.cut_ns

    def nbytes(self) -> int:
        with self._lock:
            return sum(self.bytes.values())


@dataclass
class Progress:
    """What has been written for one event."""

    until_ns: int  # frames and IMU rows are written up to this device time (exclusive)
    audio_t0_ns: int | None = None  # audio.pcm's first sample; None: no audio written yet
    audio_format: tuple[int, int] = (0, 0)  # (rate, channels) of audio.pcm
    audio_frames: int = 0  # sample frames in audio.pcm
    imu_started: bool = False
    nbytes: int = 0
    full: bool = False  # reached evidence_max_bytes: nothing more is added
    missing: set[str] = field(default_factory=set)

    def audio_end_ns(self) -> int:
        """The device time of the next sample."""
        assert self.audio_t0_ns is not None  # asked only once audio was written
        return self.audio_t0_ns + _ceil_div(self.audio_frames * NS_PER_S, self.audio_format[0])


@dataclass
class Write:
    """One call of WRITE_EVIDENCE."""

    device: str
    event: str
    appends: list[tuple[str, bytes]] = field(default_factory=list)
    fields: dict[str, bytes | str | int] = field(default_factory=dict)
    nbytes: int = 0  # set when queued

    def args(self, ttl_s: int) -> list:
        args: list = [ttl_s, EVIDENCE_FIELD, len(self.appends)]
        for name, value in [*self.appends, *self.fields.items()]:
            args += [name, value]
        return args


class EvidenceWriter:
    """Owns a RawBuffer and two daemon threads: the listener (alerts channel -> planned writes) and the writer
    (queue -> Redis). `count` is the stage's `StageMetrics.count` (or a `Counts.add`)."""

    def __init__(self, settings: EvidenceSettings, redis_url: str, count: Callable[[str, str, int], None]):
        self.settings = settings
        self.count = count
        self.buffer = RawBuffer(settings, count)
        self.client = connect(
            redis_url, socket_timeout=settings.redis_timeout_s, socket_connect_timeout=settings.redis_timeout_s
        )
        self.script = self.client.register_script(WRITE_EVIDENCE)
        self.events: OrderedDict[str, Progress] = OrderedDict()  # open events, least recently written first
        self.last_id: str | None = None  # the last alerts entry taken: a lost channel catches up from it
        self.queue: deque[Write] = deque()
        self.queued_bytes = 0
        self.cond = threading.Condition()
        self.reported: set[str] = set()  # kinds of refused writes already logged (later ones are only counted)
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._listen, name="evidence-listen", daemon=True),
            threading.Thread(target=self._write, name="evidence-write", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """End both threads (what is queued is not written)."""
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def stats(self) -> dict:
        with self.cond:
            queued = self.queued_bytes
        return {"evidence_buffer_bytes": self.buffer.nbytes(), "evidence_queue_bytes": queued}

    # ----- listening -----

    def _listen(self) -> None:
        """Take alerts from the channel; after losing it, subscribe again and read what was missed from the
        alerts stream."""
        backoff = Backoff(self.settings.retry_max_s)
        pubsub = None
        while not self._stop.is_set():
            try:
                if pubsub is None:
                    pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(ALERTS_CHANNEL)
                    self._catch_up()
                message = pubsub.get_message(timeout=POLL_S)
                if message is not None:
                    self._take_message(message["data"])
                backoff.reset()
            except redis.RedisError:
                self.count("evidence_redis_error", "", 1)
                if pubsub is not None:
                    pubsub.close()
                pubsub = None
                backoff.wait(self._stop)
        if pubsub is not None:
            pubsub.close()

    def _catch_up(self) -> None:
        """The alerts entries after `last_id` (none before the first one taken: a new actor has nothing
        buffered for older events)."""
        while self.last_id is not None:
            entries = self.client.xrange(ALERTS_STREAM, min=f"({self.last_id}", count=self.settings.catch_up_count)
            if not entries:
                return
            for entry_id, raw in entries:
                self._take_alert(entry_id, raw)
                self.last_id = text(entry_id)  # also past an entry that does not decode

    def _take_message(self, data) -> None:
        try:
            raw = json.loads(data)
            entry_id = raw.pop("id")
        except (ValueError, TypeError, KeyError, AttributeError):
            self.count("evidence_rejected", "", 1)
            return
        self._take_alert(entry_id, raw)

    def _take_alert(self, entry_id, raw: dict) -> None:
        try:
            alert = Alert.from_entry(entry_id, raw)
            taken = id_tuple(alert.id)
            if alert.state not in (START, UPDATE, END) or not alert.event or alert.t1 < alert.t0:
                raise ValueError(f"state {alert.state!r}, event {alert.event!r}, t0 {alert.t0}, t1 {alert.t1}")
        except (ValueError, TypeError, KeyError):
            self.count("evidence_rejected", "", 1)
            return
        if self.last_id is not None and taken <= id_tuple(self.last_id):
            return  # seen live and again while catching up
        self.last_id = alert.id
        sensors = self.buffer.sensors(alert.device)
        if not sensors:
            return  # another windowing actor's device
        try:
            self._plan(alert, sensors)
        except Exception:  # a bug met by one alert: its evidence is lost, not the writer
            log.exception("planning the evidence of event %s failed", alert.event)
            self.count("evidence_error", alert.device, 1)

    # ----- planning a write -----

    def _plan(self, alert: Alert, sensors: list[str]) -> None:
        """Take the event's new media from the buffer and queue its write."""
        progress = self.events.pop(alert.event, None)
        if progress is None:
            progress = Progress(alert.t0 - round(self.settings.preroll_s * NS_PER_S))
        write = Write(alert.device, alert.event)
        missing = len(progress.missing)
        for sensor in sorted(sensors, key=WRITE_ORDER.index):
            lo = progress.audio_end_ns() if sensor == MIC and progress.audio_t0_ns is not None else progress.until_ns
            messages, gone = self.buffer.take(alert.device, sensor, lo, alert.t1)
            kind = evidence_kind(sensor)
            if gone and kind not in progress.missing:
                progress.missing.add(kind)
                self.count("evidence_missing", alert.device, 1)
            if progress.full:
                continue
            if messages and sensor == MIC:
                self._add_audio(write, progress, messages, alert.t1)
            elif messages and sensor == IMU:
                self._add_imu(write, progress, messages, lo, alert.t1)
            elif messages:
                for msg in messages:
                    value = msg.payload.tobytes() if msg.encoding in ("jpeg", "png") else npy_bytes(msg.payload)
                    if self._fits(progress, len(value), alert.device):
                        write.fields[frame_field(sensor, msg.t_ns, msg.encoding)] = value
        progress.until_ns = max(progress.until_ns, alert.t1)
        if len(progress.missing) > missing:
            write.fields[MISSING] = ",".join(sorted(progress.missing))
        if alert.state != END:
            self.events[alert.event] = progress
            while len(self.events) > self.settings.max_events:
                self.events.popitem(last=False)
        if write.appends or write.fields:
            self._enqueue(write)

    def _fits(self, progress: Progress, nbytes: int, device: str) -> bool:
        """Whether `nbytes` more keep the event within evidence_max_bytes (taken if so); once not, none do."""
        if not progress.full and progress.nbytes + nbytes <= self.settings.evidence_max_bytes:
            progress.nbytes += nbytes
            return True
        if not progress.full:
            progress.full = True
            self.count("evidence_truncated", device, 1)
        return False

    def _add_audio(self, write: Write, progress: Progress, chunks: list[SensorMessage], t1: int) -> None:
        """Append the samples from the end of audio.pcm (or, first, from the first sample at or after the
        event's start) to t1, as one timeline: a hole, or a chunk of another format, stays silent."""
        first = progress.audio_t0_ns is None
        if first:
            rate, channels = chunks[0].rate, chunks[0].channels
            assert rate and channels  # mic messages always carry both (sensors/protocol.py)
            skip = max(0, _ceil_div((progress.until_ns - chunks[0].t_ns) * rate, NS_PER_S))
            t0, done = chunks[0].t_ns + skip * NS_PER_S // rate, 0
        else:
            assert progress.audio_t0_ns is not None
            (rate, channels), t0, done = progress.audio_format, progress.audio_t0_ns, progress.audio_frames
        # up to t1, and no further than what is buffered: silence is only ever put between samples
        total = min(_ceil_div((t1 - t0) * rate, NS_PER_S), round((chunks[-1].end_ns() - t0) * rate / NS_PER_S))
        if total <= done:
            return
        pcm = np.zeros((total - done, channels), "<i2")
        for chunk in chunks:
            if (chunk.rate, chunk.channels) == (rate, channels):
                at = round((chunk.t_ns - t0) * rate / NS_PER_S) - done
                samples = pcm16(chunk.payload)
                a, b = max(at, 0), min(at + len(samples), len(pcm))
                if a < b:
                    pcm[a:b] = samples[a - at : b - at]
        value = pcm.tobytes()
        if not self._fits(progress, len(value), write.device):
            return
        if first:
            progress.audio_t0_ns, progress.audio_format = t0, (rate, channels)
            write.fields.update({AUDIO_PCM: value, AUDIO_RATE: rate, AUDIO_CHANNELS: channels, AUDIO_T0: t0})
        else:
            write.appends.append((AUDIO_PCM, value))
        progress.audio_frames = total

    def _add_imu(self, write: Write, progress: Progress, chunks: list[SensorMessage], lo: int, hi: int) -> None:
        """The rows in [lo, hi) as csv lines (the header first)."""
        lines = [] if progress.imu_started else [",".join(("t_ns", *IMU_COLUMNS))]
        for chunk in chunks:
            assert chunk.rate  # IMU messages always carry it (sensors/protocol.py)
            for j, row in enumerate(chunk.payload.tolist()):
                t = chunk.t_ns + j * NS_PER_S // chunk.rate  # Python ints: no overflow near the clock's end
                if lo <= t < hi:
                    lines.append(",".join([str(t), *(f"{v:.9g}" for v in row)]))  # 9 digits: float32 exactly
        value = ("\n".join(lines) + "\n").encode()
        if len(lines) == (0 if progress.imu_started else 1) or not self._fits(progress, len(value), write.device):
            return
        if progress.imu_started:
            write.appends.append((IMU_CSV, value))
        else:
            write.fields[IMU_CSV] = value
            progress.imu_started = True

    def _enqueue(self, write: Write) -> None:
        values = [v for _, v in write.appends] + list(write.fields.values())
        write.nbytes = sum(len(v) if isinstance(v, bytes) else len(str(v)) for v in values)
        with self.cond:
            if self.queued_bytes + write.nbytes > self.settings.queue_bytes:
                self.count("evidence_dropped", write.device, 1)
                self.events.pop(write.event, None)  # its next entry writes the event afresh
                return
            self.queue.append(write)
            self.queued_bytes += write.nbytes
            self.cond.notify()

    # ----- writing -----

    def _write(self) -> None:
        """Write the queued writes in order; while Redis is away, wait and try the same write again. A write
        Redis refuses (a key of another type, no memory left) is dropped, counted as `evidence_failed`."""
        backoff = Backoff(self.settings.retry_max_s)
        while not self._stop.is_set():
            with self.cond:
                if not self.queue:
                    self.cond.wait(POLL_S)
                    continue
                write = self.queue[0]
            try:
                keys = [evidence_key(write.event), event_key(write.event)]
                self.script(keys=keys, args=write.args(self.settings.evidence_ttl_s))
                self.count("evidence_written", write.device, 1)
            except redis.ResponseError as err:
                self.count("evidence_failed", write.device, 1)
                if type(err).__name__ not in self.reported:
                    self.reported.add(type(err).__name__)
                    log.warning("Redis refused the evidence of event %s: %s", write.event, str(err)[:200])
            except redis.RedisError:
                self.count("evidence_redis_error", "", 1)
                backoff.wait(self._stop)
                continue
            backoff.reset()
            with self.cond:
                self.queue.popleft()
                self.queued_bytes -= write.nbytes
