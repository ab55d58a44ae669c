"""Reading the embedding streams: decoded records, plain reads, following them, and consumer groups.

Imports neither Ray nor any pipeline stage: any Python program can read the streams with it (REDIS.md)."""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterator
from fnmatch import fnmatchcase

import numpy as np
import redis

from .records import text
from .redis_access import read_streams
from .redis_layout import BadRecord, EmbeddingRecord, decode_embedding, id_tuple, parse_key, stream_key


def stream_keys(client: redis.Redis, device: str = "*", modality: str = "*") -> list[str]:
    """Embedding stream keys whose device and modality match the globs, sorted. As the matcher reads them:
    device and modality are parsed from the key, so the SCAN pattern for device `a` does not bring in a
    key of device `a:x`; keys that are not UTF-8 are no embedding streams."""
    out = []
    for raw in client.scan_iter(match=stream_key(device, modality), _type="stream"):
        try:
            key = text(raw)
            found_device, found_modality = parse_key(key)
        except (UnicodeDecodeError, BadRecord):
            continue
        if fnmatchcase(found_device, device) and fnmatchcase(found_modality, modality):
            out.append(key)
    return sorted(out)


def describe(r: EmbeddingRecord) -> str:
    """A record on one line (what `bindstream tail` prints): its stream, window, model, the vector's start, the
    modalities of a fused record, and `reused=T0` for a window that repeats the vector of the window at T0."""
    return (
        f"{r.device} {r.modality:8s} t0={r.t0} t1={r.t1} {r.model} emb[:4]={np.array2string(r.emb[:4], precision=3)}"
        + (f" ({','.join(r.modalities)})" if r.modalities else "")
        + (f" reused={r.reused}" if r.reused is not None else "")
    )


def read_all(client: redis.Redis, device: str = "*", modality: str = "*") -> list[EmbeddingRecord]:
    """Every stored record of the matching streams (XRANGE), in stream order per key."""
    out = []
    for key in stream_keys(client, device, modality):
        out += [decode_embedding(key, i, f) for i, f in client.xrange(key)]
    return out


class Tail:
    """Follows the streams of the devices and modalities matching two globs (stream_keys): `records()` yields
    the entries stored after `start` (a stream id; '0' for all), oldest first across streams (XRANGE), then
    each new entry as it is published (XREAD), and None whenever nothing is there to read right now. Streams
    that appear meanwhile (new devices) are found every `discover_s` and read from `start` too, as the
    matcher does, so their first window is not missed. Malformed entries are skipped and counted."""

    def __init__(
        self,
        client: redis.Redis,
        device: str = "*",
        modality: str = "*",
        start: str = "0",
        block_ms: int = 1000,
        discover_s: float = 1.0,
        chunk: int = 100,
    ):
        self.client, self.device, self.modality = client, device, modality
        self.start, self.block_ms, self.discover_s, self.chunk = start, block_ms, discover_s, chunk
        self.after: dict[str, str] = {}  # per stream followed, the id after which to read
        self.skipped = 0

    def records(self) -> Iterator[EmbeddingRecord | None]:

        def entry_order(entry: tuple[str, bytes, dict]) -> tuple[int, int]:
            return id_tuple(text(entry[1]))

        keys = stream_keys(self.client, self.device, self.modality)
        self.after = {key: self.start for key in keys}
        for key, entry_id, fields in heapq.merge(*map(self._stored, keys), key=entry_order):
            self.after[key] = text(entry_id)
            yield from self._decoded(key, entry_id, fields)
        next_discovery = 0.0
        while True:
            if time.monotonic() >= next_discovery:
                next_discovery = time.monotonic() + self.discover_s
                for key in stream_keys(self.client, self.device, self.modality):
                    self.after.setdefault(key, self.start)
            if not self.after:
                yield None
                time.sleep(self.discover_s)
                continue
            reply = read_streams(self.client, self.after, self.chunk, self.block_ms)
            entries = sorted(
                ((text(key), entry_id, fields) for key, batch in reply for entry_id, fields in batch), key=entry_order
            )
            if not entries:
                yield None
            for key, entry_id, fields in entries:
                self.after[key] = text(entry_id)
                yield from self._decoded(key, entry_id, fields)

    def _stored(self, key: str) -> Iterator[tuple[str, bytes, dict]]:
        """(key, id, fields) of the entries of `key` after `start`, `chunk` a round trip."""
        low = "(" + self.start
        while entries := self.client.xrange(key, min=low, count=self.chunk):
            yield from ((key, entry_id, fields) for entry_id, fields in entries)
            low = "(" + text(entries[-1][0])

    def _decoded(self, key: str, entry_id, fields: dict) -> Iterator[EmbeddingRecord]:
        try:
            yield decode_embedding(key, entry_id, fields)
        except BadRecord:
            self.skipped += 1


class Subscriber:
    """A consumer in a consumer group over the matching embedding streams (at-least-once: `ack` what
    you processed; unacknowledged entries are delivered again to the group after a restart)."""

    def __init__(
        self, client: redis.Redis, group: str, consumer: str, device: str = "*", modality: str = "*", start: str = "$"
    ):
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
        streams = {k: marker for k in self.keys}
        reply = read_streams(self.client, streams, count, None if pending else block_ms, self.group, self.consumer)
        out = []
        for key, entries in reply or []:
            for entry_id, fields in entries:
                try:
                    out.append(decode_embedding(text(key), entry_id, fields))
                except BadRecord:
                    self.skipped += 1
                    self.client.xack(key, self.group, entry_id)
        return out

    def ack(self, records: list[EmbeddingRecord]) -> None:
        for r in records:
            self.client.xack(r.stream, self.group, r.id)
