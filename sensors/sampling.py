"""Which frames the pipeline's windows use, so that a device can leave out the pixels of the others.

Windows lie on a grid of the device's clock, and each takes its frames at fixed offsets from its start: the
first frame at or after each sample moment. A frame is therefore used when a sample moment lies after the
frame before it and at or before it, which the device can tell as well as the pipeline. A device given the
pipeline's `FrameSampling` (streaming/windowing.py `WindowingConfig.frame_sampling`) sends the other frames as
omitted (their header, no pixels: PROTOCOL.md): of a 30 fps camera or depth stream, 29 frames of every 30.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class FrameSampling:
    """Sample moments `k * hop_ns + offset` for every integer k and each of `offsets_ns`."""

    hop_ns: int
    offsets_ns: tuple[int, ...]

    def takes(self, previous_t: int | None, t: int) -> bool:
        """Whether the frame at `t` is used, the frame before it being at `previous_t` (None: no frame before
        it that follows on, e.g. the first one, or one after a restart: always used; so is a frame not after
        the previous one, a clock that stepped back, as the server keeps it whole)."""
        if previous_t is None or t <= previous_t:
            return True
        hop = self.hop_ns
        return any((t - o) // hop > (previous_t - o) // hop for o in self.offsets_ns)


class FrameOmitter:
    """A device's side of `FrameSampling`: remembers each frame sensor's last frame, sent or omitted, and says
    which frames go without pixels. Without a sampling for a sensor, every frame goes whole."""

    def __init__(self, sampling: Mapping[str, FrameSampling] | None = None):
        self.sampling = dict(sampling or {})
        self.last_t: dict[str, int] = {}

    def takes(self, sensor: str, t: int) -> bool:
        """Whether the frame of `sensor` at `t` would go with its pixels (nothing is remembered)."""
        sampling = self.sampling.get(sensor)
        return sampling is None or sampling.takes(self.last_t.get(sensor), t)

    def omits(self, sensor: str, t: int) -> bool:
        """Whether to send the frame of `sensor` at `t` omitted; it becomes the sensor's last frame."""
        omit = not self.takes(sensor, t)
        if sensor in self.sampling:
            self.last_t[sensor] = t
        return omit
