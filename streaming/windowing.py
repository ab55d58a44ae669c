"""Cut each device's sensor streams into the paper's windows, on the device clock.

Windows lie on a grid shared by every sensor of a device: window k of a modality covers
[k * hop, k * hop + length) in device ns, so vision, audio, depth and thermal windows of the same moment
have identical bounds (which is what `fused` embeddings combine). A window is cut as soon as the stream
has data up to its end; the first window is the first grid point at or after the stream's first data.

Per message, in order:
- a message that does not continue its stream is held until the stream's next message. Why it does not:
  `seq` back at 0 after a higher one, or more than `seq_replay_window` below the last one
  (`device_restart`); `seq` more than `max_seq_jump` ahead (`seq_jump`), or more than `seq_confirm_gap`
  ahead (`seq_skip`: confirmed, the stream goes on and counts the messages lost); time more than
  `max_clock_jump_ns` away from the stream's, either way (`clock_jump`); `seq` not above the last one
  (`seq_replay`: a duplicate, or a restart whose first message was lost); time going backwards, or a
  chunk overlapping the previous one (`clock_backwards`). If the next message follows the held one (next
  `seq`, at most a clock jump later), the device really started anew: a new session starts with both
  messages, with the next `epoch` (which keeps its windows apart from the old session's). If not, the
  held message was a lone outlier (a duplicate, or spoofed or corrupt) and is dropped. Either way the
  reason is counted once, when the next message (or the drain) settles it, and `seq_lost` never counts
  across a new session. So one bad message costs a stream nothing but itself, and a restart loses no
  message. (What forged messages can still do without CurveZMQ: SECURITY.md.)
- `seq` jumping ahead: the missing messages are counted as `seq_lost` and the message is kept.
- a hole in the data (a chunk starting after the previous one ended, or frames further apart than
  `max_frame_gap_ns`), or a change of a chunk's rate, channels or dtype (`format_change`): every window
  that would contain it is dropped (`gap`).

What each window holds:
- vision: 2 frames sampled uniformly: the first frames at or after the centres of the window's two
  halves (t0 + 0.5 s and t0 + 1.5 s), 3 x 2 x 224 x 224, resized and cropped but as 8-bit RGB levels (uint8,
  a quarter of float32's bytes: the encoder normalises them); a large JPEG is decoded at a fraction of its size
  (`jpeg_min_side`).
- depth, thermal: the first frame at or after the window's middle (t0 + 1 s), 1 x 224 x 224.
Since a frame's use follows from its time alone, ingest forwards only the pixels of frames some window
samples (`WindowingConfig.frame_sampling`), and devices may leave the others' pixels out themselves (omitted
frames, PROTOCOL.md); those travel as timestamps, which the checks above still see.
- audio: the window's samples, resampled to 16 kHz, 128-bin log-mel, 1 x 128 x 204; and their loudness
  (`Window.dbfs`, RMS in dBFS, see `rms_dbfs`), which a query's `min_dbfs` gate reads.
- imu: the window's rows resampled to 2000 steps, 6 x 2000.
Where the embedders have a GPU (`preprocess_on`), vision, depth, thermal and audio windows carry their media
instead (`Window.raw`): the sampled frames (JPEG as sent, other images decoded to pixels; depth and thermal
frames of integers as sent, of floats converted per pixel) or the samples, checked here as for preprocessing;
the embedder decodes, resizes, resamples and makes the fbank on its device, batched
(encoders/batch_transforms.py). A window whose media fail there is lost alone, counted by the embedder
(`preprocess_error`).

A device's messages and windows are metered: each device may spend `device_cpu_share` seconds of this
stage's CPU per second (bursts up to `device_cpu_burst_s`); beyond, its messages and windows are dropped
unprocessed (`throttled`) until its allowance has refilled, so neither costly data nor a flood of messages
from one device can starve the others. An error while cutting a window loses
that window only (`bad_data`, or `preprocess_error` for anything unexpected), never the stream or
another device's data. A camera frame that two windows sample is decoded once.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from encoders import batch_transforms, transforms
from sensors.protocol import NS_PER_S, TOO_COSTLY, Rejected, SensorMessage, decode_image
from sensors.sampling import FrameSampling

from .evidence import EvidenceSettings, EvidenceWriter
from .gating import Gate, GatingSettings
from .records import FRAME_SENSORS, MIN_DBFS, NO_DATA, SENSOR_MODALITY, STREAMS, RawInput, Window
from .stage import Downstream, StageMetrics

SECOND = NS_PER_S
SEQ_SKIP = "seq_skip"  # a message far ahead in `seq` not (yet) confirmed by the next one
WindowData = tuple[np.ndarray | RawInput, float | None]  # a window's model input or raw media, its loudness (audio)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WindowSpec:
    length_ns: int
    hop_ns: int


@dataclass(frozen=True)
class WindowingConfig:
    """Window lengths and hops per modality, and the tolerances of the stream checks."""

    vision: WindowSpec = WindowSpec(2 * SECOND, 1 * SECOND)  # also depth and thermal (their `cadence`)
    audio: WindowSpec = WindowSpec(2 * SECOND, 1 * SECOND)
    imu: WindowSpec = WindowSpec(5 * SECOND, SECOND * 5 // 2)
    max_frame_gap_ns: int = 250_000_000  # frames further apart than this leave a hole
    clock_tolerance_ns: int = 1_000_000  # jitter allowed where chunks meet and where a window ends
    max_streams: int = 10_000  # (device, sensor) pairs one windower keeps; beyond, the least recent goes
    seq_replay_window: int = 1024  # a `seq` this far below the last one is a replay; further, a restart
    max_seq_jump: int = 1 << 20  # messages a device may lose (counted) before a jump means a new session
    seq_confirm_gap: int = 64  # a `seq` further ahead than this waits for the next message to confirm it
    max_clock_jump_ns: int = 10 * SECOND  # a jump in time beyond this, either way, starts a new session
    device_cpu_share: float = 0.25  # CPU seconds per second of this stage one device may use
    device_cpu_burst_s: float = 0.5  # ... and how much of it at once (a legitimate window costs ~0.05 s)
    # a JPEG frame is decoded at 1/2, 1/4 or 1/8 of its size (in libjpeg's inverse DCT: a fraction of the work)
    # while its short side keeps this many pixels, twice the model's 224: the resize to 224 then makes the same
    # input as from the whole frame within mean abs 0.006 (tests/test_windowing.py); 0: always decoded whole
    jpeg_min_side: int = 2 * transforms.IMAGE_SIZE

    def spec(self, modality: str) -> WindowSpec:
        return getattr(self, STREAMS[modality].cadence)

    def frame_sampling(self) -> dict[str, FrameSampling]:
        """Per frame sensor, the moments whose frames windows take (ingest drops the pixels of the other
        frames; a device may leave them out: sensors/sampling.py), and the largest gap between frames, within
        which a device may skip frames altogether. A frame counts as lasting until the next one is due, so with
        frames up to that gap apart a window can be cut up to that long before its end: skipping is offered only
        where every moment lies at least that long before its window's end (so its frame has come by then)."""
        out = {}
        for sensor in FRAME_SENSORS:
            spec = self.spec(SENSOR_MODALITY[sensor])
            offsets = frame_sample_offsets(sensor, spec)
            reach = self.max_frame_gap_ns + self.clock_tolerance_ns
            safe = all(spec.length_ns - offset >= reach for offset in offsets)
            out[sensor] = FrameSampling(spec.hop_ns, offsets, self.max_frame_gap_ns if safe else None)
        return out


def _ceil_to(t: int, step: int) -> int:
    return -(-t // step) * step


def frame_sample_offsets(sensor: str, spec: WindowSpec) -> tuple[int, ...]:
    """Offsets from a window's start of the moments whose frames it takes."""
    if sensor == "camera":  # the centres of n equal parts, as `transforms.uniform_indices` picks frames
        n = transforms.VIDEO_FRAMES
        return tuple((2 * i + 1) * spec.length_ns // (2 * n) for i in range(n))
    return (spec.length_ns // 2,)


@dataclass
class SensorStream:
    """One device's sensor: buffered messages and the next window to cut."""

    sensor: str
    spec: WindowSpec
    items: deque = field(default_factory=deque)  # SensorMessage, in time order
    last_seq: int | None = None
    last_t: int | None = None
    end_ns: int | None = None  # time up to which the stream has data
    next_t0: int | None = None
    format: tuple | None = None  # (rate, channels, dtype) of the chunks buffered
    epoch: int = 0  # sessions of this stream: +1 each time the device restarts
    frames: dict = field(default_factory=dict)  # t_ns -> preprocessed frame (None: undecodable), for reuse
    held: tuple[SensorMessage, str] | None = None  # a message that jumped, and why, until the next one


def _format(msg: SensorMessage) -> tuple:
    return (msg.rate, msg.channels, msg.dtype)


class CpuAllowance:
    """Token buckets of CPU seconds, one per device: refilled at `share` seconds per second up to `burst`.
    Only the `max_devices` most recently seen are kept (a device seen again after eviction starts full)."""

    def __init__(self, share: float, burst: float, max_devices: int):
        self.share, self.burst, self.max_devices = share, burst, max_devices
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # device -> (seconds left, at)

    def left(self, device: str) -> float:
        """Seconds the device may still spend now (negative: overdrawn)."""
        now = time.monotonic()
        left, at = self.buckets.pop(device, (self.burst, now))
        left = min(self.burst, left + (now - at) * self.share)
        self.buckets[device] = (left, now)
        if len(self.buckets) > self.max_devices:
            self.buckets.popitem(last=False)
        return left

    def charge(self, device: str, seconds: float) -> None:
        self.buckets[device] = (self.left(device) - seconds, time.monotonic())


REPORTED_MAX = 1000  # (device, error) pairs logged; later ones are only counted


class Windower:
    """Turns SensorMessages of any number of devices into Windows. Drops are counted in `drops`, keyed by
    (device, reason); `take_drops()` hands over and clears them (what the pipeline stage does)."""

    def __init__(
        self,
        config: WindowingConfig = WindowingConfig(),
        keep: Callable[[SensorMessage, int], None] | None = None,
        ship_raw: bool = False,
    ):
        self.config = config
        self.keep = keep  # given every message windows are cut from, and its session (streaming/evidence.py)
        self.ship_raw = ship_raw  # vision, depth, thermal and audio windows carry their media (`Window.raw`)
        self.streams: OrderedDict[tuple[str, str], SensorStream] = OrderedDict()  # least recently used first
        self.drops: Counter = Counter()
        self.cpu = CpuAllowance(config.device_cpu_share, config.device_cpu_burst_s, config.max_streams)
        self.reported: set[tuple[str, str]] = set()

    def take_drops(self) -> Counter:
        drops, self.drops = self.drops, Counter()
        return drops

    def add(self, msg: SensorMessage, arrived_ns: int | None = None) -> list[Window]:
        """Take one message; return the windows it completes. What it cost is charged to its device."""
        started = time.thread_time()
        try:
            return self._take(msg, arrived_ns or time.time_ns())
        finally:
            self.cpu.charge(msg.device, time.thread_time() - started)

    def _take(self, msg: SensorMessage, arrived_ns: int) -> list[Window]:
        key = (msg.device, msg.sensor)
        stream = self._stream_for(key)
        held, stream.held = stream.held, None
        why = self._discontinuity(stream, msg)
        if held and why and self._follows(held[0], msg):  # two in a row: the device really skipped or started anew
            if held[1] != SEQ_SKIP:
                self.drops[msg.device, held[1]] += 1  # the old session's incomplete windows are lost
                stream = self._stream_for(key, new_session=True)
            return self._add(stream, held[0], arrived_ns) + self._add(stream, msg, arrived_ns)
        if held:  # a lone outlier, dropped
            self.drops[msg.device, held[1]] += 1
            if stream.last_seq is not None and held[0].seq == stream.last_seq + 1 < msg.seq:
                stream.last_seq = held[0].seq  # it was received (and dropped), not lost
                why = self._discontinuity(stream, msg)
        if why:
            stream.held = (msg, why)
            return []
        return self._add(stream, msg, arrived_ns)

    def settle_held(self) -> None:
        """Count every held message as dropped (at the drain: no next message will settle them)."""
        for (device, _), stream in self.streams.items():
            if stream.held:
                self.drops[device, stream.held[1]] += 1
                stream.held = None

    def _add(self, stream: SensorStream, msg: SensorMessage, arrived_ns: int) -> list[Window]:
        self._count_lost(stream, msg)
        if self.cpu.left(msg.device) <= 0:  # over its share: dropped (the windows it was in count as gaps)
            self.drops[msg.device, "throttled"] += 1
            return []
        start, end = msg.t_ns, msg.end_ns()
        hole = stream.end_ns is not None and self._has_hole(stream, msg)
        if hole:
            self._drop_windows_before(stream, msg.device, start)
        elif msg.sensor in FRAME_SENSORS and stream.last_t is not None:
            end = msg.t_ns + (msg.t_ns - stream.last_t)  # a frame lasts until the next one is due
        if stream.next_t0 is None:
            stream.next_t0 = _ceil_to(start, stream.spec.hop_ns)
        if msg.payload.size:  # frames no window samples arrive without pixels (see module docstring)
            stream.items.append(msg)
            if self.keep:
                self.keep(msg, stream.epoch)
        stream.last_t, stream.end_ns = msg.t_ns, max(end, stream.end_ns or end)
        stream.format = _format(msg)
        return self._cut(stream, msg.device, arrived_ns)

    def _stream_for(self, key: tuple[str, str], new_session: bool = False) -> SensorStream:
        """The (device, sensor) stream: created on first sight (evicting the least recently used one beyond
        `max_streams`), or afresh with the next epoch for a new session."""
        stream = self.streams.get(key)
        epoch = 0
        if stream is not None and new_session:
            epoch = self.streams.pop(key).epoch + 1
            stream = None
        if stream is None:
            if len(self.streams) >= self.config.max_streams:
                (old_device, _), _ = self.streams.popitem(last=False)
                self.drops[old_device, "evicted"] += 1
            sensor = key[1]
            stream = SensorStream(sensor, self.config.spec(SENSOR_MODALITY[sensor]), epoch=epoch)
            self.streams[key] = stream
        self.streams.move_to_end(key)
        return stream

    def _follows(self, first: SensorMessage, then: SensorMessage) -> bool:
        """Whether `then` continues `first`: the next `seq`, at most a clock jump later."""
        return then.seq == first.seq + 1 and 0 <= then.t_ns - first.t_ns <= self.config.max_clock_jump_ns

    def _discontinuity(self, stream: SensorStream, msg: SensorMessage) -> str | None:
        """Why `msg` does not continue `stream`, if it does not (Python ints: no overflow)."""
        last, config = stream.last_seq, self.config
        if last is None:
            return None
        if (msg.seq == 0 and last > 0) or last - msg.seq > config.seq_replay_window:
            return "device_restart"
        if msg.seq - last > config.max_seq_jump:
            return "seq_jump"
        if msg.seq - last > config.seq_confirm_gap:
            return SEQ_SKIP
        if stream.end_ns is not None and abs(msg.t_ns - stream.end_ns) > config.max_clock_jump_ns:
            return "clock_jump"
        if msg.seq <= last:
            return "seq_replay"
        if msg.sensor in FRAME_SENSORS:
            backwards = stream.last_t is not None and msg.t_ns <= stream.last_t
        else:
            backwards = stream.end_ns is not None and msg.t_ns < stream.end_ns - config.clock_tolerance_ns
        return "clock_backwards" if backwards else None

    # ----- checks -----

    def _count_lost(self, stream: SensorStream, msg: SensorMessage) -> None:
        if stream.last_seq is not None and msg.seq > stream.last_seq + 1:
            self.drops[msg.device, "seq_lost"] += msg.seq - stream.last_seq - 1
        stream.last_seq = msg.seq

    def _has_hole(self, stream: SensorStream, msg: SensorMessage) -> bool:
        """A hole in the data, or a change of sample format (rate, channels, dtype) that chunks must not mix."""
        assert stream.end_ns is not None and stream.last_t is not None  # asked only once the stream has data
        if stream.format is not None and _format(msg) != stream.format:
            self.drops[msg.device, "format_change"] += 1
            return True
        if msg.sensor in FRAME_SENSORS:
            return msg.t_ns - stream.last_t > self.config.max_frame_gap_ns
        return msg.t_ns > stream.end_ns + self.config.clock_tolerance_ns

    def _drop_windows_before(self, stream: SensorStream, device: str, hole_end: int) -> None:
        """Every window not yet cut that starts before `hole_end` contains the hole: count and skip them."""
        hop = stream.spec.hop_ns
        resume = _ceil_to(hole_end, hop)
        if stream.next_t0 is not None and resume > stream.next_t0:
            self.drops[device, "gap"] += (resume - stream.next_t0) // hop
            stream.next_t0 = resume
        stream.items.clear()

    # ----- cutting -----

    def _cut(self, stream: SensorStream, device: str, arrived_ns: int) -> list[Window]:
        spec, modality = stream.spec, SENSOR_MODALITY[stream.sensor]
        assert stream.next_t0 is not None and stream.end_ns is not None  # set by `_add` before it cuts
        out = []
        while stream.next_t0 + spec.length_ns <= stream.end_ns + self.config.clock_tolerance_ns:
            t0, t1 = stream.next_t0, stream.next_t0 + spec.length_ns
            data, reason = None, "throttled"
            if self.cpu.left(device) > 0:
                data, reason = self._window_data_or_reason(stream, device, t0, t1)
            if data is None:
                self.drops[device, reason] += 1
            else:
                x, dbfs = data
                window = Window(device, modality, t0, t1, NO_DATA, arrived_ns, epoch=stream.epoch, dbfs=dbfs)
                if isinstance(x, RawInput):
                    window.raw = x
                else:
                    window.data = x
                out.append(window)
            stream.next_t0 += spec.hop_ns
        self._prune(stream)
        return out

    def _window_data_or_reason(self, stream: SensorStream, device: str, t0: int, t1: int) -> tuple:
        """((model input, loudness), None), or (None, why not): one window's failure never reaches the stream."""
        try:
            data = self._window_data(stream, t0, t1)
        except (Rejected, ValueError) as err:  # e.g. a JPEG that does not decode: the window is lost, not the stream
            return None, TOO_COSTLY if getattr(err, "reason", None) == TOO_COSTLY else "bad_data"
        except Exception as err:  # e.g. an allocation refused: the window is lost, not the stage
            if (device, type(err).__name__) not in self.reported and len(self.reported) < REPORTED_MAX:
                self.reported.add((device, type(err).__name__))
                log.warning("preprocessing a %s window of %s failed: %s", stream.sensor, device, str(err)[:200])
            return None, "preprocess_error"
        return data, ("empty" if data is None else None)

    @staticmethod
    def _prune(stream: SensorStream) -> None:
        """Forget data that no future window needs. What stays is at most one window of data plus the
        last message, so a stream's buffer is bounded by its window length."""
        items, t0 = stream.items, stream.next_t0
        frames = stream.sensor in FRAME_SENSORS
        while items and (items[0].t_ns < t0 if frames else items[0].end_ns() <= t0):
            items.popleft()
        if stream.frames:
            stream.frames = {t: x for t, x in stream.frames.items() if t >= t0}

    def _window_data(self, stream: SensorStream, t0: int, t1: int) -> WindowData | None:
        """(the window's model input or raw media, its loudness: audio only), or None when it has no data."""
        if stream.sensor in FRAME_SENSORS:
            frames = [m for m in stream.items if t0 <= m.t_ns < t1]
            picked = []
            for offset in frame_sample_offsets(stream.sensor, stream.spec):
                frame = next((m for m in frames if m.t_ns >= t0 + offset), None)
                if frame is None:
                    return None
                picked.append(self._frame(stream, frame))
            if self.ship_raw:
                return RawInput(tuple(picked)), None
            if stream.sensor == "camera":
                return np.stack(picked, axis=1), None  # (3, 2, 224, 224) uint8 levels: a quarter of float32's bytes
            return picked[0], None
        return self._samples_window(stream, t0, t1)

    def _frame(self, stream: SensorStream, msg: SensorMessage) -> np.ndarray:
        """The model input of one frame ((3, 224, 224) camera's uint8 RGB levels, (1, 224, 224) depth or thermal), or
        with `ship_raw` its checked media (see `RawInput`), made once: a camera frame two windows sample is decoded
        once."""
        if msg.t_ns not in stream.frames:
            stream.frames[msg.t_ns] = None  # undecodable, unless the lines below finish
            if msg.sensor == "camera" and self.ship_raw:  # a JPEG as sent (ingest bounded its cost), else pixels
                x = msg.payload if msg.encoding == "jpeg" else decode_image(msg)
            elif msg.sensor == "camera":
                x = transforms.image_levels(decode_image(msg, self.config.jpeg_min_side)).numpy()
            elif self.ship_raw:
                x = batch_transforms.frame_media(SENSOR_MODALITY[msg.sensor], msg.payload)
            else:
                tensor = transforms.depth_tensor if msg.sensor == "depth" else transforms.thermal_tensor
                x = tensor(msg.payload).numpy()
            stream.frames[msg.t_ns] = x
        frame = stream.frames[msg.t_ns]
        if frame is None:
            raise ValueError(f"{msg.sensor} frame of {msg.device} at {msg.t_ns} ns did not decode")
        return frame

    def _samples_window(self, stream: SensorStream, t0: int, t1: int) -> WindowData | None:
        """Concatenate the chunks' samples covering [t0, t1) and preprocess them; audio also gets its loudness."""
        chunks = [m for m in stream.items if m.end_ns() > t0 and m.t_ns < t1]
        if not chunks:
            return None
        rate = chunks[0].rate
        first = round((t0 - chunks[0].t_ns) * rate / SECOND)
        count = round((t1 - t0) * rate / SECOND)
        # a stream's chunks share one format (a change leaves a hole): joined as sent, only the window converted
        samples = _as_float(np.concatenate([m.payload for m in chunks])[max(first, 0) : max(first, 0) + count])
        if stream.sensor == "mic" and self.ship_raw:
            return RawInput((samples,), rate), rms_dbfs(samples)
        if stream.sensor == "mic":
            return transforms.audio_tensor(samples.T, rate).numpy(), rms_dbfs(samples)
        return transforms.imu_tensor(samples, rate).numpy(), None


def rms_dbfs(samples: np.ndarray) -> float:
    """Loudness of float samples (full scale 1, every channel): 20 log10 of their RMS, clipped to [-1, 1] as
    the model input is, so at most 0 (a full-scale sine reads -3); digital silence reads MIN_DBFS."""
    rms = float(np.sqrt(np.mean(np.square(np.clip(samples, -1.0, 1.0), dtype=np.float64))))
    return max(MIN_DBFS, 20 * math.log10(rms)) if rms > 0 else MIN_DBFS


def _as_float(payload: np.ndarray) -> np.ndarray:
    if payload.dtype == np.int16:
        return payload.astype(np.float32) / 32768.0
    return payload.astype(np.float32, copy=False)


LIVE, REPLAY = "drop_oldest", "block"
PREPROCESS_ON = ("auto", "windowing", "embedder")
PUMP_INTERVAL_S = 0.01


@dataclass(frozen=True)
class WindowStageSettings:
    """`overload` says what happens when the embedders fall behind (all `max_inflight` calls open):
    `drop_oldest` (live input) keeps at most `backlog` windows waiting here and drops the oldest, counted;
    `block` (replay) waits, which stops ingest reading, so ZeroMQ holds back the senders."""

    windowing: WindowingConfig = WindowingConfig()
    max_inflight: int = 8  # calls to embedders not yet returned (each returns once the publisher holds its windows)
    overload: str = LIVE
    backlog: int = 256  # windows waiting for an embedder call, with `drop_oldest`
    max_windows_per_call: int = 32  # the pipeline sets it to the embedders' batch size
    torch_threads: int = 1  # preprocessing is many small ops: scale out with more windowing actors instead
    redis_url: str | None = None  # where the evidence of events goes; None: no raw messages kept
    evidence: EvidenceSettings = EvidenceSettings()
    # where vision, depth, thermal and audio windows are preprocessed: "windowing" (here), "embedder" (their media
    # travel, see the module docstring), or "auto": "embedder" when `embedders_have_gpu`, else "windowing"
    preprocess_on: str = "auto"
    embedders_have_gpu: bool = False  # set by the pipeline from where it places the embedders
    gating: GatingSettings = GatingSettings()  # windows that did not change are not embedded (streaming/gating.py)

    def ships_raw(self) -> bool:
        """Whether this stage's windows carry their media to the embedders (`preprocess_on` resolved)."""
        if self.preprocess_on not in PREPROCESS_ON:
            raise ValueError(f"preprocess_on must be one of {', '.join(PREPROCESS_ON)}, got {self.preprocess_on!r}")
        return self.preprocess_on == "embedder" or (self.preprocess_on == "auto" and self.embedders_have_gpu)


class WindowStage:
    """The windowing actor: owns the windows of the devices routed to it, sends them to the embedders (a window
    that did not change goes as a data-less stand-in, streaming/gating.py); with a `redis_url`, keeps their raw
    messages and writes the evidence of their events (streaming/evidence.py)."""

    def __init__(self, settings: WindowStageSettings, embedders: list):
        if settings.overload not in (LIVE, REPLAY):
            raise ValueError(f"overload policy must be {LIVE!r} or {REPLAY!r}, got {settings.overload!r}")
        self.settings = settings
        torch.set_num_threads(settings.torch_threads)
        self.metrics = StageMetrics("window")
        self.evidence = None
        if settings.redis_url and settings.evidence.enabled:
            self.evidence = EvidenceWriter(settings.evidence, settings.redis_url, self.metrics.count)
        self.windower = Windower(
            settings.windowing, keep=self.evidence.buffer.add if self.evidence else None, ship_raw=settings.ships_raw()
        )
        self.downstream = Downstream(embedders, settings.max_inflight, ordered=True)
        self.gate = Gate(settings.gating)
        self.backlog: deque[Window] = deque()
        self._lock = threading.Lock()  # backlog and downstream: push() and the pump thread share them
        self._pump = threading.Thread(target=self._pump_backlog, name="window-pump", daemon=True)
        self._pump.start()

    def push(self, messages: list[SensorMessage], arrived_ns: int) -> None:
        start = time.perf_counter()
        windows = []
        for msg in messages:
            try:
                windows += self.windower.add(msg, arrived_ns)
            except Exception:  # a bug met by one message: that message is lost, counted under its device
                log.exception("windowing a %s message of %s failed", msg.sensor, msg.device)
                self.metrics.count("dropped_stage_error", msg.device)
        self.metrics.busy(time.perf_counter() - start)
        # counted per call, not per item: a count costs microseconds (it is a Ray metric too)
        for modality, n in Counter(SENSOR_MODALITY[msg.sensor] for msg in messages).items():
            self.metrics.count("in", modality, n)
        for modality, n in Counter(window.modality for window in windows).items():
            self.metrics.count("out", modality, n)
        for (device, reason), n in self.windower.take_drops().items():
            self.metrics.count(f"dropped_{reason}", device, n)
        with self._lock:
            if self.settings.overload == REPLAY:
                self.backlog.extend(windows)
                while self.backlog:
                    self._push_next()
                return
            self.backlog.extend(windows)
            while len(self.backlog) > self.settings.backlog:
                self.metrics.count("dropped_overload", self.backlog.popleft().device)
            self._send_backlog()

    def _send_backlog(self) -> None:
        while self.backlog and self.downstream.has_room():
            self._push_next()
        self.metrics.queue_depth(len(self.backlog))

    def _push_next(self) -> None:
        """Send the oldest waiting window, with the next ones bound for the same embedder. A device's
        windows always go to the same embedder, which queues this actor's calls in the order they were made
        (`CallOrder`), so they reach the publisher in order."""
        embedder = self.downstream.actor_for(self.backlog[0].device)
        batch: list[Window] = []
        rest: deque[Window] = deque()
        while self.backlog and len(batch) < self.settings.max_windows_per_call:
            window = self.backlog.popleft()
            (batch if self.downstream.actor_for(window.device) is embedder else rest).append(window)
        self.backlog.extendleft(reversed(rest))
        self.downstream.push([self._gated(w) for w in batch], key=batch[0].device)

    def _gated(self, window: Window) -> Window:
        """The window, or its data-less stand-in if the gate finds it unchanged (counted per modality and per
        device). Decided as it leaves: a window dropped from the backlog never becomes one that others repeat."""
        out = self.gate.check(window)
        if out.reuses is not None:
            self.metrics.count("gated", out.modality)
            self.metrics.count("gated_by_device", out.device)
        return out

    def _pump_backlog(self) -> None:
        """Send waiting windows as soon as an embedder call returns, also when no new data comes in."""
        while True:
            time.sleep(PUMP_INTERVAL_S)
            if self.backlog:
                try:
                    with self._lock:
                        self._send_backlog()
                except Exception:  # an embedder restarting: the windows stay in the backlog, try again
                    log.exception("sending windows to the embedders failed")

    def set_embedders(self, embedders: list) -> None:
        """Send to these embedders from now on (after the calls open to the old ones have returned)."""
        with self._lock:
            self.downstream.wait()
            self.downstream = Downstream(embedders, self.settings.max_inflight, ordered=True)

    def flush(self, timeout_s: float | None = None) -> dict:
        """Hand every window cut so far to the embedders and wait until they are published. Windows still
        waiting here after `timeout_s` (None: no limit) are dropped, counted per device as
        `dropped_drain_timeout`: past the drain's deadline the embedders would refuse them one call at a time."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.windower.settle_held()
        for (device, reason), n in self.windower.take_drops().items():
            self.metrics.count(f"dropped_{reason}", device, n)
        with self._lock:
            while self.backlog and (deadline is None or time.monotonic() < deadline):
                self._push_next()
            while self.backlog:
                self.metrics.count("dropped_drain_timeout", self.backlog.popleft().device)
            self.metrics.queue_depth(0)
            self.downstream.wait()
        return self.stats()

    def stats(self) -> dict:
        evidence = self.evidence.stats() if self.evidence else {}
        return self.metrics.snapshot(streams=len(self.windower.streams), queue=len(self.backlog), **evidence)
