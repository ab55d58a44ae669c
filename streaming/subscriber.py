"""Reading the embedding streams: decoded records, plain reads and consumer groups."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import redis

from .publisher import KEY_PREFIX, stream_key
from .records import text


class BadRecord(ValueError):
    """A stream entry that does not decode as documented in REDIS.md."""


@dataclass
class EmbeddingRecord:
    stream: str
    id: str
    device: str
    modality: str
    t0: int
    t1: int
    model: str
    emb: np.ndarray  # (dim,) float32, unit norm
    modalities: tuple[str, ...] = ()  # fused records: the modalities summed
    epoch: int = 0  # the device's session (entries written before the field existed: 0)


def parse_key(key: str) -> tuple[str, str]:
    """(device, modality) of a `bindstream:emb:{device}:{modality}` key."""
    prefix, _, rest = key.partition(f"{KEY_PREFIX}:")
    device, _, modality = rest.rpartition(":")
    if prefix or not device or not modality:
        raise BadRecord(f"not an embedding stream key: {key!r}")
    return device, modality


def decode_record(stream: str, entry_id: str, fields: dict) -> EmbeddingRecord:
    """Decode one stream entry (fields as bytes or str keys); raises BadRecord if it is malformed."""
    f = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
    try:
        dtype = text(f["dtype"])
        dim = int(f["dim"])
        if dtype != "float32":
            raise BadRecord(f"{stream} {entry_id}: dtype {dtype!r}, expected float32")
        if len(f["emb"]) != 4 * dim:
            raise BadRecord(f"{stream} {entry_id}: emb has {len(f['emb'])} bytes, expected {4 * dim}")
        device, modality = parse_key(stream)
        return EmbeddingRecord(
            stream=stream, id=text(entry_id), device=device, modality=modality,
            t0=int(f["t0"]), t1=int(f["t1"]), model=text(f["model"]),
            emb=np.frombuffer(f["emb"], dtype="<f4").astype(np.float32),
            modalities=tuple(text(f["modalities"]).split(",")) if "modalities" in f else (),
            epoch=int(f.get("epoch", 0)),
        )
    except (KeyError, ValueError, TypeError) as err:
        if isinstance(err, BadRecord):
            raise
        raise BadRecord(f"{stream} {entry_id}: {err!r}") from err


def stream_keys(client: redis.Redis, device: str = "*", modality: str = "*") -> list[str]:
    """Embedding stream keys matching a device and modality (glob patterns), sorted."""
    return sorted(text(k) for k in client.scan_iter(match=stream_key(device, modality), _type="stream"))


def read_all(client: redis.Redis, device: str = "*", modality: str = "*") -> list[EmbeddingRecord]:
    """Every stored record of the matching streams (XRANGE), in stream order per key."""
    out = []
    for key in stream_keys(client, device, modality):
        out += [decode_record(key, i, f) for i, f in client.xrange(key)]
    return out


class Subscriber:
    """A consumer in a consumer group over the matching embedding streams (at-least-once: `ack` what
    you processed; unacknowledged entries are delivered again to the group after a restart)."""

    def __init__(self, client: redis.Redis, group: str, consumer: str, device: str = "*", modality: str = "*",
                 start: str = "$"):
        self.client, self.group, self.consumer = client, group, consumer
        self.device, self.modality, self.start = device, modality, start
        self.keys: list[str] = []
        self.skipped = 0  # malformed entries acknowledged and skipped
        self.refresh()

    def refresh(self) -> None:
        """Pick up streams created since (new devices), creating the group on each."""
        for key in stream_keys(self.client, self.device, self.modality):
            if key not in self.keys:
                try:
                    self.client.xgroup_create(key, self.group, id=self.start, mkstream=False)
                except redis.ResponseError as err:
                    if "BUSYGROUP" not in str(err):
                        raise
                self.keys.append(key)

    def read(self, count: int = 100, block_ms: int = 1000, pending: bool = False) -> list[EmbeddingRecord]:
        """New records (or, with `pending`, this consumer's delivered-but-unacknowledged ones).
        Malformed entries are acknowledged and skipped; `skipped` counts them."""
        if not self.keys:
            self.refresh()
            if not self.keys:
                return []
        marker = "0" if pending else ">"
        reply = self.client.xreadgroup(self.group, self.consumer, {k: marker for k in self.keys}, count=count,
                                       block=None if pending else block_ms)
        out = []
        for key, entries in reply or []:
            for entry_id, fields in entries:
                try:
                    out.append(decode_record(text(key), entry_id, fields))
                except BadRecord:
                    self.skipped += 1
                    self.client.xack(key, self.group, entry_id)
        return out

    def ack(self, records: list[EmbeddingRecord]) -> None:
        for r in records:
            self.client.xack(r.stream, self.group, r.id)
