"""Wire protocol v1 (see PROTOCOL.md): header encoding and stateless message validation.

A message is two ZeroMQ frames: a msgpack header map and the raw payload bytes.
`decode` checks everything a single message can tell and returns zero-copy numpy views
of the payload; images stay encoded until `decode_image` is called by a later stage.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import cv2
import msgpack
import numpy as np

from .images import encoded_image_size, jpeg_scan_count, png_decoded_bytes, png_inflates_within_size

VERSION = 1
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
NS_PER_S = 1_000_000_000
INT64_MAX = 2**63 - 1

CAMERA, MIC, DEPTH, THERMAL, IMU = "camera", "mic", "depth", "thermal", "imu"
SENSORS = (CAMERA, MIC, DEPTH, THERMAL, IMU)
FRAME_SENSORS = (CAMERA, DEPTH, THERMAL)  # one image per message, at one moment
OMITTED = "omitted"  # header key: a frame taken at t_ns whose pixels the device left out (PROTOCOL.md)
NO_PIXELS = np.empty(0, np.uint8)  # the payload of an omitted frame

ENCODINGS = ("jpeg", "png", "raw")
RGB_CHANNELS = 3
MIC_DTYPES = ("int16", "float32")
DEPTH_DTYPES = ("uint16", "float32")
THERMAL_DTYPES = ("uint8", "uint16", "float32")
MIC_RATES = (8_000, 192_000)
MIC_CHANNELS = (1, 8)
IMU_RATES = (1, 4_000)
IMU_COLUMNS = ("ax", "ay", "az", "gx", "gy", "gz")
DTYPES = {
    name: np.dtype(code) for name, code in (("uint8", "u1"), ("int16", "<i2"), ("uint16", "<u2"), ("float32", "<f4"))
}
IMU_DTYPE = DTYPES["float32"]
IMU_ROW_BYTES = len(IMU_COLUMNS) * IMU_DTYPE.itemsize
JPEG_SCALE_FLAGS = {  # libjpeg's scaled decoding (`decode_image`): 1/f of each side
    8: cv2.IMREAD_REDUCED_COLOR_8,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    1: cv2.IMREAD_COLOR,
}
JPEG_SCALES = (8, 4, 2)
DEVICE_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # no ':', which separates fields of Redis keys
DEVICE_RULE = "1..64 of [A-Za-z0-9_.-]"

# Reason codes carried by Rejected.reason (stable strings: receivers count them per device).
MALFORMED = "malformed"
FRAME_COUNT = "frame_count"
HEADER_TOO_LARGE = "header_too_large"
BAD_VERSION = "bad_version"
UNKNOWN_SENSOR = "unknown_sensor"
MISSING_KEY = "missing_key"
BAD_VALUE = "bad_value"
PAYLOAD_SIZE = "payload_size"
TOO_LARGE = "too_large"
NON_FINITE = "non_finite"
BAD_IMAGE = "bad_image"
TOO_COSTLY = "too_costly"
REASONS = (
    MALFORMED,
    FRAME_COUNT,
    HEADER_TOO_LARGE,
    BAD_VERSION,
    UNKNOWN_SENSOR,
    MISSING_KEY,
    BAD_VALUE,
    PAYLOAD_SIZE,
    TOO_LARGE,
    NON_FINITE,
    BAD_IMAGE,
    TOO_COSTLY,
)


@dataclass(frozen=True)
class Limits:
    """Receiver-side bounds; every message beyond them is refused with TOO_LARGE/HEADER_TOO_LARGE."""

    max_payload_bytes: int = 8 * 1024 * 1024
    max_side: int = 4096  # image, depth and thermal height and width
    max_audio_seconds: float = 1.0
    max_imu_rows: int = 4000
    max_imu_seconds: float = 1.0  # so one message can never complete more than a couple of windows
    max_header_bytes: int = 4096
    max_jpeg_scans: int = 32  # progressive JPEGs have ~10; each scan costs a pass over the whole image
    max_png_bytes: int = 4096 * 4096 * 3  # raw pixels a PNG may inflate to (8-bit RGB at the largest side)


DEFAULT_LIMITS = Limits()


class Rejected(Exception):
    """A message that breaks the protocol; `reason` is one of REASONS, `device` the sender when its header
    named a valid one (so receivers can count rejects per device)."""

    def __init__(self, reason: str, message: str, device: str | None = None):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.device = device


@dataclass(slots=True)
class SensorMessage:
    """One validated message. `payload` is a view of the received frame's buffer (no copy).

    payload: camera jpeg/png -> (nbytes,) uint8; camera raw -> (h, w, 3) uint8 RGB;
    mic -> (n, channels); imu -> (n, 6) float32; depth/thermal -> (h, w).
    `shape` is the image size (h, w, 3) for every camera message, read from the JPEG/PNG header.
    An omitted frame (header `omitted`: the device left its pixels out) has the empty payload NO_PIXELS, and a
    JPEG or PNG one no `shape`.
    """

    device: str
    sensor: str
    seq: int
    t_ns: int
    payload: np.ndarray
    encoding: str | None = None
    rate: int | None = None
    channels: int | None = None
    dtype: str | None = None
    shape: tuple[int, ...] | None = None

    def __reduce__(self):
        # by its fields in order: a fifth cheaper than the slots dataclass's state dict when Ray passes a batch on
        return type(self), _message_fields(self)

    @property
    def nbytes(self) -> int:
        return self.payload.nbytes

    def end_ns(self) -> int:
        """Time just after the last sample (mic/imu chunks); the capture time for frames."""
        if self.rate is None:
            return self.t_ns
        return self.t_ns + len(self.payload) * NS_PER_S // self.rate


_message_fields = operator.attrgetter(*SensorMessage.__slots__)  # every field, in __init__'s order


def _plain(value):
    """msgpack fallback for numpy scalars, arrays and dtypes."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    if isinstance(value, np.dtype):
        return value.name
    raise TypeError(f"cannot encode {type(value).__name__} in a header")


def header_map(device: str, sensor: str, seq: int, t_ns: int, **fields) -> dict:
    """The header of one message as a map: the keys every message has, then the sensor's `fields` (None values
    are left out)."""
    header = {"v": VERSION, "device": device, "sensor": sensor, "seq": int(seq), "t_ns": int(t_ns)}
    header.update((key, value) for key, value in fields.items() if value is not None)
    return header


def encode_header(device: str, sensor: str, seq: int, t_ns: int, **fields) -> bytes:
    """msgpack header for one message (`header_map`)."""
    data = msgpack.packb(header_map(device, sensor, seq, t_ns, **fields), default=_plain)
    if len(data) > DEFAULT_LIMITS.max_header_bytes:
        raise ValueError(f"header is {len(data)} bytes, the limit is {DEFAULT_LIMITS.max_header_bytes}")
    return data


def _view(frame) -> memoryview:
    try:
        view = memoryview(frame)
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    except TypeError:
        raise Rejected(MALFORMED, f"frame is not a contiguous bytes-like object: {type(frame).__name__}") from None


def _field(header: dict, key: str, kind: type):
    try:
        value = header[key]
    except KeyError:
        raise Rejected(MISSING_KEY, f"header has no {key!r}") from None
    if type(value) is not kind:
        raise Rejected(BAD_VALUE, f"{key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _int_in(header: dict, key: str, low: int, high: int) -> int:
    value = _field(header, key, int)
    if not low <= value <= high:
        raise Rejected(BAD_VALUE, f"{key!r}={value} is outside {low}..{high}")
    return value


def _choice(header: dict, key: str, choices: tuple[str, ...]) -> str:
    value = _field(header, key, str)
    if value not in choices:
        raise Rejected(BAD_VALUE, f"{key!r}={value!r} is not one of {', '.join(choices)}")
    return value


def _check_side(h: int, w: int, limits: Limits) -> None:
    if h < 1 or w < 1:
        raise Rejected(BAD_VALUE, f"image size {h}x{w} is empty")
    if h > limits.max_side or w > limits.max_side:
        raise Rejected(TOO_LARGE, f"image size {h}x{w} exceeds {limits.max_side} per side")


def _shape(header: dict, ndim: int, limits: Limits) -> tuple[int, ...]:
    shape = _field(header, "shape", list)
    if len(shape) != ndim or any(type(d) is not int for d in shape):
        raise Rejected(BAD_VALUE, f"'shape' must be {ndim} integers, got {shape!r}")
    _check_side(shape[0], shape[1], limits)
    return tuple(shape)


def _sized(body: memoryview, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    expected = dtype.itemsize
    for d in shape:
        expected *= d
    if body.nbytes != expected:
        raise Rejected(
            PAYLOAD_SIZE, f"shape {list(shape)} of {dtype.name} is {expected} bytes, payload is {body.nbytes}"
        )
    return np.frombuffer(body, dtype).reshape(shape)


def _require_finite(values: np.ndarray) -> None:
    if not np.isfinite(values).all():
        raise Rejected(NON_FINITE, "payload contains NaN or Inf")


def _raw_shape(header: dict, limits: Limits) -> tuple[int, ...]:
    shape = _shape(header, 3, limits)
    if shape[2] != RGB_CHANNELS:
        raise Rejected(BAD_VALUE, f"raw camera frames are RGB, got {shape[2]} channels")
    return shape


def _camera(header: dict, body: memoryview, limits: Limits) -> tuple[np.ndarray, dict]:
    encoding = _choice(header, "encoding", ENCODINGS)
    if encoding == "raw":
        shape = _raw_shape(header, limits)
        return _sized(body, DTYPES["uint8"], shape), {"encoding": encoding, "shape": shape}
    size = encoded_image_size(body, encoding)
    if size is None:
        raise Rejected(BAD_IMAGE, f"payload is not a {encoding} image with a readable size")
    _check_side(*size, limits)
    _check_decoding_cost(body, encoding, limits)
    return np.frombuffer(body, np.uint8), {"encoding": encoding, "shape": (*size, RGB_CHANNELS)}


def _check_decoding_cost(body: memoryview, encoding: str, limits: Limits) -> None:
    """Refuse images whose decoding would cost far more than their size says: many progressive scans (each
    a pass over every pixel: 30,000 empty scans in 400 kB took 38 s), or a PNG inflating to more than
    `max_png_bytes` (16-bit RGBA, say)."""
    if encoding == "jpeg":
        scans = jpeg_scan_count(body)
        if scans > limits.max_jpeg_scans:
            raise Rejected(TOO_COSTLY, f"JPEG has {scans} scans, the limit is {limits.max_jpeg_scans}")
    else:
        inflated = png_decoded_bytes(body)
        if inflated is None:
            raise Rejected(BAD_IMAGE, "PNG header has an unknown colour type")
        if inflated > limits.max_png_bytes:
            raise Rejected(TOO_COSTLY, f"PNG inflates to {inflated} bytes, the limit is {limits.max_png_bytes}")


def _mic(header: dict, body: memoryview, limits: Limits) -> tuple[np.ndarray, dict]:
    rate = _int_in(header, "rate", *MIC_RATES)
    channels = _int_in(header, "channels", *MIC_CHANNELS)
    dtype_name = _choice(header, "dtype", MIC_DTYPES)
    dtype = DTYPES[dtype_name]
    frame_bytes = channels * dtype.itemsize
    if body.nbytes % frame_bytes:
        raise Rejected(PAYLOAD_SIZE, f"{body.nbytes} bytes is not a whole number of {frame_bytes}-byte sample frames")
    frames = body.nbytes // frame_bytes
    if frames > rate * limits.max_audio_seconds:
        raise Rejected(TOO_LARGE, f"{frames} samples at {rate} Hz exceed {limits.max_audio_seconds} s")
    samples = np.frombuffer(body, dtype).reshape(frames, channels)
    if dtype_name == "float32":
        _require_finite(samples)
    return samples, {"rate": rate, "channels": channels, "dtype": dtype_name}


def _imu(header: dict, body: memoryview, limits: Limits) -> tuple[np.ndarray, dict]:
    rate = _int_in(header, "rate", *IMU_RATES)
    if body.nbytes % IMU_ROW_BYTES:
        raise Rejected(PAYLOAD_SIZE, f"{body.nbytes} bytes is not a whole number of {IMU_ROW_BYTES}-byte rows")
    rows = body.nbytes // IMU_ROW_BYTES
    if rows > limits.max_imu_rows:
        raise Rejected(TOO_LARGE, f"{rows} rows exceed {limits.max_imu_rows}")
    if rows > rate * limits.max_imu_seconds:
        raise Rejected(TOO_LARGE, f"{rows} rows at {rate} Hz exceed {limits.max_imu_seconds} s")
    samples = np.frombuffer(body, IMU_DTYPE).reshape(rows, len(IMU_COLUMNS))
    _require_finite(samples)
    return samples, {"rate": rate}


def _depth(header: dict, body: memoryview, limits: Limits) -> tuple[np.ndarray, dict]:
    dtype_name = _choice(header, "dtype", DEPTH_DTYPES)
    shape = _shape(header, 2, limits)
    image = _sized(body, DTYPES[dtype_name], shape)
    if dtype_name == "float32" and np.isinf(image).any():  # NaN means no reading, Inf is an error
        raise Rejected(NON_FINITE, "depth contains Inf (use 0 or NaN for no reading)")
    return image, {"dtype": dtype_name, "shape": shape}


def _thermal(header: dict, body: memoryview, limits: Limits) -> tuple[np.ndarray, dict]:
    dtype_name = _choice(header, "dtype", THERMAL_DTYPES)
    shape = _shape(header, 2, limits)
    image = _sized(body, DTYPES[dtype_name], shape)
    if dtype_name == "float32":
        _require_finite(image)
    return image, {"dtype": dtype_name, "shape": shape}


def _omitted_frame(sensor: str, header: dict, body: memoryview, limits: Limits) -> dict:
    """The fields of an omitted frame: the sensor's own, checked as for a sent frame, less what only the pixels
    tell (a JPEG's or PNG's size); its payload must be empty."""
    if header[OMITTED] is not True or sensor not in FRAME_SENSORS:
        raise Rejected(BAD_VALUE, f"{OMITTED!r} may only be true, on a {', '.join(FRAME_SENSORS)} frame")
    if body.nbytes:
        raise Rejected(PAYLOAD_SIZE, f"an omitted frame has an empty payload, got {body.nbytes} bytes")
    if sensor == CAMERA:
        encoding = _choice(header, "encoding", ENCODINGS)
        return {"encoding": encoding, "shape": _raw_shape(header, limits) if encoding == "raw" else None}
    dtypes = DEPTH_DTYPES if sensor == DEPTH else THERMAL_DTYPES
    return {"dtype": _choice(header, "dtype", dtypes), "shape": _shape(header, 2, limits)}


_PARSERS = {CAMERA: _camera, MIC: _mic, DEPTH: _depth, THERMAL: _thermal, IMU: _imu}


def decode(frames, limits: Limits = DEFAULT_LIMITS) -> SensorMessage:
    """Validate one two-frame message (bytes, memoryview or zmq.Frame); raises Rejected."""
    if len(frames) != 2:
        raise Rejected(FRAME_COUNT, f"a message has 2 frames, got {len(frames)}")
    head, body = _view(frames[0]), _view(frames[1])
    if head.nbytes > limits.max_header_bytes:
        raise Rejected(HEADER_TOO_LARGE, f"header is {head.nbytes} bytes, the limit is {limits.max_header_bytes}")
    try:
        header = msgpack.unpackb(head)
    except (ValueError, TypeError, msgpack.UnpackException) as err:
        raise Rejected(MALFORMED, f"header is not msgpack: {err}") from None
    if type(header) is not dict:
        raise Rejected(MALFORMED, f"header must be a map, got {type(header).__name__}")
    version = _field(header, "v", int)
    if version != VERSION:
        raise Rejected(BAD_VERSION, f"protocol version {version} is not supported (expected {VERSION})")
    device = _field(header, "device", str)
    if not DEVICE_PATTERN.fullmatch(device):
        raise Rejected(BAD_VALUE, f"'device' must be {DEVICE_RULE}, got {device[:80]!r}")
    try:
        sensor = _field(header, "sensor", str)
        parse = _PARSERS.get(sensor)
        if parse is None:
            raise Rejected(UNKNOWN_SENSOR, f"unknown sensor {sensor[:80]!r}")
        seq = _int_in(header, "seq", 0, INT64_MAX)
        t_ns = _int_in(header, "t_ns", 0, INT64_MAX)
        if OMITTED in header:
            return SensorMessage(device, sensor, seq, t_ns, NO_PIXELS, **_omitted_frame(sensor, header, body, limits))
        if body.nbytes == 0:
            raise Rejected(PAYLOAD_SIZE, "payload is empty")
        if body.nbytes > limits.max_payload_bytes:
            raise Rejected(TOO_LARGE, f"payload is {body.nbytes} bytes, the limit is {limits.max_payload_bytes}")
        payload, fields = parse(header, body, limits)
    except Rejected as err:
        err.device = device
        raise
    return SensorMessage(device, sensor, seq, t_ns, payload, **fields)


def jpeg_scale(shape: tuple[int, ...], min_side: int) -> int:
    """The largest fraction 1/8, 1/4 or 1/2 (as 8, 4, 2; else 1) of a JPEG of `shape` that libjpeg can decode
    exactly (both sides divide by it: the scaled image covers the same pixels) keeping `min_side` pixels on its
    short side."""
    h, w = shape[:2]
    return next((f for f in JPEG_SCALES if h % f == 0 and w % f == 0 and min(h, w) // f >= min_side), 1)


def decode_image(msg: SensorMessage, min_side: int = 0) -> np.ndarray:
    """(h, w, 3) uint8 RGB pixels of a camera message; raises Rejected(BAD_IMAGE) if undecodable. With
    `min_side`, a JPEG is decoded at the fraction `jpeg_scale` picks: libjpeg then scales in its inverse DCT,
    which skips most of the decoding work of a large frame (the pixels are its `min_side`-scaled version)."""
    if msg.sensor != CAMERA:
        raise ValueError(f"decode_image needs a camera message, got {msg.sensor!r}")
    if msg.encoding == "raw":
        return msg.payload
    if msg.encoding == "png" and not png_inflates_within_size(msg.payload):  # too costly to check at ingest
        raise Rejected(TOO_COSTLY, f"png payload of {msg.device} seq {msg.seq} holds more data than its size")
    assert msg.shape is not None  # decode() reads every camera message's size
    scale = jpeg_scale(msg.shape, min_side) if msg.encoding == "jpeg" and min_side else 1
    # the pixels as stored: the declared shape is the stored one, whatever EXIF orientation says
    bgr = cv2.imdecode(msg.payload, JPEG_SCALE_FLAGS[scale] | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None:
        raise Rejected(BAD_IMAGE, f"{msg.encoding} payload of {msg.device} seq {msg.seq} does not decode")
    if bgr.shape != (msg.shape[0] // scale, msg.shape[1] // scale, RGB_CHANNELS):
        raise Rejected(BAD_IMAGE, f"decoded size {bgr.shape} differs from the declared {msg.shape} (1/{scale})")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
