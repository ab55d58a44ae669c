"""Hostile payloads for the attack tests and `bench/hostile.py`: each is small on the wire and, before the
hardening of issue 9, expensive to process. Built here, never stored."""

from __future__ import annotations

import re
import struct
import zlib

import cv2
import numpy as np

SOS = b"\xff\xda"
EOI = b"\xff\xd9"
# a progressive AC scan of component 1 (Ss=1, Se=63, Ah=Al=0) with no entropy-coded data after it
EMPTY_AC_SCAN = SOS + b"\x00\x08\x01\x01\x00\x01\x3f\x00"


def progressive_jpeg(side: int, seed: int = 0) -> bytes:
    """A valid progressive JPEG of side x side pixels (about 10 scans)."""
    rgb = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", cv2.GaussianBlur(rgb, (31, 31), 0),
                           [cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_QUALITY, 50])
    assert ok
    return buf.tobytes()


def scan_bomb_jpeg(side: int = 4096, scans: int = 30_000) -> bytes:
    """A progressive JPEG whose first scan is followed by `scans` empty scans: each costs the decoder a pass
    over every block (~1 ms at 4096 x 4096), so 400 kB cost ~40 s before the scan limit."""
    jpeg = progressive_jpeg(side)
    second_scan = [m.start() for m in re.finditer(SOS, jpeg)][1]
    return jpeg[:second_scan] + EMPTY_AC_SCAN * scans + EOI


def png_bomb(side: int = 4096, bit_depth: int = 16, colour_type: int = 6) -> bytes:
    """A PNG of zeros (RGBA, 16 bits by default): ~130 kB that inflate to side * side * 8 bytes."""
    samples = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    row = b"\x00" + bytes(side * samples * bit_depth // 8)  # filter byte, then the row's samples

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, bit_depth, colour_type, 0, 0, 0)
    idat = zlib.compressobj(9)
    compressed = b"".join(idat.compress(row) for _ in range(side)) + idat.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", compressed) + chunk(b"IEND", b"")
