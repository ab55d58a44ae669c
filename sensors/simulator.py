"""Simulated wearable: deterministic camera, mic, IMU, depth and thermal streams, and a multi-device driver.

Content depends only on (seed, device, time since start): two generators with the same
arguments yield byte-identical payloads. One moving "subject" appears in every modality:
a circle in the camera image, an object in the depth map and a warm blob in the thermal image.
The mic hears tones and a hum, and at known times a chirp burst (`ChirpBursts`): an event for the demo to find.
What moves, sounds and walks when is the wearable's `Profile` (`PROFILES`): `steady`, everything all the time
(the default), or `day`, quiet stretches (a still scene, a quiet room, a wearer standing still) between events.
"""

from __future__ import annotations

import heapq
import math
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import cv2
import numpy as np
import zmq

from .clock import Pacer
from .images import encode_jpeg
from .protocol import CAMERA, DEFAULT_ENDPOINT, DEPTH, IMU, MIC, NS_PER_S, OMITTED, SENSORS, THERMAL, header_map
from .publisher import DevicePublisher, terminate
from .sampling import FrameOmitter, FrameSampling

WIDTH, HEIGHT = 640, 480  # camera and depth
THERMAL_WIDTH, THERMAL_HEIGHT = 160, 120
CAMERA_FPS = 30
DEPTH_FPS = 30
THERMAL_FPS = 9
MIC_RATE = 48_000
MIC_CHUNK = 960  # 20 ms
IMU_RATE = 800
IMU_CHUNK = 40  # 50 ms
JPEG_QUALITY = 80

NOISE_MARGIN = 32  # per-frame noise is a window of a precomputed field, shifted by up to this many pixels
CAMERA_NOISE = 6  # uint8 levels
SUBJECT_RADIUS_PX = 60  # subject radius at 1 m
SUBJECT_DEPTH_MM = (1000, 350)  # mean, swing
FLOOR_NEAR_MM, FLOOR_FAR_MM = 1500, 4000  # depth plane: bottom row, top row
DEPTH_NOISE_MM = 12
DEPTH_HOLE_FRACTION = 0.005  # pixels with no reading (0)
CENTIKELVIN_AT_0C = 27_315
THERMAL_BACKGROUND_CK = CENTIKELVIN_AT_0C + 2_000  # 20 C
THERMAL_GRADIENT_CK = 150
THERMAL_BLOB_CK = 1_400  # subject peaks near 34 C
THERMAL_BLOB_SIGMA = 6.0  # thermal pixels
THERMAL_NOISE_CK = 5  # ~50 mK NETD
THERMAL_SCALE = WIDTH // THERMAL_WIDTH
NOTE_CHUNKS = 25  # the mic tone changes every 0.5 s
NOTES_HZ = (220.0, 246.9, 277.2, 329.6, 370.0, 440.0, 493.9, 554.4, 659.3)
FADE_S = 0.02  # tone fade in/out at note changes
AUDIO_FULL_SCALE = 32767
GRAVITY = 9.80665
GYRO_TURN_HZ = 0.05
ACCEL_NOISE, GYRO_NOISE = 0.04, 0.005
COMMON_KEYS = frozenset({"v", "device", "sensor", "seq", "t_ns"})
SENSOR_ORDER = {sensor: i for i, sensor in enumerate(SENSORS)}
SCENE, FRAME, SHIFT = 0, 1, 2  # random stream tags


@dataclass(frozen=True)
class _Mover:
    """A point moving on a Lissajous curve inside the camera frame."""

    center: tuple[float, float]
    amplitude: tuple[float, float]
    freq_hz: tuple[float, float]
    phase: tuple[float, float]

    def at(self, t: float) -> tuple[int, int]:
        x, y = (
            round(c + a * math.sin(2 * math.pi * f * t + p))
            for c, a, f, p in zip(self.center, self.amplitude, self.freq_hz, self.phase)
        )
        return x, y


def _mover(rng: np.random.Generator, margin: int) -> _Mover:
    center = (WIDTH / 2, HEIGHT / 2)
    ax, ay = (rng.uniform(0.3, 1.0) * (c - margin) for c in center)
    amplitude = (ax, ay)
    return _Mover(center, amplitude, tuple(rng.uniform(0.05, 0.3, 2)), tuple(rng.uniform(0, 2 * math.pi, 2)))


@dataclass(frozen=True)
class ChirpBursts:
    """A sound unlike the mic's background, at known device times: burst k starts `first_s + k * every_s`
    seconds after the wearable's start and lasts `seconds`, a rising sweep from `low_hz` to `high_hz` repeated
    every `sweep_s` (a buzzing chirp that covers the whole band, where the background is a few tones). It is
    the same on every wearable and for every seed, so that one example clip of it (`clip`) matches them all."""

    first_s: float = 35.0  # after an example query's warm-up of 30 audio windows (ALERTS.md), with margin
    # from one burst's start to the next: rare enough to stay unusual. The ~4 windows a burst touches join the
    # query's estimate of the stream's usual sound; at more than 1 in z^2 = 16 windows (z = 4) that estimate
    # widens with every burst until the bursts are the usual sound and no longer fire
    every_s: float = 90.0
    seconds: float = 3.0  # two whole 2 s audio windows (1 s hop) lie inside a burst, whatever the grid
    # one sweep, about an analysis frame (25 ms) of the model's log-mel: every frame then holds the whole band, loud
    # over the background in every mel bin (sweeps of 50 ms and more did not stand out from it under `tiny`)
    sweep_s: float = 0.02
    low_hz: float = 200.0
    high_hz: float = 7000.0  # below 8 kHz, the highest frequency of the model's 16 kHz input
    amplitude: float = 0.5  # full scale 1; added to the background (peaks near 0.45), clipped to full scale
    fade_s: float = 0.01  # fade in and out: no click at a burst's edges

    def __post_init__(self):
        if not 0 < self.fade_s * 2 <= self.seconds < self.every_s or self.first_s < 0:
            raise ValueError(f"bursts need 0 <= first_s and 0 < 2 fade_s <= seconds < every_s: {self}")
        if not (0 < self.sweep_s and 0 < self.low_hz < self.high_hz and 0 < self.amplitude <= 1):
            raise ValueError(f"bursts need sweep_s > 0, 0 < low_hz < high_hz and amplitude in (0, 1]: {self}")

    def starts(self, seconds: float) -> list[float]:
        """The start of each burst that begins within the first `seconds` (seconds since the wearable's start)."""
        return [
            self.first_s + k * self.every_s for k in range(max(0, math.ceil((seconds - self.first_s) / self.every_s)))
        ]

    def sound(self, t: np.ndarray) -> np.ndarray:
        """The bursts at `t` seconds since the wearable's start (full scale 1; 0 between bursts)."""
        since = np.asarray(t, dtype=np.float64) - self.first_s
        into = np.where(since >= 0, since % self.every_s, -1.0)  # seconds into the current burst period
        on = (into >= 0) & (into < self.seconds)
        rate = math.log(self.high_hz / self.low_hz) / self.sweep_s  # exponential sweep: equal time per octave
        growth = math.expm1(rate * self.sweep_s)
        # a whole number of cycles per sweep (the band moves by < 1/cycles): each sweep ends at phase 0, where the
        # next begins, so the sweeps join without a click and a sample on the seam has one value, however rounded
        cycles = round(self.low_hz * growth / rate)
        phase = 2 * math.pi * cycles * np.expm1(rate * (into % self.sweep_s)) / growth
        fade = np.clip(np.minimum(into, self.seconds - into) / self.fade_s, 0.0, 1.0)
        return np.where(on, self.amplitude * fade * np.sin(phase), 0.0)

    def clip(self, rate: int = MIC_RATE) -> np.ndarray:
        """One burst, float32 samples at `rate`: what the mic plays from each start."""
        return self.sound(self.first_s + np.arange(round(self.seconds * rate)) / rate).astype(np.float32)


@dataclass(frozen=True)
class Schedule:
    """When one activity of a wearable is on: `on_s` seconds of every `every_s`, the first stretch starting
    `first_s` seconds after the wearable's start (off before it). The default is on all the time."""

    first_s: float = 0.0
    on_s: float = math.inf
    every_s: float = math.inf

    def __post_init__(self):
        if not (0 <= self.first_s and 0 < self.on_s <= self.every_s):
            raise ValueError(f"a schedule needs 0 <= first_s and 0 < on_s <= every_s: {self}")

    def level(self, t, fade_s: float = 0.0) -> np.ndarray:
        """1 while on, 0 while off, at `t` seconds since the wearable's start; ramping over `fade_s` at each edge
        (no click where a sound starts, no jolt where a walk does); one on without end has no edge to ramp at."""
        since = np.asarray(t, dtype=np.float64) - self.first_s
        if math.isinf(self.on_s):
            return np.where(since >= 0, 1.0, 0.0)
        into = np.where(since >= 0, np.mod(since, self.every_s), -1.0)  # seconds into the current stretch
        left = self.on_s - into
        on = (into >= 0) & (left > 0)
        ramp = np.clip(np.minimum(into, left) / fade_s, 0.0, 1.0) if fade_s else 1.0
        return np.where(on, ramp, 0.0)

    def on_time(self, t: float) -> float:
        """Seconds it was on from the wearable's start to `t`: the clock of what moves only while it is on."""
        since = t - self.first_s
        if since <= 0:
            return 0.0
        periods, into = divmod(since, self.every_s)
        return (periods * self.on_s if periods else 0.0) + min(into, self.on_s)


@dataclass(frozen=True)
class Profile:
    """What a wearable's world does over time. While `motion` is on, the subject and the shapes move (camera,
    depth, thermal); while off, the scene stands still (only sensor noise and the camera's clock overlay
    change). While `sound` is on, the mic hears its tones, hum and noise; while off, a quiet room (noise at
    `quiet_noise`). While `walking` is on, the IMU feels steps and a slow turn; while off, stillness (gravity
    and sensor noise). With `stagger`, each wearable shifts the three schedules by offsets of its own, so that
    a fleet is not active all at once. The mic's chirp bursts (`ChirpBursts`) play in every profile."""

    motion: Schedule = Schedule()
    sound: Schedule = Schedule()
    walking: Schedule = Schedule()
    quiet_noise: float = 0.0005  # RMS of a quiet room's noise, full scale 1 (-66 dBFS)
    stagger: bool = False


# A day: mostly nothing happens; now and then the subject moves for 6 s, a sound plays for 5 s, the wearer walks
# for 8 s (periods of 40, 45 and 50 s, so the events meet in ever new combinations), and the chirp bursts
PROFILES = {
    "steady": Profile(),  # everything moves and sounds all the time (what the simulator always did)
    "day": Profile(
        motion=Schedule(12.0, 6.0, 40.0),
        sound=Schedule(22.0, 5.0, 45.0),
        walking=Schedule(4.0, 8.0, 50.0),
        stagger=True,
    ),
}
DEFAULT_PROFILE = "steady"
SOUND_FADE_S = 0.05  # a sound stretch fades in and out over this
WALK_FADE_S = 0.5  # a walk starts and stops over this


def _gaussian_blob(sigma: float, amplitude: float) -> np.ndarray:
    r = math.ceil(3 * sigma)
    d = np.arange(-r, r + 1) ** 2
    return np.round(amplitude * np.exp(-(d[:, None] + d[None, :]) / (2 * sigma**2))).astype(np.int32)


def _add_patch(dst: np.ndarray, patch: np.ndarray, cx: int, cy: int) -> None:
    """dst[cy-r:cy+r+1, cx-r:cx+r+1] += patch, clipped to dst."""
    r = patch.shape[0] // 2
    y0, x0 = cy - r, cx - r
    y1, x1 = max(y0, 0), max(x0, 0)
    y2, x2 = min(y0 + patch.shape[0], dst.shape[0]), min(x0 + patch.shape[1], dst.shape[1])
    if y1 < y2 and x1 < x2:
        dst[y1:y2, x1:x2] += patch[y1 - y0 : y2 - y0, x1 - x0 : x2 - x0]


class SimulatedWearable:
    """Smart glasses with camera (30 fps JPEG 640x480), mic (48 kHz int16 mono, 20 ms chunks),
    IMU (800 Hz, 50 ms chunks), depth (30 fps 640x480 uint16 mm) and thermal (9 fps 160x120 uint16 cK). Its chunks
    are smaller than the 100 ms PROTOCOL.md recommends (more messages: a harder case); `bench capacity` joins them.
    The mic also plays `bursts` (by default a chirp burst at 35 s, then every 90 s). `profile` says when the
    scene moves, the background sounds and the wearer walks (default: all the time).

    Capture k of a sensor taken m times per second is stamped start_ns + k * 1e9 // m exactly. With `sampling`
    (the pipeline's, sensors/sampling.py), the frames no window uses are never drawn: sent omitted (header
    only), or skipped where the frames sent stay within the sampling's `max_gap_ns` (`seq` counts what is sent).
    """

    def __init__(
        self,
        device: str,
        seed: int,
        start_ns: int | None = None,
        bursts: ChirpBursts = ChirpBursts(),
        profile: Profile = PROFILES[DEFAULT_PROFILE],
        sampling: Mapping[str, FrameSampling] | None = None,
    ):
        self.device = device
        self.sampling = dict(sampling or {})
        self.seed = seed
        self.start_ns = time.monotonic_ns() if start_ns is None else start_ns
        self.bursts = bursts
        self.profile = profile
        self._key = zlib.crc32(device.encode())
        schedules = (profile.motion, profile.sound, profile.walking)
        shares = self._rng(SHIFT).uniform(0, 1, len(schedules)) if profile.stagger else np.zeros(len(schedules))
        # seconds each schedule runs ahead of the wearable's clock (0 for one always on)
        self._motion_shift, self._sound_shift, self._walk_shift = (
            float(share * x.every_s) if math.isfinite(x.every_s) else 0.0 for share, x in zip(shares, schedules)
        )
        rng = self._rng(SCENE)
        self._subject = _mover(rng, SUBJECT_RADIUS_PX * 2)
        self._subject_color = tuple(int(c) for c in rng.integers(60, 256, 3))
        self._shapes = [
            (
                _mover(rng, 40),
                tuple(int(c) for c in rng.integers(0, 256, 3)),
                int(rng.integers(20, 50)),
                int(rng.integers(3, 6)),
                float(rng.uniform(-2, 2)),
            )
            for _ in range(2)
        ]
        top, bottom = rng.integers(0, 200, (2, 3))
        ramp = np.linspace(0, 1, HEIGHT)[:, None, None]
        texture = rng.integers(0, 16, (HEIGHT, WIDTH, 3))
        self._background = (top + (bottom - top) * ramp + texture).clip(0, 255).astype(np.uint8)
        noise_shape = (HEIGHT + NOISE_MARGIN, WIDTH + NOISE_MARGIN)
        self._camera_noise = rng.integers(0, CAMERA_NOISE + 1, (*noise_shape, 3), dtype=np.uint8)
        rows = np.linspace(FLOOR_FAR_MM, FLOOR_NEAR_MM, HEIGHT)[:, None]
        tilt = np.linspace(-100, 100, WIDTH)[None, :] * rng.uniform(-1, 1)
        self._floor = np.round(rows + tilt).astype(np.uint16)
        self._depth_noise = rng.integers(0, DEPTH_NOISE_MM, noise_shape, dtype=np.uint16)
        self._depth_holes = rng.random(noise_shape) < DEPTH_HOLE_FRACTION
        gradient = np.linspace(0, THERMAL_GRADIENT_CK, THERMAL_HEIGHT)[:, None]
        self._thermal_background = np.broadcast_to(
            THERMAL_BACKGROUND_CK + np.round(gradient).astype(np.int32), (THERMAL_HEIGHT, THERMAL_WIDTH)
        )
        self._blob = _gaussian_blob(THERMAL_BLOB_SIGMA, THERMAL_BLOB_CK)
        self._hum_hz = float(rng.uniform(90, 180))
        self._step_hz = float(rng.uniform(1.6, 2.1))
        self._imu_phase = rng.uniform(0, 2 * math.pi, 4)

    def _rng(self, *tags: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self._key, *tags])

    def _scene_s(self, t: float) -> float:
        """The scene's clock at t seconds: it runs only while the profile's `motion` is on."""
        return self.profile.motion.on_time(t + self._motion_shift) - self.profile.motion.on_time(self._motion_shift)

    def _subject_at(self, t: float) -> tuple[int, int, int]:
        """Camera-pixel position and distance (mm) of the subject at t seconds (t of the scene's clock)."""
        mean, swing = SUBJECT_DEPTH_MM
        x, y = self._subject.at(t)
        return x, y, round(mean + swing * math.sin(2 * math.pi * 0.15 * t + self._subject.phase[0]))

    def _noise_offset(self, sensor: str, k: int) -> tuple[int, int]:
        dy, dx = self._rng(FRAME, SENSOR_ORDER[sensor], k).integers(0, NOISE_MARGIN, 2)
        return int(dy), int(dx)

    def camera(self, k: int) -> bytes:
        t = k / CAMERA_FPS
        scene = self._scene_s(t)
        frame = self._background.copy()
        for mover, color, size, sides, spin in self._shapes:
            cx, cy = mover.at(scene)
            angles = spin * scene + np.arange(sides) * 2 * math.pi / sides
            points = np.stack([cx + size * np.cos(angles), cy + size * np.sin(angles)], axis=1)
            cv2.fillPoly(frame, [np.round(points).astype(np.int32)], color, cv2.LINE_AA)
        x, y, mm = self._subject_at(scene)
        cv2.circle(frame, (x, y), SUBJECT_RADIUS_PX * 1000 // mm, self._subject_color, -1, cv2.LINE_AA)
        cv2.putText(
            frame,
            f"{self.device} {t:7.3f}",
            (10, HEIGHT - 12),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.6,
            (255, 255, 255),
            1,
            cv2.LINE_AA,
        )
        dy, dx = self._noise_offset(CAMERA, k)
        cv2.add(frame, self._camera_noise[dy : dy + HEIGHT, dx : dx + WIDTH], dst=frame)
        return encode_jpeg(frame, JPEG_QUALITY).tobytes()

    def depth(self, k: int) -> bytes:
        x, y, mm = self._subject_at(self._scene_s(k / DEPTH_FPS))
        frame = self._floor.copy()
        cv2.circle(frame, (x, y), SUBJECT_RADIUS_PX * 1000 // mm, mm, -1)
        dy, dx = self._noise_offset(DEPTH, k)
        cv2.add(frame, self._depth_noise[dy : dy + HEIGHT, dx : dx + WIDTH], dst=frame)
        np.copyto(frame, 0, where=self._depth_holes[dy : dy + HEIGHT, dx : dx + WIDTH])
        return frame.tobytes()

    def thermal(self, k: int) -> bytes:
        x, y, _ = self._subject_at(self._scene_s(k / THERMAL_FPS))
        frame = self._thermal_background.copy()
        _add_patch(frame, self._blob, x // THERMAL_SCALE, y // THERMAL_SCALE)
        frame += self._rng(FRAME, SENSOR_ORDER[THERMAL], k).integers(
            -THERMAL_NOISE_CK, THERMAL_NOISE_CK + 1, frame.shape
        )
        return frame.astype("<u2").tobytes()

    def mic(self, k: int) -> bytes:
        n = k * MIC_CHUNK + np.arange(MIC_CHUNK)
        t = n / MIC_RATE
        segment = k // NOTE_CHUNKS
        note = NOTES_HZ[int(self._rng(FRAME, SENSOR_ORDER[MIC], segment).integers(len(NOTES_HZ)))]
        segment_s = NOTE_CHUNKS * MIC_CHUNK / MIC_RATE
        into = t - segment * segment_s
        fade = np.minimum(1.0, np.minimum(into, segment_s - into) / FADE_S)
        hum = 0.5 + 0.5 * np.sin(2 * math.pi * 0.25 * t)
        noise = self._rng(FRAME, SENSOR_ORDER[MIC], segment, k).normal(0, 1, MIC_CHUNK)
        signal = 0.25 * fade * np.sin(2 * math.pi * note * t) + 0.1 * hum * np.sin(2 * math.pi * self._hum_hz * t)
        sound = self.profile.sound.level(t + self._sound_shift, SOUND_FADE_S)  # 0: a quiet room
        signal = sound * signal + (0.02 * sound + self.profile.quiet_noise * (1 - sound)) * noise + self.bursts.sound(t)
        return np.round(np.clip(signal, -1.0, 1.0) * AUDIO_FULL_SCALE).astype("<i2").tobytes()

    def imu(self, k: int) -> bytes:
        t = (k * IMU_CHUNK + np.arange(IMU_CHUNK)) / IMU_RATE
        step = 2 * math.pi * self._step_hz * t
        p = self._imu_phase
        rng = self._rng(FRAME, SENSOR_ORDER[IMU], k)
        walk = self.profile.walking.level(t + self._walk_shift, WALK_FADE_S)[:, None]  # 0: standing still
        accel = np.stack([0.8 * np.sin(step / 2 + p[0]), 0.4 * np.sin(step + p[1]), 1.5 * np.sin(step)], 1)
        gyro = np.stack(
            [0.25 * np.sin(step / 2 + p[2]), 0.15 * np.sin(step + p[3]), 0.4 * np.sin(2 * math.pi * GYRO_TURN_HZ * t)],
            1,
        )
        accel, gyro = walk * accel + [0.0, 0.0, GRAVITY], walk * gyro
        accel += rng.normal(0, ACCEL_NOISE, accel.shape)
        gyro += rng.normal(0, GYRO_NOISE, gyro.shape)
        return np.concatenate([accel, gyro], 1).astype("<f4").tobytes()

    def _streams(self) -> list[tuple[str, int, dict, Callable[[int], bytes]]]:
        """(sensor, messages per second, header fields, payload of message k) for each sensor."""
        return [
            (CAMERA, CAMERA_FPS, {"encoding": "jpeg"}, self.camera),
            (MIC, MIC_RATE // MIC_CHUNK, {"rate": MIC_RATE, "channels": 1, "dtype": "int16"}, self.mic),
            (DEPTH, DEPTH_FPS, {"dtype": "uint16", "shape": [HEIGHT, WIDTH]}, self.depth),
            (THERMAL, THERMAL_FPS, {"dtype": "uint16", "shape": [THERMAL_HEIGHT, THERMAL_WIDTH]}, self.thermal),
            (IMU, IMU_RATE // IMU_CHUNK, {"rate": IMU_RATE}, self.imu),
        ]

    def _stream(
        self, sensor: str, per_second: int, fields: dict, payload: Callable[[int], bytes], end_ns: int
    ) -> Iterator[tuple[dict, bytes]]:
        k, omitter = 0, FrameOmitter(self.sampling)
        while (t_ns := self.start_ns + k * NS_PER_S // per_second) < end_ns:
            if (numbered := omitter.next(sensor, t_ns)) is not None:
                seq, omitted = numbered
                copied = {key: list(value) if isinstance(value, list) else value for key, value in fields.items()}
                header = header_map(self.device, sensor, seq, t_ns, **copied)
                yield (header | {OMITTED: True}, b"") if omitted else (header, payload(k))
            k += 1

    def messages(self, seconds: float) -> Iterator[tuple[dict, bytes]]:
        """(header, payload) of every message captured in the first `seconds`, in device-time order."""
        end_ns = self.start_ns + round(seconds * NS_PER_S)
        streams = [self._stream(*spec, end_ns) for spec in self._streams()]
        return heapq.merge(*streams, key=_message_order)


def _message_order(message: tuple[dict, bytes]) -> tuple[int, str, int]:
    header = message[0]
    return header["t_ns"], header["device"], SENSOR_ORDER[header["sensor"]]


@dataclass
class SimulationStats:
    """Messages sent and dropped per device and sensor, the wall time taken, and the bytes sent (headers and
    payloads)."""

    sent: dict[str, dict[str, int]]
    dropped: dict[str, dict[str, int]]
    wall_s: float
    bytes_sent: int = 0

    @property
    def total_sent(self) -> int:
        return sum(sum(counts.values()) for counts in self.sent.values())


def simulate(
    endpoint: str = DEFAULT_ENDPOINT,
    devices: int = 1,
    seconds: float = 10.0,
    seed: int = 0,
    realtime: bool = True,
    start_ns: int | None = None,
    bursts: ChirpBursts = ChirpBursts(),
    profile: Profile = PROFILES[DEFAULT_PROFILE],
    sampling: Mapping[str, FrameSampling] | None = None,
    **publisher_kwargs,
) -> SimulationStats:
    """Run `devices` wearables ("sim-000", ...) in this process, each on its own PUSH socket, their clocks
    starting at `start_ns` (default: now, on the monotonic clock), their mics playing `bursts`, their world
    doing what `profile` says, omitting the frames no window uses when given the pipeline's `sampling`.

    Messages of all devices go out in device-time order. `realtime` paces them to the wall
    clock with non-blocking sends (a full queue drops and counts); otherwise they go as fast
    as possible with blocking sends and close() waits for delivery, so nothing is dropped.
    `publisher_kwargs` go to DevicePublisher (sndhwm, block, linger_ms, context, ...).
    """
    start_ns = time.monotonic_ns() if start_ns is None else start_ns
    wearables = [SimulatedWearable(f"sim-{i:03d}", seed, start_ns, bursts, profile, sampling) for i in range(devices)]
    if not realtime:
        publisher_kwargs.setdefault("block", True)
        publisher_kwargs.setdefault("linger_ms", -1)
    context = publisher_kwargs.pop("context", None)
    own = zmq.Context() if context is None else None  # one for all: their queues are then sent at once on close
    publishers = {
        w.device: DevicePublisher(endpoint, w.device, context=context or own, **publisher_kwargs) for w in wearables
    }
    pacer = Pacer(1.0 if realtime else None)
    began = time.monotonic()
    try:
        for header, payload in heapq.merge(*(w.messages(seconds) for w in wearables), key=_message_order):
            pacer.wait(header["t_ns"])
            fields = {key: value for key, value in header.items() if key not in COMMON_KEYS}
            publishers[header["device"]].send(header["sensor"], header["t_ns"], payload, **fields)
    except BaseException:  # an error or Ctrl-C: do not wait for the queues
        for publisher in publishers.values():
            publisher.close(0)
        raise
    finally:
        for publisher in publishers.values():
            publisher.close()  # a no-op after close(0)
        if own is not None:
            terminate(own)  # returns once every queue is sent or its linger is over
    return SimulationStats(
        {d: dict(p.sent) for d, p in publishers.items()},
        {d: dict(p.dropped) for d, p in publishers.items()},
        time.monotonic() - began,
        sum(p.bytes_sent for p in publishers.values()),
    )
