"""The alert benchmark of `bindstream bench alerts`: matcher throughput and alert latency against a real
redis-server, and the cost of a brute-force search, on random unit vectors (no model). The matcher runs in a
spawned process of its own with one BLAS thread (Ray matcher actors get the same) while this process writes
the embeddings; what a run writes to Redis it deletes after."""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from multiprocessing import get_context

import numpy as np
import redis

from ..records import Embedding
from ..redis_layout import (
    ALERTS_STREAM,
    START,
    Alert,
    background_key,
    decode_embedding,
    encode_embedding,
    id_tuple,
    state_key,
    stream_key,
)
from ..redis_server import RedisServer
from ..stage import Counts
from .matcher import ONE_BLAS_THREAD, Matcher, MatcherSettings
from .queries import delete_query, save_background, save_query
from .records import Background, Decision, Query
from .scoring import ModalityIndex
from .search import XRANGE_CHUNK

BENCH_MODEL = "bench"
BENCH_MODALITY = "audio"
BENCH_BACKGROUND = 16  # background vectors
BENCH_DECISION = Decision(threshold=0.5, k=2, n=3, cooldown_s=0.0, hysteresis=0.2)
EVENT_WINDOWS = 3  # windows equal to a query's vector: one alert each, at the 2nd (k)
WINDOW_NS = 2_000_000_000
WRITER_TICK_S = 0.005
WRITE_BATCH = 1000  # XADDs per pipeline when filling the search stream
DRAIN_IDLE_STEPS = 3  # matcher steps reading nothing before the run counts as drained
READY_TIMEOUT_S = 120.0  # for the matcher process to start
TARGET_SCORE_RATE = 50_000  # embeddings/s against 100 queries on one core
TARGET_P99_MS = 50.0  # at 1,000 embeddings/s


@dataclass(frozen=True)
class AlertBench:
    """What a run does (the defaults are `bench alerts`'s)."""

    queries: int = 100
    rate: float = 1000.0  # embeddings written per second
    seconds: float = 10.0
    dim: int = 1024  # imagebind_huge's
    devices: int = 10
    events_per_s: float = 20.0  # matching events started per second, one alert each
    score_rows: int = 200_000  # embeddings scored for the throughput figure
    search_records: int = 100_000  # stored windows for the search cost figure (0: none)
    seed: int = 0


@dataclass
class AlertFigures:
    score_per_s: float  # embeddings scored per second on one core, score_batch rows a call
    score_batch: int  # the matcher's read count
    sent: int  # embeddings written ...
    write_s: float  # ... in this long
    events: int  # events whose k-th window was written: each must give one alert
    latency_ms: np.ndarray  # per alert: XADD of the window -> XADD of the alert
    matcher: Counts  # the matcher's counts
    search_s: dict[str, float] | None  # XRANGE / decode / score seconds of search_records windows


def run_bench(bench: AlertBench, url: str | None = None) -> AlertFigures:
    """Run `bench` against the Redis at `url` (a scratch one: the run writes there) or, without, an embedded
    redis-server of its own."""
    batch = MatcherSettings.read_count
    with one_thread_pool() as pool:
        score_per_s = pool.submit(scoring_rate, bench.queries, bench.dim, batch, bench.score_rows, bench.seed).result()
    with ExitStack() as stack:
        url = url or stack.enter_context(RedisServer()).url
        client = redis.Redis.from_url(url)
        written, alerts, stats = alert_run(client, url, bench)
        search_s = search_cost(client, bench.search_records, bench.dim, bench.seed) if bench.search_records else None
    latency = np.array([id_tuple(a.id)[0] - id_tuple(a.source_id)[0] for a in alerts], dtype=float)
    return AlertFigures(
        score_per_s, batch, written["sent"], written["seconds"], written["events"], latency, Counts.of(stats), search_s
    )


def random_units(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench_background(rng: np.random.Generator, dim: int) -> Background:
    return Background(
        BENCH_MODEL,
        BENCH_MODALITY,
        tuple(f"b{i}" for i in range(BENCH_BACKGROUND)),
        random_units(rng, BENCH_BACKGROUND, dim),
    )


def scoring_rate(queries: int, dim: int, batch: int, rows: int, seed: int) -> float:
    """Embeddings scored per second (matrix product and shares) against `queries` queries, `batch` rows a call."""
    rng = np.random.default_rng(seed)
    qs = [Query(f"q{i}", BENCH_MODALITY, v, BENCH_MODEL) for i, v in enumerate(random_units(rng, queries, dim))]
    index, x = ModalityIndex(qs, bench_background(rng, dim)), random_units(rng, rows, dim)
    index.shares(x[:batch])
    start = time.perf_counter()
    for i in range(0, rows, batch):
        index.shares(x[i : i + batch])
    return rows / (time.perf_counter() - start)


@contextmanager
def one_thread_pool():
    """A one-process pool whose BLAS runs one thread (the matcher's one core; Ray actors get the same)."""
    saved = {k: os.environ.get(k) for k in ONE_BLAS_THREAD}
    os.environ.update(ONE_BLAS_THREAD)
    try:
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            yield pool
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def match_until_done(settings: MatcherSettings, url: str, ready_key: str, done_key: str) -> dict:
    """Run a matcher: set `ready_key` once it has its queries and streams, stop when `done_key` exists and
    nothing is left to read."""
    matcher = Matcher(settings, url)
    matcher.step()
    matcher.client.set(ready_key, 1)
    idle = 0
    while not matcher.client.exists(done_key) or idle < DRAIN_IDLE_STEPS:
        idle = 0 if matcher.step() else idle + 1
    return matcher.stop()


def write_stream(
    client: redis.Redis,
    devices: list[str],
    query_vectors: np.ndarray,
    background: np.ndarray,
    rate: float,
    seconds: float,
    events_per_s: float,
    seed: int,
) -> dict:
    """XADD embeddings round robin over `devices` at `rate`/s for `seconds`: background windows (a random
    background vector plus as much random noise), and every 1/`events_per_s` s, on the next device,
    EVENT_WINDOWS windows equal to a query's vector. Returns {sent, events (those whose k-th window was
    written: each must give one alert), seconds}."""
    rng = np.random.default_rng(seed)
    dim = query_vectors.shape[1]
    t_dev, event_left, event_query = [0] * len(devices), [0] * len(devices), [0] * len(devices)
    sent = started = events = 0
    start = time.monotonic()
    next_event = start
    while (elapsed := time.monotonic() - start) < seconds:
        due = int(rate * elapsed) - sent
        if due <= 0:
            time.sleep(WRITER_TICK_S)
            continue
        noise = random_units(rng, due, dim) + background[rng.integers(len(background), size=due)]
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        pipe = client.pipeline(transaction=False)
        for i in range(due):
            d = sent % len(devices)
            if event_left[d] == 0 and time.monotonic() >= next_event:
                event_left[d], event_query[d] = EVENT_WINDOWS, started % len(query_vectors)
                started += 1
                next_event += 1 / events_per_s
            v = query_vectors[event_query[d]] if event_left[d] else noise[i]
            events += event_left[d] == EVENT_WINDOWS - BENCH_DECISION.k + 1
            event_left[d] = max(event_left[d] - 1, 0)
            e = Embedding(devices[d], BENCH_MODALITY, t_dev[d], t_dev[d] + WINDOW_NS, v, BENCH_MODEL, 0, 0)
            pipe.xadd(stream_key(devices[d], BENCH_MODALITY), encode_embedding(e))
            t_dev[d] += WINDOW_NS
            sent += 1
        pipe.execute()
    return {"sent": sent, "events": events, "seconds": time.monotonic() - start}


def alert_run(client: redis.Redis, url: str, bench: AlertBench) -> tuple[dict, list[Alert], dict]:
    """Queries (orthonormal, so that an event matches one query), a matcher in a one-thread process, and
    this process writing; returns (written, the run's alerts, the matcher's stats). Cleans up after."""
    rng = np.random.default_rng(bench.seed)
    tag = f"bench-{rng.integers(1 << 30):08x}"
    names = [f"{tag}-{i}" for i in range(bench.devices)]
    basis = np.linalg.qr(rng.standard_normal((bench.dim, bench.queries + BENCH_BACKGROUND)))[0].T.astype(np.float32)
    query_vectors, background = basis[: bench.queries], basis[bench.queries :]
    settings = MatcherSettings(group=tag, devices=f"{tag}-*", start_id="0")
    ready, done = f"{tag}:ready", f"{tag}:done"
    save_background(
        client, Background(BENCH_MODEL, BENCH_MODALITY, tuple(f"b{i}" for i in range(len(background))), background)
    )
    for n in names:  # the streams exist before the run: stream discovery is not part of the latency
        client.xgroup_create(stream_key(n, BENCH_MODALITY), settings.group, id="0", mkstream=True)
    added = [
        save_query(client, Query(f"q{i}", BENCH_MODALITY, v, BENCH_MODEL, device=f"{tag}-*", decision=BENCH_DECISION))
        for i, v in enumerate(query_vectors)
    ]
    try:
        with one_thread_pool() as pool:
            matcher = pool.submit(match_until_done, settings, url, ready, done)
            try:
                deadline = time.monotonic() + READY_TIMEOUT_S
                while not client.exists(ready):
                    if matcher.done():
                        matcher.result()  # raises the matcher's error
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the matcher process did not start in {READY_TIMEOUT_S} s")
                    time.sleep(WRITER_TICK_S)
                written = write_stream(
                    client, names, query_vectors, background, bench.rate, bench.seconds, bench.events_per_s, bench.seed
                )
            finally:
                client.set(done, 1)  # the matcher drains and returns
            stats = matcher.result()
        alerts = [  # the entries that start an event: one per event written
            a
            for a in (Alert.from_entry(i, f) for i, f in client.xrange(ALERTS_STREAM))
            if a.device.startswith(tag) and a.state == START
        ]
    finally:
        for q in added:
            delete_query(client, q.id)
        client.delete(
            background_key(BENCH_MODEL, BENCH_MODALITY),
            ready,
            done,
            *[
                k
                for n in names
                for k in (stream_key(n, BENCH_MODALITY), state_key(settings.group, stream_key(n, BENCH_MODALITY)))
            ],
        )
    return written, alerts, stats


def search_cost(client: redis.Redis, records: int, dim: int, seed: int) -> dict[str, float]:
    """Seconds to XRANGE, decode and score `records` stored windows of `dim` dimensions (chunks of 10k)."""
    rng = np.random.default_rng(seed)
    key = stream_key("bench-search", BENCH_MODALITY)
    for i in range(0, records, WRITE_BATCH):
        pipe = client.pipeline(transaction=False)
        for v in random_units(rng, min(WRITE_BATCH, records - i), dim):
            e = Embedding("bench-search", BENCH_MODALITY, 0, WINDOW_NS, v, BENCH_MODEL, 0, 0)
            pipe.xadd(key, encode_embedding(e))
        pipe.execute()
    index = ModalityIndex(
        [Query("search", BENCH_MODALITY, random_units(rng, 1, dim)[0], BENCH_MODEL)], bench_background(rng, dim)
    )
    cost = {"xrange": 0.0, "decode": 0.0, "score": 0.0}
    start = "-"
    try:
        while True:
            t = time.perf_counter()
            entries = client.xrange(key, min=start, count=XRANGE_CHUNK)
            cost["xrange"] += time.perf_counter() - t
            if not entries:
                return cost
            t = time.perf_counter()
            x = np.stack([decode_embedding(key, i, f).emb for i, f in entries])
            cost["decode"] += time.perf_counter() - t
            t = time.perf_counter()
            index.shares(x)
            cost["score"] += time.perf_counter() - t
            start = "(" + entries[-1][0].decode()
    finally:
        client.delete(key)
