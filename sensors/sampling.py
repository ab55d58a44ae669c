"""Which frames the pipeline's windows use, so that a device can leave out the pixels of the others.

Windows lie on a grid of the device's clock, and each takes its frames at fixed offsets from its start: the
first frame at or after each sample moment. A frame is therefore used when a sample moment lies after the
frame before it and at or before it, which the device can tell as well as the pipeline. A device given the
pipeline's `FrameSampling` (streaming/windowing.py `WindowingConfig.frame_sampling`) sends the other frames as
omitted (their header, no pixels: PROTOCOL.md): at 30 fps, 28 of 30 camera and 29 of 30 depth frames.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FrameSampling:
    """Sample moments `k * hop_ns + offset` for every integer k and each of `offsets_ns`."""

    hop_ns: int
    offsets_ns: tuple[int, ...]

    def takes(self, previous_t: int | None, t: int) -> bool:
        """Whether the frame at `t` is used, the frame before it being at `previous_t` (None: no frame before
        it that follows on, e.g. the first one, or one after a restart: always used)."""
        if previous_t is None:
            return True
        hop = self.hop_ns
        return any((t - o) // hop > (previous_t - o) // hop for o in self.offsets_ns)
