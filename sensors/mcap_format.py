"""Recording files: wire messages as MCAP (https://mcap.dev), one channel per device and sensor, each message's
two wire frames kept byte for byte (PROTOCOL.md, "Recordings").

Messages are JSON (message encoding `json`, schemas in JSON Schema): Foxglove opens JSON channels with no plugin
and shows the `foxglove.*` schemas in its image and audio panels, and the `mcap` CLI reads them; bytes travel as
base64, so they come back exact (zstd chunks take back much of base64's third). A message's `data` is the wire
payload and its `bindstream_header` the wire header (msgpack), so [b64decode(bindstream_header), b64decode(data)]
are the frames as ingest accepted them: replay sends exactly those.

| sensor | schema | message fields besides timestamp, data and bindstream_header |
|---|---|---|
| camera jpeg/png | foxglove.CompressedImage | frame_id, format |
| camera raw, depth, thermal | foxglove.RawImage | frame_id, width, height, encoding (rgb8, 16UC1, mono8...), step |
| mic | foxglove.RawAudio | format (pcm-s16; pcm-f32 is not one Foxglove plays), sample_rate, number_of_channels |
| imu | bindstream.Imu | frame_id, rate, columns (rows of float32 ax ay az gx gy gz, little-endian) |

`timestamp` is the device clock (`t_ns`); a record's log time is when it was received (ns since the epoch), its
publish time the device clock. Metadata records: `bindstream.session` first in every file (version, source, when
the session and the file began), `bindstream.device` per device at the end of a file (its sensors with what the
messages told: resolution, rate, channels, dtype, encoding, message count, frame rate); each channel's metadata
holds what its first message told, so a file cut short still says it.

A file is read front to back without its summary (`Recording`): one cut short by a power cut yields every message
of its complete chunks and reports `complete = False`.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Generator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import zstandard
from mcap.exceptions import McapError
from mcap.records import Channel, Message
from mcap.stream_reader import StreamReader
from mcap.writer import LIBRARY_IDENTIFIER, MCAP0_MAGIC, CompressionType, Writer

from .protocol import CAMERA, DEPTH, IMU, IMU_COLUMNS, MIC, NS_PER_S, THERMAL, SensorMessage

COMPRESSIONS = {"zstd": CompressionType.ZSTD, "lz4": CompressionType.LZ4, "none": CompressionType.NONE}
SESSION_METADATA, DEVICE_METADATA = "bindstream.session", "bindstream.device"
WIRE_HEADER = "bindstream_header"
SEQUENCE_MASK = 0xFFFF_FFFF  # an MCAP sequence number is 32 bits: the wire seq modulo 2^32
# a torn last record shows as one of these: a short read, a short chunk that does not decompress or fails its CRC
TRUNCATED = (McapError, struct.error, zstandard.ZstdError, ValueError, RuntimeError)
RAW_ENCODINGS = {  # (sensor, dtype) -> Foxglove RawImage encoding
    (CAMERA, "uint8"): "rgb8",
    (DEPTH, "uint16"): "16UC1",
    (DEPTH, "float32"): "32FC1",
    (THERMAL, "uint8"): "mono8",
    (THERMAL, "uint16"): "mono16",
    (THERMAL, "float32"): "32FC1",
}
AUDIO_FORMATS = {"int16": "pcm-s16", "float32": "pcm-f32"}
ITEM_SIZES = {"uint8": 1, "int16": 2, "uint16": 2, "float32": 4}


def bindstream_version() -> str:
    try:
        return version("bindstream")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


_TIME = {
    "type": "object",
    "title": "time",
    "properties": {
        "sec": {"type": "integer", "minimum": 0},
        "nsec": {"type": "integer", "minimum": 0, "maximum": 999_999_999},
    },
    "description": "the device clock (the header's t_ns)",
}
_STRING, _INTEGER = {"type": "string"}, {"type": "integer", "minimum": 0}


def _bytes(description: str) -> dict:
    return {"type": "string", "contentEncoding": "base64", "description": description}


def _schema(title: str, description: str, **properties: dict) -> dict:
    return {
        "title": title,
        "description": description,
        "type": "object",
        "properties": {
            "timestamp": _TIME,
            **properties,
            WIRE_HEADER: _bytes("the wire header frame (msgpack), byte for byte (PROTOCOL.md)"),
        },
    }


SCHEMAS = {
    "foxglove.CompressedImage": _schema(
        "foxglove.CompressedImage",
        "A compressed image",
        frame_id=_STRING,
        data=_bytes("the wire payload: the JPEG or PNG file"),
        format=_STRING,
    ),
    "foxglove.RawImage": _schema(
        "foxglove.RawImage",
        "A raw image",
        frame_id=_STRING,
        width=_INTEGER,
        height=_INTEGER,
        encoding=_STRING,
        step=_INTEGER,
        data=_bytes("the wire payload: rows of pixels, little-endian"),
    ),
    "foxglove.RawAudio": _schema(
        "foxglove.RawAudio",
        "A chunk of audio",
        data=_bytes("the wire payload: interleaved little-endian samples"),
        format=_STRING,
        sample_rate=_INTEGER,
        number_of_channels=_INTEGER,
    ),
    "bindstream.Imu": _schema(
        "bindstream.Imu",
        "A chunk of IMU rows",
        frame_id=_STRING,
        rate=_INTEGER,
        columns={"type": "array", "items": _STRING},
        data=_bytes("the wire payload: rows of float32 ax ay az (m/s^2) gx gy gz (rad/s), little-endian"),
    ),
}


def message_fields(msg: SensorMessage) -> tuple[str, dict[str, Any]]:
    """(schema name, the message's fields besides timestamp, data and the wire header) of an accepted message."""
    frame_id = f"{msg.device}/{msg.sensor}"
    if msg.sensor == CAMERA and msg.encoding != "raw":
        return "foxglove.CompressedImage", {"frame_id": frame_id, "format": msg.encoding}
    if msg.sensor in (CAMERA, DEPTH, THERMAL):
        assert msg.shape is not None
        dtype = msg.dtype or "uint8"  # raw camera frames are uint8 RGB
        height, width, *depth = msg.shape
        return "foxglove.RawImage", {
            "frame_id": frame_id,
            "width": width,
            "height": height,
            "encoding": RAW_ENCODINGS[msg.sensor, dtype],
            "step": width * ITEM_SIZES[dtype] * (depth[0] if depth else 1),
        }
    if msg.sensor == MIC:
        assert msg.dtype is not None
        return "foxglove.RawAudio", {
            "format": AUDIO_FORMATS[msg.dtype],
            "sample_rate": msg.rate,
            "number_of_channels": msg.channels,
        }
    if msg.sensor == IMU:
        return "bindstream.Imu", {"frame_id": frame_id, "rate": msg.rate, "columns": list(IMU_COLUMNS)}
    raise ValueError(f"no schema for sensor {msg.sensor!r}")


def message_properties(msg: SensorMessage) -> dict[str, str]:
    """What one message tells about its sensor, as MCAP metadata strings (resolution, rate, ...)."""
    known = {"encoding": msg.encoding, "rate": msg.rate, "channels": msg.channels, "dtype": msg.dtype}
    out = {key: str(value) for key, value in known.items() if value is not None}
    if msg.shape is not None:
        out["resolution"] = f"{msg.shape[1]}x{msg.shape[0]}"
    return out


@dataclass
class _SensorSummary:
    """What a file holds of one device's sensor, for its `bindstream.device` metadata."""

    properties: dict[str, str]
    messages: int = 0
    first_t_ns: int = 0
    last_t_ns: int = 0

    def add(self, msg: SensorMessage) -> None:
        self.first_t_ns = self.first_t_ns if self.messages else msg.t_ns
        self.last_t_ns = msg.t_ns
        self.messages += 1

    def as_dict(self, sensor: str) -> dict[str, Any]:
        out: dict[str, Any] = {**self.properties, "messages": self.messages}
        out.update(first_t_ns=self.first_t_ns, last_t_ns=self.last_t_ns)
        if sensor in (CAMERA, DEPTH, THERMAL) and self.messages > 1 and self.last_t_ns > self.first_t_ns:
            out["frames_per_s"] = round((self.messages - 1) * NS_PER_S / (self.last_t_ns - self.first_t_ns), 3)
        return out


class McapFileWriter:
    """One MCAP file being written, with its chunk size and compression; `close` writes the devices' metadata
    and the summary. The file is created, never overwritten."""

    def __init__(self, path: Path, session: dict[str, str], *, chunk_bytes: int, compression: str):
        self.path = path
        self._file = open(path, "xb")
        self._writer = Writer(self._file, chunk_size=chunk_bytes, compression=COMPRESSIONS[compression])
        self._writer.start(library=f"bindstream/{bindstream_version()} {LIBRARY_IDENTIFIER}")
        self._writer.add_metadata(SESSION_METADATA, session)
        self._schemas: dict[str, int] = {}
        self._channels: dict[tuple[str, str, str], int] = {}
        self._sensors: dict[str, dict[str, _SensorSummary]] = {}  # device -> sensor -> summary

    def write(self, msg: SensorMessage, frames, rx_ns: int) -> None:
        """Add one accepted message: `msg` its decoded header, `frames` its two wire frames (any buffers)."""
        schema, fields = message_fields(msg)
        channel = self._channel(msg, schema)
        stamp = {"sec": msg.t_ns // NS_PER_S, "nsec": msg.t_ns % NS_PER_S}
        head = json.dumps({"timestamp": stamp, **fields}, separators=(",", ":")).encode()
        # the base64 fields are spliced in (their alphabet needs no escaping): json.dumps would scan and copy
        # megabytes again, holding the GIL that ingest's receiving thread needs
        payload, header = base64.b64encode(frames[1]), base64.b64encode(frames[0])
        data = b"".join((head[:-1], b',"data":"', payload, b'","' + WIRE_HEADER.encode() + b'":"', header, b'"}'))
        self._writer.add_message(channel, rx_ns, data, msg.t_ns, sequence=msg.seq & SEQUENCE_MASK)
        sensors = self._sensors.setdefault(msg.device, {})
        sensors.setdefault(msg.sensor, _SensorSummary(message_properties(msg))).add(msg)

    def _channel(self, msg: SensorMessage, schema: str) -> int:
        key = (msg.device, msg.sensor, schema)
        if key not in self._channels:
            if schema not in self._schemas:
                self._schemas[schema] = self._writer.register_schema(
                    schema, "jsonschema", json.dumps(SCHEMAS[schema]).encode()
                )
            metadata = {"device": msg.device, "sensor": msg.sensor, **message_properties(msg)}
            self._channels[key] = self._writer.register_channel(
                f"/{msg.device}/{msg.sensor}", "json", self._schemas[schema], metadata
            )
        return self._channels[key]

    def size(self) -> int:
        """Bytes in the file so far (complete chunks; the one being filled is in memory)."""
        return self._file.tell()

    def flush(self) -> None:
        """End the chunk being filled and hand it to the operating system."""
        self._writer.flush()

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        try:
            for device, sensors in self._sensors.items():
                summary = {sensor: s.as_dict(sensor) for sensor, s in sensors.items()}
                self._writer.add_metadata(DEVICE_METADATA, {"device": device, "sensors": json.dumps(summary)})
            self._writer.finish()
        finally:
            self._file.close()


@dataclass
class RecordedMessage:
    """One recorded message: its channel's topic, when it was received, and its wire frames byte for byte."""

    topic: str
    rx_ns: int
    frames: list[bytes] = field(repr=False)


class Recording:
    """Reads one MCAP file front to back, without its summary. After `messages()` is exhausted, `complete` says
    whether the file ended with its footer; a file cut short yields the messages of its complete chunks."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.complete: bool | None = None

    def messages(self) -> Generator[RecordedMessage, None, None]:
        topics: dict[int, str] = {}
        self.complete = False
        with open(self.path, "rb") as f:
            magic = f.read(len(MCAP0_MAGIC))
            if magic != MCAP0_MAGIC[: len(magic)]:
                raise ValueError(f"{self.path} is not an MCAP file")
            f.seek(0)
            records = StreamReader(f, validate_crcs=True).records
            while True:
                try:
                    record = next(records)
                except StopIteration:  # the reader stops after the footer
                    self.complete = True
                    return
                except TRUNCATED:
                    return
                if isinstance(record, Channel):
                    topics[record.id] = record.topic
                elif isinstance(record, Message):
                    yield RecordedMessage(topics.get(record.channel_id, ""), record.log_time, self._frames(record))

    def _frames(self, record: Message) -> list[bytes]:
        try:
            fields = json.loads(record.data)
            return [base64.b64decode(fields[WIRE_HEADER], validate=True), base64.b64decode(fields["data"])]
        except (ValueError, KeyError, TypeError, binascii.Error) as err:
            raise ValueError(
                f"{self.path}: a message on channel {record.channel_id} has no wire frames ({err}): "
                "not a bindstream recording"
            ) from None
