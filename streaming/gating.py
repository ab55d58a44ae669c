"""Activity gating: a window whose content did not change enough since the last window of its stream (device,
epoch, modality) that was embedded is not embedded; the pipeline publishes that window's embedding again for it,
marked `reused` with that window's t0 (REDIS.md), so readers still get one record per window.

`Gate` decides in the windowing stage, on the window's model input, before the tensor travels: a gated window
goes on as a small record (`Window.reuses`, no data), takes no forward in the embedder, and the publisher fills it
with the repeated embedding (`Repeats`), after that one. Pure numpy; vision windows are compared in model-input
units though they travel as 8-bit levels. What "unchanged" means, comparing a window
with its stream's last embedded one:
- vision, depth, thermal: each frame is pooled to cells of `cell_px` x `cell_px` model-input pixels; a cell
  moved when its mean moved by more than the modality's `*_cell_delta` in some channel (above the sensor's
  noise: a camera's, a depth sensor's holes and jitter, a thermal camera's); the window changed when more than
  `changed_cells` of the cells moved in one of its frames. Pooling drowns sensor noise; counting cells keeps
  a small moving object from drowning in a still scene (the motion test of NVRs such as Frigate).
- audio: both windows quieter than `quiet_dbfs` (a quiet room repeats a quiet room, never a loud window), or
  their spectra alike: the log-mel averaged over `audio_bands` bands and each quarter of the window, no band
  moved by more than `band_delta`.
- imu: both windows still (every accelerometer axis' standard deviation under `still_accel`, every
  gyroscope axis' under `still_gyro`) and gravity pointing the same way (mean accelerations within `tilt`).
A window is embedded anyway when it is its stream's first, of a new epoch (never reuse across a device's
sessions), or `max_reuse_s` of device time after its stream's last embedded window (a slow drift is caught).
Where the embedders preprocess (`Window.raw`: a GPU node), frames and spectra are not compared (that would take
the decoding the GPU does): there only quiet audio and still IMU windows are gated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from sensors.protocol import NS_PER_S

from .records import FRAME_SENSORS, NO_DATA, STREAMS, Embedding, Window

QUARTERS = 4  # an audio window's spectrum is compared per quarter: a sound that moves within it counts
TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number"}
IMU_ACCEL = slice(0, 3)  # rows of an IMU window (encoders/transforms.py): ax, ay, az in m/s^2, then gx, gy, gz


@dataclass(frozen=True)
class GatingSettings:
    """When a window counts as unchanged (see the module docstring); `enabled = false` embeds every window."""

    enabled: bool = True
    max_reuse_s: float = 30.0  # device time after a stream's last embedded window when one is embedded anyway
    cell_px: int = 16  # frames: side of a cell, in model-input pixels (224 / 16 = 14 x 14 cells)
    # frames: a cell whose mean moves more than this (model-input units) has moved; over the noise the
    # simulator's sensors show between still frames: camera 0.07 (its clock overlay), depth 0.13, thermal 0.001
    vision_cell_delta: float = 0.2
    depth_cell_delta: float = 0.25
    thermal_cell_delta: float = 0.05
    changed_cells: float = 0.01  # frames: a share of moved cells above this, in one frame, is a change
    quiet_dbfs: float = -50.0  # audio: windows below this loudness (Window.dbfs) are a quiet room
    audio_bands: int = 32  # audio: mel bins pooled into this many bands (of the 128) before comparing
    band_delta: float = 0.15  # audio: a band's mean log-mel moving more than this (about 6 dB) is a change
    still_accel: float = 0.1  # imu: m/s^2, standard deviation of every accelerometer axis under it: still
    still_gyro: float = 0.02  # imu: rad/s, likewise for every gyroscope axis
    tilt: float = 0.3  # imu: m/s^2, still windows whose mean accelerations differ more than this: turned
    max_streams: int = 10_000  # streams whose last embedded window is remembered; beyond, the least recent goes

    def __post_init__(self):
        for f in dataclasses.fields(self):  # TOML values: the type each field is annotated with (a string here)
            value = getattr(self, f.name)
            kind = {"bool": bool, "int": int}.get(str(f.type), float)
            if isinstance(value, bool) != (kind is bool) or not isinstance(value, int if kind is int else (int, float)):
                raise ValueError(f"gating {f.name} must be {TYPE_WORDS[kind]}, got {value!r}")
            if kind is not bool and not math.isfinite(value):
                raise ValueError(f"gating {f.name} must be finite, got {value!r}")
            if kind is not bool and f.name not in ("quiet_dbfs", "changed_cells") and value <= 0:
                raise ValueError(f"gating {f.name} must be above 0, got {value!r}")
        if not 0 <= self.changed_cells < 1:
            raise ValueError(f"gating changed_cells is a share of cells in [0, 1), got {self.changed_cells!r}")


@functools.cache
def levels_units() -> tuple[np.ndarray, np.ndarray]:
    """(mean, std), each (3, 1, 1, 1): a vision window's pooled RGB levels to model-input units per channel,
    (levels / 255 - mean) / std. Imported when first needed: the publisher, which uses `Repeats`, runs no torch."""
    from encoders.transforms import CLIP_MEAN, CLIP_STD

    mean, std = (np.array(v, np.float32).reshape(3, 1, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    return mean, std


@functools.cache
def pooling(size: int, cell: int) -> np.ndarray:
    """(size // cell, size) float32: its product with a row of `size` pixels is the mean of each whole cell of them
    (a matrix product: several times cheaper than numpy's mean over reshaped axes). Shared: read-only."""
    matrix = np.zeros((size // cell, size), np.float32)
    for i in range(size // cell):
        matrix[i, i * cell : (i + 1) * cell] = 1 / cell
    matrix.flags.writeable = False
    return matrix


@dataclass
class Reference:
    """A stream's last embedded window: its session, its start, and what its content is compared by."""

    epoch: int
    t0: int
    signature: tuple | None  # None: a window whose content was not looked at (its media travel raw)


class Gate:
    """Says of each window of a stream, in stream order, whether it is embedded or repeats its stream's last
    embedded window. Not thread-safe: one windowing stage calls it under its lock."""

    def __init__(self, settings: GatingSettings = GatingSettings()):
        self.settings = settings
        self.references: OrderedDict[tuple[str, str], Reference] = OrderedDict()  # least recently used first

    def check(self, window: Window) -> Window:
        """The window itself, to be embedded (it becomes its stream's reference), or a data-less stand-in whose
        `reuses` is the t0 of the window whose embedding it repeats."""
        if not self.settings.enabled:
            return window
        key = (window.device, window.modality)
        ref = self.references.pop(key, None)
        signature = self._signature(window)
        late = ref is not None and window.t0 - ref.t0 >= self.settings.max_reuse_s * NS_PER_S
        if (
            ref is None
            or ref.epoch != window.epoch
            or window.t0 <= ref.t0
            or late
            or self._changed(window, ref, signature)
        ):
            ref = Reference(window.epoch, window.t0, signature)
            gated = None
        else:
            gated = dataclasses.replace(window, data=NO_DATA, raw=None, reuses=ref.t0)
        self.references[key] = ref
        if len(self.references) > self.settings.max_streams:
            self.references.popitem(last=False)
        return gated or window

    def _signature(self, window: Window) -> tuple | None:
        s, x = self.settings, window.data
        if window.raw is not None:
            return (window.dbfs, None) if window.modality == "audio" else None
        if STREAMS[window.modality].sensor in FRAME_SENSORS:
            frames = x if x.ndim == 4 else x[:, None]  # (channels, frames, H, W)
            height, width = frames.shape[2:]
            pooled = pooling(height, s.cell_px) @ frames @ pooling(width, s.cell_px).T  # (c, f, rows, cols)
            if window.modality == "vision" and x.dtype == np.uint8:  # RGB levels: in model-input units, as the
                mean, std = levels_units()  # thresholds are
                pooled = (pooled / 255 - mean) / std
            return (pooled,)
        if window.modality == "audio":  # (1, mel bins, frames)
            bins, frames = x.shape[-2:]
            bands, parts = min(s.audio_bands, bins), QUARTERS
            spectrum = x.reshape(bins, frames)[: bins // bands * bands, : frames // parts * parts]
            pooled = spectrum.reshape(bands, bins // bands, parts, frames // parts).mean(axis=(1, 3), dtype=np.float32)
            return (window.dbfs, pooled)
        return (x.std(axis=1), x[IMU_ACCEL].mean(axis=1))  # imu: (6, steps)

    def _changed(self, window: Window, ref: Reference, signature: tuple | None) -> bool:
        s = self.settings
        if signature is None or ref.signature is None:
            return True
        if STREAMS[window.modality].sensor in FRAME_SENSORS:
            (now,), (then,) = signature, ref.signature
            if now.shape != then.shape:
                return True
            delta = getattr(s, f"{window.modality}_cell_delta")
            moved = (np.abs(now - then) > delta).any(axis=0)  # (frames, rows, cols)
            return bool((moved.mean(axis=(1, 2)) > s.changed_cells).any())
        if window.modality == "audio":
            (loudness, now), (then_loudness, then) = signature, ref.signature
            quiet = [x is not None and x < s.quiet_dbfs for x in (loudness, then_loudness)]
            if all(quiet):
                return False
            return (
                now is None
                or then is None
                or now.shape != then.shape
                or bool((np.abs(now - then) > s.band_delta).any())
            )
        (spread, gravity), (then_spread, then_gravity) = signature, ref.signature
        still = all(
            (x[IMU_ACCEL] < s.still_accel).all() and (x[IMU_ACCEL.stop :] < s.still_gyro).all()
            for x in (spread, then_spread)
        )
        return not still or bool(np.abs(gravity - then_gravity).max() > s.tilt)


class Repeats:
    """Fills the embedding of each gated window with the vector it repeats, so that it follows that vector's window
    in its stream. Keeps the newest `keep` embedded windows of each stream (device, epoch, modality), for the
    `max_streams` streams used last. Windows of a stream may come slightly out of order (the pipeline's calls
    run concurrently): a gated window whose window has not come yet waits for it up to `wait_s`, at most
    `max_waiting` of them (the oldest give way); `expired` hands over those that waited in vain."""

    def __init__(self, max_streams: int, keep: int, wait_s: float, max_waiting: int):
        self.max_streams, self.keep, self.wait_s, self.max_waiting = max_streams, keep, wait_s, max_waiting
        self.vectors: OrderedDict[tuple[str, int, str], dict[int, Embedding]] = OrderedDict()  # stream -> t0 -> it
        self.waiting: dict[tuple, list[tuple[float, Embedding]]] = {}  # (stream, t0 repeated) -> (deadline, gated)
        self.waiting_count = 0

    def take(self, e: Embedding, now: float) -> tuple[list[Embedding], list[Embedding]]:
        """(what can go on now, in order: `e` filled or not, and the gated windows that waited for it; what had to
        give way: gated windows that waited longest, beyond `max_waiting`)."""
        stream = (e.device, e.epoch, e.modality)
        if e.reused is None:
            self.remember(e)
            waited = [w for _, w in self.waiting.pop((stream, e.t0), [])]
            self.waiting_count -= len(waited)
            return [e] + [self._filled(w, e) for w in waited], []
        repeated = self.vectors.get(stream, {}).get(e.reused)
        if repeated is not None:
            self.vectors.move_to_end(stream)
            return [self._filled(e, repeated)], []
        self.waiting.setdefault((stream, e.reused), []).append((now + self.wait_s, e))
        self.waiting_count += 1
        gave_way = []
        while self.waiting_count > self.max_waiting:
            gave_way.append(self._pop_oldest())
        return [], gave_way

    def remember(self, e: Embedding) -> None:
        """Keep an embedded window's vector for the gated windows that repeat it."""
        stream = (e.device, e.epoch, e.modality)
        kept = self.vectors.pop(stream, {})
        kept[e.t0] = e
        if len(kept) > self.keep:
            del kept[min(kept)]
        self.vectors[stream] = kept
        if len(self.vectors) > self.max_streams:
            self.vectors.popitem(last=False)

    def knows(self, e: Embedding) -> bool:
        """Whether any embedded window of `e`'s stream is kept (if not, this process started since, or forgot it)."""
        return (e.device, e.epoch, e.modality) in self.vectors

    def expired(self, now: float, all_of_them: bool = False) -> list[Embedding]:
        """The gated windows whose window did not come within `wait_s` (with `all_of_them`, every one waiting).
        A scan: rarely does anything wait."""
        out = []
        for key, waits in list(self.waiting.items()):
            out += [e for deadline, e in waits if all_of_them or deadline <= now]
            waits[:] = [(deadline, e) for deadline, e in waits if not (all_of_them or deadline <= now)]
            if not waits:
                del self.waiting[key]
        self.waiting_count -= len(out)
        return out

    def _pop_oldest(self) -> Embedding:
        key = min(self.waiting, key=lambda k: self.waiting[k][0][0])
        waits = self.waiting[key]
        _, e = waits.pop(0)
        if not waits:
            del self.waiting[key]
        self.waiting_count -= 1
        return e

    @staticmethod
    def _filled(e: Embedding, repeated: Embedding) -> Embedding:
        return dataclasses.replace(e, emb=repeated.emb, model=repeated.model)
