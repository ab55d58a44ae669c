"""Attacks for tests/test_hostile.py and bench/hostile.py: hostile payloads (each small on the wire and,
before the hardening of issue 9, expensive to process; built here, never stored), attacks that send them
to an ingest endpoint, and `beside_legit`, which runs one while a legitimate wearable streams."""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass

import cv2
import msgpack
import numpy as np
import redis
import zmq

from sensors.protocol import decode, encode_header
from sensors.simulator import SimulatedWearable
from streaming.bench import MB, actor_pids, private_rss_mb
from streaming.stage import Counts
from streaming.subscriber import read_all
from streaming.windowing import SECOND, Windower, WindowingConfig

from .conftest import wait_for

SOS = b"\xff\xda"
EOI = b"\xff\xd9"
# a progressive AC scan of component 1 (Ss=1, Se=63, Ah=Al=0) with no entropy-coded data after it
EMPTY_AC_SCAN = SOS + b"\x00\x08\x01\x01\x00\x01\x3f\x00"


def progressive_jpeg(side: int, seed: int = 0) -> bytes:
    """A valid progressive JPEG of side x side pixels (about 10 scans)."""
    rgb = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(
        ".jpg", cv2.GaussianBlur(rgb, (31, 31), 0), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_QUALITY, 50]
    )
    assert ok
    return buf.tobytes()


def scan_bomb_jpeg(side: int = 4096, scans: int = 30_000) -> bytes:
    """A progressive JPEG whose first scan is followed by `scans` empty scans: each costs the decoder a pass
    over every block (~1 ms at 4096 x 4096), so 400 kB cost ~40 s before the scan limit."""
    jpeg = progressive_jpeg(side)
    second_scan = [m.start() for m in re.finditer(SOS, jpeg)][1]
    return jpeg[:second_scan] + EMPTY_AC_SCAN * scans + EOI


def padded_png(side: int = 64, pad_mb: int = 200) -> bytes:
    """A valid side x side RGB PNG whose image data goes on with `pad_mb` MB of compressed zeros: libpng
    inflates them all (~2 s per GB) although the image needs a few kB."""
    row = b"\x00" + bytes(side * 3)
    deflate = zlib.compressobj(9)
    compressed = deflate.compress(row * side) + b"".join(deflate.compress(bytes(MB)) for _ in range(pad_mb))
    return _png(struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0), compressed + deflate.flush())


def _png(ihdr: bytes, idat: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_bomb(side: int = 4096, bit_depth: int = 16, colour_type: int = 6) -> bytes:
    """A PNG of zeros (RGBA, 16 bits by default): ~130 kB that inflate to side * side * 8 bytes."""
    samples = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    row = b"\x00" + bytes(side * samples * bit_depth // 8)  # filter byte, then the row's samples
    deflate = zlib.compressobj(9)
    compressed = b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush()
    return _png(struct.pack(">IIBBBBB", side, side, bit_depth, colour_type, 0, 0, 0), compressed)


# ----- a legitimate device beside an attack -----

START_NS = 1_000 * SECOND
ATTACKER = "attacker"  # every attacking device id starts with this


def expected_windows(messages) -> set[tuple[str, int]]:
    """(modality, t0) of every window a clean run cuts from `messages` ((header, payload) pairs). Unmetered: run
    offline at full speed, a device's CPU allowance (share of wall time) could throttle its last messages here on a
    busy machine, where the pipeline, taking them at real pace, keeps them."""
    windower = Windower(WindowingConfig(device_cpu_share=1e9, device_cpu_burst_s=1e9))
    keys = set()
    for header, payload in messages:
        keys |= {(w.modality, w.t0) for w in windower.add(decode([msgpack.packb(header), payload]))}
    return keys


def send_paced(endpoint: str, messages, speed: float) -> None:
    """Send with blocking PUSH at `speed` x device time."""
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(endpoint)
    began, t_first = time.monotonic(), messages[0][0]["t_ns"]
    for header, payload in messages:
        delay = (header["t_ns"] - t_first) / 1e9 / speed - (time.monotonic() - began)
        if delay > 0:
            time.sleep(delay)
        push.send_multipart([msgpack.packb(header), payload])
    push.close(linger=-1)


def published_keys(url: str, device: str) -> list[tuple[str, int]]:
    return [(r.modality, r.t0) for r in read_all(redis.Redis.from_url(url), device) if r.modality != "fused"]


class MemoryWatch:
    """Samples the private memory of every stage process every 0.1 s; `growth()` is each one's peak over
    its first sample, MB."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.first = private_rss_mb(pids)
        self.peak = dict(self.first)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for name, mb in private_rss_mb(self.pids).items():
                self.peak[name] = max(self.peak[name], mb)

    def growth(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {name: self.peak[name] - self.first[name] for name in self.pids}


@dataclass
class Outcome:
    attack: str
    expected: int  # the legitimate device's windows
    lost: int  # ... not published
    growth_mb: dict[str, float]  # per stage process: peak private memory over its level before the attack
    counted: Counter  # "stage: event" -> n, counted under an attacker's id (or the victim's, for forgeries)


def counted_under(stats: dict[str, list[dict]], prefix: tuple[str, ...]) -> Counter:
    """Drops, refusals and closures counted under labels starting with one of `prefix`, under "other" (where
    a stage counts labels beyond its cap of distinct ones), and unlabelled ones of ingest (connections)."""
    out: Counter = Counter()
    for stage, actors in stats.items():
        counts = Counts.of(*actors)
        for event in counts.events():
            bad = event.startswith(("dropped_", "rejected_", "refused_", "closed_", "evicted_"))
            for label, n in counts.labels(event).items():
                if bad and (label.startswith(prefix) or label == "other" or (not label and stage == "ingest")):
                    out[f"{stage}: {event}"] += n
    return out


def settled_stats(pipeline, quiet_s: float = 1.0, timeout_s: float = 60.0) -> dict:
    """The pipeline's stats once no stage has counted anything for `quiet_s` (what was sent is settled)."""

    def total(stats):
        counts = Counts.of(*(a for actors in stats.values() for a in actors))
        return sum(map(counts.get, counts.events()))

    stats, deadline = pipeline.stats(), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        latest = pipeline.stats()
        if total(latest) == total(stats):
            return latest
        stats = latest
    return stats


def beside_legit(pipeline, redis_url: str, name: str, attack, seconds: float = 6.0, seed: int = 0) -> Outcome:
    """Stream a simulated wearable at its real pace for `seconds` while `attack(endpoint, victim)` runs, wait
    for its windows to be published, and say what it lost, what the attack cost and how it was counted."""
    (endpoint,) = pipeline.endpoints
    victim = f"legit-{name}"
    messages = list(SimulatedWearable(victim, seed=seed, start_ns=START_NS).messages(seconds))
    expected = expected_windows(messages)
    before = counted_under(pipeline.stats(), (ATTACKER, victim))
    watch = MemoryWatch(actor_pids(pipeline))
    admitted = ingested(pipeline)
    sender = threading.Thread(target=send_paced, args=(endpoint, messages, 1.0))
    sender.start()
    # the wearable is already streaming when the attack starts (ingest passed its first message on): a device
    # new at the moment a flood of ids fills the device cap waits for an eviction, by design (streaming/ingest.py)
    wait_for(lambda: ingested(pipeline) > admitted, 30, "ingest to pass the wearable's first message on", poll_s=0.05)
    attack(endpoint, victim)
    sender.join()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not expected <= set(published_keys(redis_url, victim)):
        time.sleep(0.2)
    stats = settled_stats(pipeline)
    counted = counted_under(stats, (ATTACKER, victim))
    counted.subtract(before)
    return Outcome(
        name, len(expected), len(expected - set(published_keys(redis_url, victim))), watch.growth(), +counted
    )


def ingested(pipeline) -> int:
    """Messages ingest has passed on (it counts them with each batch)."""
    return Counts.of(*pipeline.stats()["ingest"]).get("in")


# ----- attacks: each is attack(endpoint, victim) -----


def _push(endpoint: str) -> zmq.Socket:
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 100_000)
    push.connect(endpoint)
    return push


def _send_all(endpoint: str, messages) -> None:
    push = _push(endpoint)
    for header, payload in messages:
        push.send_multipart([encode_header(**header), payload])
    push.close(linger=-1)


def odd_rate_audio(endpoint: str, victim: str, devices: int = 2) -> None:
    """Mic streams at rates that share no factor with 16 kHz (8 channels of float32, 3 s each)."""
    messages = []
    for d, rate in enumerate([44_101, 191_999, 8_001][:devices] + [96_001] * max(devices - 3, 0)):
        chunk = rate // 50
        samples = np.random.default_rng(d).uniform(-1, 1, (chunk, 8)).astype(np.float32).tobytes()
        messages += [
            (
                dict(
                    device=f"{ATTACKER}-rate{d}",
                    sensor="mic",
                    seq=k,
                    t_ns=START_NS + k * SECOND // 50,
                    rate=rate,
                    channels=8,
                    dtype="float32",
                ),
                samples,
            )
            for k in range(150)
        ]
    _send_all(endpoint, messages)


def image_bombs(endpoint: str, victim: str, count: int = 4) -> None:
    """Progressive JPEGs of 30,000 empty scans and 16-bit RGBA PNGs, 4096 x 4096."""
    bombs = [("jpeg", scan_bomb_jpeg()), ("png", png_bomb())]
    _send_all(
        endpoint,
        [
            (
                dict(
                    device=f"{ATTACKER}-bomb",
                    sensor="camera",
                    seq=k,
                    t_ns=START_NS + k * SECOND // 2,
                    encoding=bombs[k % 2][0],
                ),
                bombs[k % 2][1],
            )
            for k in range(count)
        ],
    )


def padded_pngs(endpoint: str, victim: str, seconds: float = 4.0, pad_mb: int = 200) -> None:
    """A camera of 64 x 64 PNGs at 10 fps whose image data goes on with `pad_mb` MB of compressed zeros
    (ingest cannot tell: only inflating shows it; ~0.4 s per frame for 200 MB, 17 s for 8 MB on the wire)."""
    png = padded_png(64, pad_mb)
    _send_all(
        endpoint,
        [
            (
                dict(
                    device=f"{ATTACKER}-png", sensor="camera", seq=k, t_ns=START_NS + k * SECOND // 10, encoding="png"
                ),
                png,
            )
            for k in range(int(seconds * 10))
        ],
    )


def costly_frames(endpoint: str, victim: str, seconds: float = 6.0, speed: float = 5.0) -> None:
    """Valid 4095 x 4095 progressive JPEGs at 30 fps, sent at `speed` x real time: within every limit, but
    each sampled frame (2 a second) costs ~0.1 s to decode. Odd sides, as an attacker would pick them: a frame
    whose sides divide by 2 is decoded at a fraction of its size (`jpeg_min_side`, streaming/windowing.py)."""
    jpeg = progressive_jpeg(4095)
    push = _push(endpoint)
    began = time.monotonic()
    for k in range(int(seconds * 30)):
        time.sleep(max(0.0, k / (30 * speed) - (time.monotonic() - began)))
        push.send_multipart(
            [encode_header(f"{ATTACKER}-4k", "camera", k, START_NS + k * SECOND // 30, encoding="jpeg"), jpeg]
        )
    push.close(linger=-1)


def omitted_frames(endpoint: str, victim: str, frames: int = 5_000) -> None:
    """Header-only depth frames (PROTOCOL.md section 5: `omitted`, no pixels) as fast as they go, at 1,000 fps of
    device time: the cheapest messages to send, each of which ingest and windowing must still check; none carries
    the pixels a window needs."""
    fields = dict(device=f"{ATTACKER}-omit", sensor="depth", dtype="uint16", shape=[480, 640], omitted=True)
    _send_all(endpoint, [(dict(fields, seq=k, t_ns=START_NS + k * SECOND // 1000), b"") for k in range(frames)])


def huge_imu(endpoint: str, victim: str) -> None:
    """6 s of IMU rows of +-3e38 (finite float32), which overflowed the encoder to NaN."""
    rows = np.where(np.arange(40 * 6).reshape(40, 6) % 2, 3e38, -3e38).astype(np.float32).tobytes()
    _send_all(
        endpoint,
        [
            (dict(device=f"{ATTACKER}-imu", sensor="imu", seq=k, t_ns=START_NS + k * SECOND // 20, rate=800), rows)
            for k in range(120)
        ],
    )


def forged_seq_and_clock(endpoint: str, victim: str) -> None:
    """Messages in the victim's name (no CurveZMQ) with seq 2^63-1, or a clock 2^62 ns ahead, mid-stream."""
    time.sleep(2.5)
    audio = np.zeros((960, 1), np.int16).tobytes()
    forged = [dict(seq=2**63 - 1, t_ns=START_NS + 3 * SECOND), dict(seq=140, t_ns=START_NS + 2**62)]
    _send_all(
        endpoint,
        [(dict(device=victim, sensor="mic", rate=48_000, channels=1, dtype="int16", **f), audio) for f in forged],
    )


def device_id_flood(endpoint: str, victim: str, ids: int = 2000, name: str = f"{ATTACKER}-id") -> None:
    """One small IMU message from each of `ids` new device ids (`name` and a number)."""
    row = np.zeros((1, 6), np.float32).tobytes()
    _send_all(
        endpoint, [(dict(device=f"{name}{k}", sensor="imu", seq=0, t_ns=START_NS, rate=800), row) for k in range(ids)]
    )


def _zmtp_push_greeting() -> bytes:
    """What a ZMTP 3.0 PUSH peer with the NULL mechanism sends first: greeting, then READY."""
    greeting = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + bytes(31)
    body = b"\x05READY" + b"\x0bSocket-Type" + (4).to_bytes(4, "big") + b"PUSH"
    return greeting + b"\x04" + bytes([len(body)]) + body


def connection_flood(
    endpoint: str,
    victim: str,
    silent: int = 200,
    raw: int = 100,
    partial: int = 10,
    partial_mb: int = 4,
    hold_s: float = 5.0,
) -> None:
    """`silent` ZeroMQ peers that connect and never send, `raw` TCP connections that never greet, and
    `partial` peers that send `partial_mb` MB of a frame 1 MB longer and stall; all held `hold_s`."""
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    ctx = zmq.Context()
    ctx.max_sockets = silent + 16
    peers = [ctx.socket(zmq.PUSH) for _ in range(silent)]
    for peer in peers:
        peer.connect(endpoint)
    conns = []
    for _ in range(raw):
        conns.append(socket.create_connection((host, int(port))))
    chunk = bytes(partial_mb * MB)
    for _ in range(partial):
        conn = socket.create_connection((host, int(port)))
        conn.sendall(_zmtp_push_greeting() + b"\x03" + ((partial_mb + 1) * MB).to_bytes(8, "big"))
        try:
            conn.settimeout(2)
            conn.sendall(chunk)
        except OSError:  # refused or closed by the server: part of the attack's outcome
            pass
        conns.append(conn)
    time.sleep(hold_s)
    for conn in conns:
        conn.close()
    ctx.destroy(linger=0)
