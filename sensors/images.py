"""JPEG/PNG helpers: read an encoded image's size without decoding it, and encode JPEG.

Reading the size from the JPEG SOF segment or the PNG IHDR chunk lets ingest bound
the decoded size (no decompression bombs) at the cost of a few byte reads.
"""

from __future__ import annotations

import zlib

import cv2
import numpy as np

JPEG_MAGIC = b"\xff\xd8"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNG_IHDR = b"IHDR"
PNG_SIZE_END = 24  # magic (8) + chunk length (4) + b"IHDR" (4) + width (4) + height (4)
MARKER = 0xFF
SOS = 0xDA  # start of scan: entropy-coded data follows, no SOF seen before it means unparseable
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # DHT, JPG, DAC are not frames
STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RSTn carry no length
MAX_SEGMENTS = 128  # real files reach SOF within a dozen segments
PNG_DEPTH_AT, PNG_COLOR_AT, PNG_INTERLACE_AT = 24, 25, 28  # IHDR bit depth, colour type and interlace bytes
PNG_FIRST_CHUNK = 8  # after the magic
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel (3: palette index)


def _be16(buf: memoryview, i: int) -> int:
    return (buf[i] << 8) | buf[i + 1]


def _jpeg_size(buf: memoryview) -> tuple[int, int] | None:
    i, n = len(JPEG_MAGIC), len(buf)
    for _ in range(MAX_SEGMENTS):
        if i + 4 > n or buf[i] != MARKER:
            return None
        marker = buf[i + 1]
        if marker == MARKER:  # fill byte
            i += 1
        elif marker in STANDALONE_MARKERS:
            i += 2
        elif marker in SOF_MARKERS:
            if i + 9 > n:
                return None
            return _be16(buf, i + 5), _be16(buf, i + 7)
        elif marker == SOS:
            return None
        else:
            i += 2 + _be16(buf, i + 2)
    return None


def encoded_image_size(buf: memoryview, encoding: str) -> tuple[int, int] | None:
    """(height, width) declared by a JPEG or PNG byte stream, or None if it is not one."""
    if encoding == "jpeg" and buf[: len(JPEG_MAGIC)] == JPEG_MAGIC:
        return _jpeg_size(buf)
    if encoding == "png" and len(buf) >= PNG_SIZE_END and buf[: len(PNG_MAGIC)] == PNG_MAGIC and buf[12:16] == PNG_IHDR:
        width = int.from_bytes(buf[16:20], "big")
        height = int.from_bytes(buf[20:24], "big")
        return height, width
    return None


def jpeg_scan_count(buf: memoryview) -> int:
    """Start-of-scan markers in a JPEG. Inside entropy-coded data 0xFF is always followed by 0x00 or a
    restart marker, so every 0xFF 0xDA pair is a scan: baseline files have 1, progressive ones about 10."""
    data = np.frombuffer(buf, np.uint8)
    after_ff = np.flatnonzero(data[:-1] == MARKER) + 1
    return int(np.count_nonzero(data[after_ff] == SOS))


def png_decoded_bytes(buf: memoryview) -> int | None:
    """Bytes of the raw pixels a PNG inflates to (what decoding it costs), from its IHDR; None if unreadable."""
    if len(buf) <= PNG_COLOR_AT or buf[PNG_COLOR_AT] not in PNG_SAMPLES:
        return None
    height, width = encoded_image_size(buf, "png") or (0, 0)
    return height * width * PNG_SAMPLES[buf[PNG_COLOR_AT]] * max(buf[PNG_DEPTH_AT], 8) // 8


def _png_filtered_bytes(buf: memoryview) -> int:
    """Bytes the IDAT stream of a PNG must inflate to: per row of each (Adam7) pass, a filter byte and the
    row's samples."""
    height, width = encoded_image_size(buf, "png") or (0, 0)
    bits = PNG_SAMPLES.get(buf[PNG_COLOR_AT], 4) * buf[PNG_DEPTH_AT]
    passes = ADAM7 if len(buf) > PNG_INTERLACE_AT and buf[PNG_INTERLACE_AT] == 1 else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        columns, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if columns > 0 and rows > 0:
            total += rows * (1 + -(-columns * bits // 8))
    return total


def png_inflates_within_size(buf) -> bool:
    """Whether a PNG's image data inflates to no more than its header says. libpng inflates all of it
    (warning "too much image data"), so 8 MB of compressed zeros behind a 64 x 64 image cost ~17 s; this
    inflates at most one byte more than the image needs."""
    buf = memoryview(buf)
    data, i = [], PNG_FIRST_CHUNK
    while i + 8 <= len(buf):
        length, kind = int.from_bytes(buf[i : i + 4], "big"), bytes(buf[i + 4 : i + 8])
        if kind == b"IDAT":
            data.append(buf[i + 8 : i + 8 + length])
        i += 12 + length  # length, type, data, CRC
    expected = _png_filtered_bytes(buf)
    inflated = zlib.decompressobj().decompress(b"".join(data), expected + 1)
    return len(inflated) <= expected


def encode_jpeg(bgr: np.ndarray, quality: int) -> np.ndarray:
    """JPEG bytes (1-D uint8 array) of a BGR uint8 image; deterministic for a given input."""
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.reshape(-1)
