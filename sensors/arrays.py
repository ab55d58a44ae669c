"""Publishers for depth/thermal frames and IMU samples taken from numpy arrays or files."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from .clock import Pacer
from .protocol import IMU, IMU_COLUMNS, IMU_DTYPE, IMU_RATES, NS_PER_S
from .publisher import DevicePublisher

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
DEFAULT_IMU_CHUNK_S = 0.1  # PROTOCOL.md section 5, recommended chunking
GAP_PERIODS = 1.5  # an IMU row further than this many periods from the previous one starts a new chunk
CSV_COLUMNS = 1 + len(IMU_COLUMNS)  # t (seconds), ax, ay, az, gx, gy, gz


def _read_image(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise OSError(f"cannot read image {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image


def load_frames(path: str | Path) -> Iterable[np.ndarray]:
    """(h, w) frames from a .npy stack (N, h, w), a directory of images (sorted by name) or one image.

    Images are read unchanged (16-bit PNG/TIFF stay uint16); colour images become grey, as LLVIP's.
    """
    path = Path(path)
    if path.suffix == ".npy":
        frames = np.load(path, mmap_mode="r")
        return frames if frames.ndim == 3 else frames[np.newaxis]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        return (_read_image(p) for p in files)
    return [_read_image(path)]


def frame_times(fps: float, start_ns: int) -> Iterator[int]:
    """start_ns + k / fps in integer nanoseconds, without drift."""
    rate = Fraction(fps).limit_denominator(1001)
    k = 0
    while True:
        yield start_ns + k * NS_PER_S * rate.denominator // rate.numerator
        k += 1


def publish_frames(
    publisher: DevicePublisher,
    sensor: str,
    frames: Iterable[np.ndarray],
    fps: float,
    *,
    start_ns: int | None = None,
    realtime: bool = True,
) -> int:
    """Send depth or thermal frames at `fps` (dtype/shape taken from each array); returns the count."""
    start_ns = time.monotonic_ns() if start_ns is None else start_ns
    pacer = Pacer(1.0 if realtime else None)
    count = 0
    for t_ns, frame in zip(frame_times(fps, start_ns), frames):
        pacer.wait(t_ns)
        publisher.send(sensor, t_ns, np.asarray(frame))
        count += 1
    return count


@dataclass
class ImuRecording:
    """IMU rows [ax, ay, az, gx, gy, gz] (m/s^2, rad/s) with per-row device times."""

    t_ns: np.ndarray  # (n,) int64
    samples: np.ndarray  # (n, 6) float32
    rate: int

    @classmethod
    def from_array(cls, samples: np.ndarray, rate: int, start_ns: int | None = None) -> ImuRecording:
        """Evenly spaced rows starting at `start_ns` (default: now on the monotonic clock)."""
        start_ns = time.monotonic_ns() if start_ns is None else start_ns
        t_ns = start_ns + np.arange(len(samples), dtype=np.int64) * NS_PER_S // rate
        return cls(t_ns, np.asarray(samples, IMU_DTYPE), rate)

    @classmethod
    def from_csv(cls, path: str | Path) -> ImuRecording:
        """CSV with columns t (seconds), ax, ay, az, gx, gy, gz; an optional header row; rate from timestamps."""
        with open(path) as f:
            first = f.readline().split(",")[0].strip()
        try:
            float(first)
            skip = 0
        except ValueError:
            skip = 1
        table = np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2, dtype=np.float64)
        if table.shape[1] != CSV_COLUMNS or len(table) < 2:
            raise ValueError(f"{path}: need >= 2 rows of {CSV_COLUMNS} columns (t, ax, ay, az, gx, gy, gz)")
        t_ns = np.round(table[:, 0] * NS_PER_S).astype(np.int64)
        period_ns = float(np.median(np.diff(t_ns)))
        rate = round(NS_PER_S / period_ns) if period_ns > 0 else 0
        if not IMU_RATES[0] <= rate <= IMU_RATES[1]:
            raise ValueError(f"{path}: inferred rate {rate} Hz is outside {IMU_RATES[0]}..{IMU_RATES[1]}")
        return cls(t_ns, table[:, 1:].astype(IMU_DTYPE), rate)

    def chunks(self, chunk_s: float = DEFAULT_IMU_CHUNK_S) -> Iterator[tuple[int, np.ndarray]]:
        """(t_ns of the first row, rows) of at most chunk_s each, split where rows are missing."""
        size = max(1, round(self.rate * chunk_s))
        gaps = np.flatnonzero(np.diff(self.t_ns) > GAP_PERIODS * NS_PER_S / self.rate) + 1
        bounds = [0, *gaps.tolist(), len(self.t_ns)]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            for i in range(lo, hi, size):
                yield int(self.t_ns[i]), self.samples[i : min(i + size, hi)]


def publish_imu(
    publisher: DevicePublisher, recording: ImuRecording, *, chunk_s: float = DEFAULT_IMU_CHUNK_S, realtime: bool = True
) -> int:
    """Send the recording in chunks of `chunk_s`; returns the number of chunks."""
    pacer = Pacer(1.0 if realtime else None)
    count = 0
    for t_ns, rows in recording.chunks(chunk_s):
        pacer.wait(t_ns)
        publisher.send(IMU, t_ns, rows, rate=recording.rate)
        count += 1
    return count
