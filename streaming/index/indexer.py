"""The indexer: keeps one shard of the search index (one model, one modality) current from the embedding streams,
through the consumer group `bindstream-index:<model>`, and snapshots it to its directory.

- **Streams** come from the stream registry (`bindstream:streams`), as the matchers find them: the whole registry
  at the start, then the streams written since the last look. Joining a stream sets the group's position to the
  shard's, the last entry the shard holds of that stream (`0` for none: a new stream, or a shard without a
  snapshot, which so rebuilds from what Redis still holds), creating the group where it lacks it. Whatever the
  group's position was (entries read but not yet in a snapshot when the indexer died), each entry is indexed
  once. After any error the streams are joined again, so nothing read and not indexed is skipped.
- **Entries** are acknowledged once processed, indexed or not. One the indexer cannot use is counted, logged once
  per (reason, device) and skipped: `rejected_malformed`, `rejected_bad_time`, `rejected_not_unit` (as the
  matcher), `rejected_wrong_dim` (not the shard's dimension), `rejected_error` (a bug), `trimmed` (trimmed
  before it was read); an entry of another model is `other_model`.
- **Snapshots** every `save_s` while there is news, and at `stop`; the shard's hash in Redis
  (`bindstream:searchindex:<model>:<modality>`, `IndexInfo`) says where, for `bindstream search`. Its `lineage`
  names this Redis's snapshots: the directory is `<directory>/<model>.<modality>.<lineage>`.
- **One indexer per shard**: it holds a lease in Redis, renewed at every step; another waits (`standby`) until the
  lease expires, `lease_s` after its holder stopped renewing it (at once after a `stop`). An indexer that lost its
  lease (a step longer than `lease_s`) starts again from its snapshot.

A plain class (`step()`, `run()`, `start()`/`stop()`) that also runs as a restartable Ray actor (`start_indexers`).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import ray
import redis

from ..alerts.matcher import ONE_BLAS_THREAD
from ..alerts.scoring import entry_problem
from ..records import QUERY_MODALITIES, text
from ..redis_access import connect, read_streams
from ..redis_layout import (
    INDEX_CONSUMER,
    STREAM_REGISTRY,
    BadRecord,
    EmbeddingRecord,
    IndexInfo,
    decode_embedding,
    id_tuple,
    index_group,
    index_lease_key,
    parse_key,
    search_index_key,
)
from ..retry import repeat_until_stopped
from ..stage import StageMetrics, WarnOnce
from .shard import IndexSettings, Shard, SnapshotError

log = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # a model name as it goes into a key, a group and a directory
ACK_CHUNK = 1_000  # entry ids per XACK, and pending entries looked at per XPENDING

# Take or renew the lease unless another holds it. KEYS: the lease. ARGV: this indexer's token, lease ms.
HOLD = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
# Give the lease up if this indexer holds it. KEYS: the lease. ARGV: the token.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
"""


class Indexer:
    """Reads the embedding streams of one modality through the index group, adds the usable entries of its model
    to the shard, evicts the oldest beyond `max_vectors`, and snapshots; see the module's docstring."""

    def __init__(
        self,
        settings: IndexSettings,
        redis_url: str,
        directory: str | Path,
        model: str,
        modality: str,
        autostart: bool = False,
    ):
        if not NAME.fullmatch(model) or modality not in QUERY_MODALITIES:
            raise ValueError(f"cannot index model {model!r} / modality {modality!r}")
        self.settings, self.model, self.modality = settings, model, modality
        self.root = Path(directory).expanduser().resolve()
        self.client = connect(redis_url)
        self.group = index_group(model)
        self.info_key = search_index_key(model, modality)
        self.lease_key = index_lease_key(model, modality)
        self.token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.hold = self.client.register_script(HOLD)
        self.release = self.client.register_script(RELEASE)
        self.metrics = StageMetrics("index")
        self._warn_once = WarnOnce(log, settings.max_logged)
        self.holding = False
        self.last_error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._forget()
        if autostart:
            self.start()

    def _forget(self) -> None:
        """Drop the shard and the streams: the next step loads the snapshot and joins every stream again."""
        self.shard: Shard | None = None
        self.path: Path | None = None  # the shard's directory, once the lineage is known
        self.lineage = ""
        self.loaded = False
        self._rejoin()
        self.dirty = False  # news since the last snapshot
        self.saved_at = time.monotonic()

    def _rejoin(self) -> None:
        """Join every stream again at the next step (the group's position set back to the shard's)."""
        self.cursor = 0.0  # the highest registry score seen: streams scored at or above it have news
        self.joined: set[str] = set()
        self.behind: set[str] = set()  # streams whose last read was full: read again at once
        self.turn = 0  # where the next read starts among the streams with news (each gets its turn)

    # ----- one cycle -----

    def step(self) -> int:
        """Renew the lease (else wait), load the snapshot when not yet loaded, read the streams with news, index,
        snapshot when due. Returns the number of entries read (0: nothing new; the step then waits `block_ms`)."""
        s = self.settings
        if not self.hold(keys=[self.lease_key], args=[self.token, int(s.lease_s * 1000)]):
            if self.holding:
                self.metrics.count("lease_lost")
                log.warning("%s: another indexer took the lease; starting again from the snapshot", self.info_key)
                self._forget()
            self.holding = False
            self._stop.wait(s.block_ms / 1000)
            return 0
        self.holding = True
        if not self.loaded:
            self._load()
        entries = self._read(self._news() | self.behind)
        if entries:
            self._process(entries)
        if self.dirty and time.monotonic() - self.saved_at >= s.save_s:
            self.save()
        if not entries:
            self._stop.wait(s.block_ms / 1000)
        return len(entries)

    def _load(self) -> None:
        """This Redis's lineage (made on first use), the shard's directory, and its snapshot if there is one; an
        unreadable snapshot is counted (`snapshot_unreadable`) and the shard rebuilt from the streams."""
        self.client.hsetnx(self.info_key, "lineage", secrets.token_hex(8))
        self.lineage = text(self.client.hget(self.info_key, "lineage") or b"")
        if not NAME.fullmatch(self.lineage):
            raise BadRecord(f"{self.info_key}: lineage {self.lineage!r} is no name (delete the hash to start over)")
        self.path = self.root / f"{self.model}.{self.modality}.{self.lineage}"
        try:
            self.shard = Shard.open(self.path, self.settings)
        except SnapshotError as err:
            self.metrics.count("snapshot_unreadable")
            log.warning("%s; rebuilding the index from the streams", err)
        self.loaded = True

    def _news(self) -> set[str]:
        """The streams of this modality written since the last look (all of them after a (re)join), joined."""
        news = set()
        for raw, score in self.client.zrangebyscore(STREAM_REGISTRY, self.cursor, "+inf", withscores=True):
            self.cursor = max(self.cursor, score)
            key = raw.decode(errors="replace")
            try:
                modality = parse_key(key)[1]
            except BadRecord:
                continue
            if modality == self.modality and (key in self.joined or self._join(key)):
                news.add(key)
        return news

    def _join(self, key: str) -> bool:
        """Set the group's position in `key` to the shard's (creating the group where it lacks it) and acknowledge
        what is pending at or before it; False when the stream is gone."""
        position = self.shard.positions.get(key, "0") if self.shard else "0"
        try:
            self.client.xgroup_create(key, self.group, id=position)
        except redis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                if "requires the key to exist" in str(err):
                    return False  # deleted (expired) since the registry named it
                raise
            self.client.xgroup_setid(key, self.group, position)
            self._ack_through(key, position)
        self.joined.add(key)
        return True

    def _ack_through(self, key: str, position: str) -> None:
        """Acknowledge the group's pending entries of `key` up to `position` (the shard holds them)."""
        if position == "0":
            return
        while True:
            pending = self.client.xpending_range(key, self.group, min="-", max=position, count=ACK_CHUNK)
            if pending:
                self.client.xack(key, self.group, *[p["message_id"] for p in pending])
            if len(pending) < ACK_CHUNK:
                return

    def _read(self, keys: set[str]) -> list[tuple[str, str, dict | None]]:
        """New entries of at most `read_streams` of `keys` (taking turns), `read_count` each; a stream read in
        full, or left for lack of room, is read again at the next step."""
        s = self.settings
        ordered = sorted(keys)
        start = self.turn % len(ordered) if ordered else 0
        chosen = (ordered[start:] + ordered[:start])[: s.read_streams]
        self.turn += len(chosen)
        self.behind = set(ordered) - set(chosen)
        reply = read_streams(self.client, {k: ">" for k in chosen}, s.read_count, None, self.group, INDEX_CONSUMER)
        out: list[tuple[str, str, dict | None]] = []
        for raw_key, items in reply:
            key = text(raw_key)
            if len(items) >= s.read_count:
                self.behind.add(key)
            out += [(key, text(entry_id), fields) for entry_id, fields in items]
        return out

    def _process(self, entries: list[tuple[str, str, dict | None]]) -> None:
        """Index the usable entries of a read, evict, and acknowledge every entry read."""
        tally: Counter = Counter()
        good: list[EmbeddingRecord] = []
        acks: dict[str, list[str]] = defaultdict(list)
        dim = self.shard.dim if self.shard else None
        tally["in", self.modality] += len(entries)
        for key, entry_id, fields in entries:
            acks[key].append(entry_id)
            r, why = self._usable(key, entry_id, fields, dim)
            if r is None:
                tally[why, parse_key(key)[0]] += 1
                continue
            dim = dim or r.emb.shape[0]
            good.append(r)
        if good:
            if self.shard is None:
                self.shard = Shard(self.model, self.modality, good[0].emb.shape[0], self.settings)
            self.shard.add(good)
            tally["indexed", self.modality] += len(good)
            tally["evicted", self.modality] += self.shard.evict()
            self.dirty = True
        pipe = self.client.pipeline(transaction=False)
        for key, ids in acks.items():
            for i in range(0, len(ids), ACK_CHUNK):
                pipe.xack(key, self.group, *ids[i : i + ACK_CHUNK])
        pipe.execute()
        for (event, label), n in tally.items():
            self.metrics.count(event, label, n)

    def _usable(
        self, key: str, entry_id: str, fields: dict | None, dim: int | None
    ) -> tuple[EmbeddingRecord | None, str]:
        """(the entry as a record to index, "") or (None, why not), warning once per (reason, device)."""
        last = self.shard.positions.get(key) if self.shard else None
        if last is not None and id_tuple(entry_id) <= id_tuple(last):
            return None, "replayed"  # held already (the group's position was moved back by hand)
        if not fields:
            return None, "trimmed"
        try:
            r = decode_embedding(key, entry_id, fields)
            problem = entry_problem(r) or (
                "wrong_dim" if r.model == self.model and dim is not None and r.emb.shape[0] != dim else None
            )
            detail = f"{key} {entry_id}: t0 {r.t0} t1 {r.t1} dim {r.emb.shape[0]}"
        except Exception as err:
            r, problem, detail = None, "malformed" if isinstance(err, BadRecord) else "error", str(err)
        if problem is not None or r is None:
            self._warn_once(f"rejected_{problem}", parse_key(key)[0], detail)
            return None, f"rejected_{problem}"
        if r.model != self.model:
            return None, "other_model"
        return r, ""

    def save(self) -> None:
        """Snapshot the shard and say where in its hash."""
        if self.shard is not None and self.path is not None:
            self.shard.save(self.path)
            info = IndexInfo(
                self.lineage,
                str(self.path),
                socket.gethostname(),
                len(self.shard),
                time.time_ns() // 1_000_000,
                self.shard.dim,
                self.shard.dtype,
            )
            self.client.hset(self.info_key, mapping=info.encode())
            self.metrics.count("saved")
        self.dirty = False
        self.saved_at = time.monotonic()

    # ----- running -----

    def run(self) -> None:
        """`step` until `stop`; after an error, back off and join the streams again."""
        repeat_until_stopped(self.step, self._stop, self.settings.retry_max_s, self._failed)

    def _failed(self, err: Exception) -> None:
        """Redis down, a disk full, a stream deleted under the group: count it, and keep indexing."""
        event = "redis_error" if isinstance(err, redis.RedisError) else "error"
        self.metrics.count(event)
        self.last_error = str(err)
        if event == "error":
            log.exception("indexing %s failed; retrying", self.info_key)
        self._rejoin()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=f"indexer-{self.modality}", daemon=True)
        self._thread.start()

    def stop(self) -> dict:
        """Stop the loop, snapshot what is new and give the lease up; returns the stats."""
        self._stop.set()
        if self._thread:
            self._thread.join()
        if self.holding:
            try:
                if self.dirty:
                    self.save()
                self.release(keys=[self.lease_key], args=[self.token])
                self.holding = False
            except (redis.RedisError, OSError) as err:
                self.metrics.count("error")
                self.last_error = f"final snapshot: {err}"
        return self.stats()

    def stats(self) -> dict:
        shard = self.shard
        return self.metrics.snapshot(
            model=self.model,
            modality=self.modality,
            vectors=len(shard) if shard else 0,
            memory_bytes=shard.memory_bytes if shard else 0,
            streams=len(self.joined),
            holding=self.holding,
            dir=str(self.path or ""),
            last_error=self.last_error,
        )


def start_indexers(
    settings: IndexSettings,
    redis_url: str,
    directory: str | Path,
    model: str,
    modalities: Sequence[str] = QUERY_MODALITIES,
    max_restarts: int = -1,
) -> list:
    """One indexer actor per modality, running from construction and restarted by Ray (up to `max_restarts`,
    -1: always) after a crash; each on one core (its BLAS and usearch one thread)."""
    return [
        ray.remote(Indexer)
        .options(max_restarts=max_restarts, num_cpus=0, runtime_env={"env_vars": ONE_BLAS_THREAD})
        .remote(settings, redis_url, str(directory), model, modality, True)
        for modality in modalities
    ]
