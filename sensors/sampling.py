"""Which frames the pipeline's windows use, so that a device can leave out the pixels of the others.

Windows lie on a grid of the device's clock, and each takes its frames at fixed offsets from its start: the
first frame at or after each sample moment. A frame is therefore used when a sample moment lies after the
frame before it and at or before it, which the device can tell as well as the pipeline. A device given the
pipeline's `FrameSampling` (streaming/windowing.py `WindowingConfig.frame_sampling`) sends the other frames as
omitted (their header, no pixels: PROTOCOL.md): of a 30 fps camera or depth stream, 29 frames of every 30.
With the server's largest gap between frames (`max_gap_ns`), it sends only as many of those headers as keep
its frames that close, and skips the rest: a stream at a lower frame rate, with the same windows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

SEND, OMIT, SKIP = "send", "omit", "skip"  # a frame goes whole, as its header only, or not at all


@dataclass(frozen=True)
class FrameSampling:
    """Sample moments `k * hop_ns + offset` for every integer k and each of `offsets_ns`. `max_gap_ns`: frames
    further apart than this leave a hole in the server's stream (None: a device must send every frame)."""

    hop_ns: int
    offsets_ns: tuple[int, ...]
    max_gap_ns: int | None = None

    def takes(self, previous_t: int | None, t: int) -> bool:
        """Whether the frame at `t` is used, the frame before it being at `previous_t` (None: no frame before
        it that follows on, e.g. the first one, or one after a restart: always used; so is a frame not after
        the previous one, a clock that stepped back, as the server keeps it whole)."""
        if previous_t is None or t <= previous_t:
            return True
        hop = self.hop_ns
        return any((t - o) // hop > (previous_t - o) // hop for o in self.offsets_ns)


# The frames the server's default windows use (PROTOCOL.md section 5: vision windows take the frames at x.5 s of
# the device clock, depth and thermal windows those at whole seconds; frames at most 250 ms apart), for a device
# that cannot ask the server; a server's own are streaming/windowing.py `WindowingConfig.frame_sampling()`.
DEFAULT_GAP_NS = 250_000_000
DEFAULT_SAMPLING = {
    "camera": FrameSampling(10**9, (5 * 10**8,), DEFAULT_GAP_NS),
    "depth": FrameSampling(10**9, (0,), DEFAULT_GAP_NS),
    "thermal": FrameSampling(10**9, (0,), DEFAULT_GAP_NS),
}


class FrameOmitter:
    """A device's side of `FrameSampling`: remembers each frame sensor's last frame and last frame sent, decides
    how each frame goes, and numbers what goes (`next`, for every sensor). Without a sampling for a sensor, every
    frame goes whole."""

    def __init__(self, sampling: Mapping[str, FrameSampling] | None = None):
        self.sampling = dict(sampling or {})
        self.last_t: dict[str, int] = {}
        self.last_sent_t: dict[str, int] = {}
        self.seq: Counter[str] = Counter()  # sensor -> the seq of its next message

    def takes(self, sensor: str, t: int) -> bool:
        """Whether the frame of `sensor` at `t` would go with its pixels (nothing is remembered)."""
        sampling = self.sampling.get(sensor)
        return sampling is None or sampling.takes(self.last_t.get(sensor), t)

    def decide(self, sensor: str, t: int) -> str:
        """SEND the frame of `sensor` at `t` whole (a window uses it), OMIT its pixels, or SKIP it: with the
        sampling's `max_gap_ns`, a frame is skipped while the frames sent stay within the gap even if the next
        two frames came at this one's spacing (so one frame the camera misses leaves no hole). It becomes the
        sensor's last frame."""
        sampling = self.sampling.get(sensor)
        if sampling is None:
            return SEND
        last, sent = self.last_t.get(sensor), self.last_sent_t.get(sensor)
        how = OMIT
        if sampling.takes(last, t):
            how = SEND
        elif last is not None and sent is not None and sampling.max_gap_ns is not None:
            if (t - sent) + 2 * (t - last) <= sampling.max_gap_ns:
                how = SKIP
        self.last_t[sensor] = t
        if how != SKIP:
            self.last_sent_t[sensor] = t
        return how

    def next(self, sensor: str, t: int) -> tuple[int, bool] | None:
        """The message of `sensor` at `t` as it goes: None when it is skipped (no message, no number), else its
        `seq` (each sensor's messages count 0, 1, ... in the order they go) and whether its pixels are omitted."""
        how = self.decide(sensor, t)
        if how == SKIP:
            return None
        seq = self.seq[sensor]
        self.seq[sensor] = seq + 1
        return seq, how == OMIT

    def not_sent(self, sensor: str, seq: int) -> None:
        """The message just numbered `seq` failed before it could go (an invalid one): the next message of `sensor`
        takes its number, and, as after `lost`, the next frame is not skipped."""
        self.seq[sensor] = seq
        self.lost(sensor)

    def lost(self, sensor: str) -> None:
        """The frame just decided to go did not leave (a full send queue): the next frame is not skipped, so the
        frames that reach the server stay within the gap."""
        self.last_sent_t.pop(sensor, None)
