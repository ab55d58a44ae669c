"""Pacing: map a stream's own clock onto wall time."""

from __future__ import annotations

import time

from .protocol import NS_PER_S


class Pacer:
    """Sleeps so that stream time t_ns is reached `1/speed` times as fast as wall time.

    The first `wait` anchors the stream clock to now; `speed=None` never sleeps.
    """

    def __init__(self, speed: float | None = 1.0):
        if speed is not None and speed <= 0:
            raise ValueError(f"speed must be positive or None, got {speed}")
        self.speed = speed
        self._origin: tuple[int, int] | None = None

    def wait(self, t_ns: int) -> None:
        if self.speed is None:
            return
        now = time.monotonic_ns()
        if self._origin is None:
            self._origin = (t_ns, now)
            return
        t0, wall0 = self._origin
        delay_ns = wall0 + (t_ns - t0) / self.speed - now
        if delay_ns > 0:
            time.sleep(delay_ns / NS_PER_S)
