"""Camera publisher: OpenCV capture (device index, video file or stream URL) sent as JPEG."""

from __future__ import annotations

import os
import time
from collections.abc import Generator
from contextlib import closing
from itertools import islice

import cv2
import numpy as np

from .clock import Pacer
from .images import encode_jpeg
from .protocol import CAMERA
from .publisher import DevicePublisher

DEFAULT_JPEG_QUALITY = 90
NS_PER_MS = 1_000_000


def open_capture(source: int | str) -> cv2.VideoCapture:
    """VideoCapture for a device index (int or digit string), a file path or a URL."""
    if isinstance(source, str) and source.isdigit():
        source = int(source)
    cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        raise OSError(f"cannot open camera source {source!r}")
    return cap


def capture_frames(source: int | str, *, realtime: bool = True) -> Generator[tuple[int, np.ndarray], None, None]:
    """(t_ns, BGR frame) pairs on the monotonic clock.

    Live sources are stamped when the frame is grabbed. Files are stamped with
    open time + the frame's position in the file, and paced to it when `realtime`.
    """
    is_file = isinstance(source, str) and os.path.isfile(source)
    cap = open_capture(source)
    start_ns = time.monotonic_ns()
    pacer = Pacer(1.0 if realtime and is_file else None)
    try:
        while cap.grab():
            if is_file:
                t_ns = start_ns + round(cap.get(cv2.CAP_PROP_POS_MSEC) * NS_PER_MS)
                pacer.wait(t_ns)
            else:
                t_ns = time.monotonic_ns()
            ok, frame = cap.retrieve()
            if not ok:
                break
            yield t_ns, frame
    finally:
        cap.release()


def publish_camera(
    publisher: DevicePublisher,
    source: int | str,
    *,
    quality: int = DEFAULT_JPEG_QUALITY,
    max_frames: int | None = None,
    realtime: bool = True,
) -> int:
    """JPEG-encode and send frames until the source ends or `max_frames`; returns frames handed to send."""
    count = 0
    with closing(capture_frames(source, realtime=realtime)) as frames:
        for t_ns, frame in islice(frames, max_frames):
            publisher.send(CAMERA, t_ns, encode_jpeg(frame, quality), encoding="jpeg")
            count += 1
    return count
