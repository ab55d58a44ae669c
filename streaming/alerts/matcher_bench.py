"""The matchers at scale (`bindstream bench matchers`): `streams` device streams at `rate` windows/s each, written
straight to Redis with the real encoding (and registered, as the publisher does), read by `matchers` matcher
processes of one group sharing the devices (shards.py); a standing vector query matches a known share of the
windows. Measured over `seconds` after `warmup_s`: alert latency (the window's XADD to its alert's XADD in
bindstream:alerts, both by their entry ids), Redis CPU (INFO cpu, summed over the primaries of a cluster) and each
matcher process's CPU per 1,000 windows. After the writing stops and the matchers drain, every matching window
must have given exactly one alert.

The writer is this process; each matcher a process of its own with one BLAS thread (as the Ray actors), so that
on a small machine the figures show each part's CPU apart, not that they are alone on it.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace

import numpy as np

from ..records import Embedding
from ..redis_access import connect, server_info_sum
from ..redis_layout import (
    ALERTS_STREAM,
    QUERY_EVENT,
    START,
    Alert,
    encode_embedding,
    id_tuple,
    register_streams,
    stream_key,
)
from ..redis_server import EmbeddedCluster, RedisServer
from ..stage import Counts
from .matcher import ONE_BLAS_THREAD, Matcher, MatcherSettings
from .queries import save_background, save_query
from .records import Background, Decision, Query

MODALITY, MODEL = "audio", "bench"
BACKGROUND = 16  # background vectors; the query is orthogonal to them
DECISION = Decision(k=1, n=1, cooldown_s=0)  # every matching window that follows a quiet one fires
TICK_S = 0.01  # the writer's step: what is due is written in one pipeline
NOISE_POOL = 256  # quiet windows are drawn from this many precomputed vectors
POLL_S = 0.2
CPU = ("cpu", ("used_cpu_user", "used_cpu_sys"))  # INFO section and fields of Redis's CPU seconds


@dataclass(frozen=True)
class MatcherBench:
    """One run's settings."""

    streams: int = 10_000  # devices, one audio stream each
    rate: float = 1.0  # windows per second per stream
    matchers: int = 2  # matcher processes sharing the streams
    seconds: float = 10.0  # measured, after the warm-up
    warmup_s: float = 10.0  # writing before the measurement: every device taken, every matcher steady
    dim: int = 1024  # 1024: imagebind_huge
    match_every: int = 50  # a stream's window n matches when (n + stream index) % match_every == 0: 2 % of them
    maxlen: int = 64  # entries kept per stream (MAXLEN ~): above what a run writes, so that no window is trimmed unread
    drain_timeout_s: float = 120.0  # after the writing, longest wait for the matchers to read everything
    seed: int = 0

    def __post_init__(self):
        if self.streams < 1 or self.matchers < 1 or self.match_every < 2 or self.dim < 2 or self.maxlen < 1:
            raise ValueError("streams, matchers, dim and maxlen must be at least 1 (dim 2), match_every at least 2")
        if not (self.rate > 0 and self.seconds > 0 and self.warmup_s >= 0):
            raise ValueError("rate and seconds must be > 0, warmup_s >= 0")


@dataclass
class MatcherFigures:
    """What a run measured (over the measured interval unless said)."""

    bench: MatcherBench
    where: str  # the Redis: embedded redis-server, embedded Redis Cluster, or --redis's scheme
    written: int  # windows written in the measured interval
    seconds: float  # its length
    decided: list[int]  # windows each matcher read in it
    matcher_cpu_s: list[float]  # each matcher process's CPU in it
    redis_cpu_s: float  # Redis's CPU in it (all primaries)
    writer_cpu_s: float  # this process's CPU in it
    latency_ms: np.ndarray  # of the alerts of windows written in it
    matching: int  # matching windows written in the whole run (warm-up included)
    total: tuple[int, int]  # windows written, and decided by the end of the drain, in the whole run
    alerts: int  # alerts (starts) in bindstream:alerts for them after the drain
    duplicates: int  # `duplicate_alert` of every matcher, whole run
    devices: list[int] = field(default_factory=list)  # devices each matcher held at the end of the interval
    handovers: tuple[int, int, int] = (0, 0, 0)  # rebalances, devices taken, devices lost by all matchers, whole run
    redis_bytes_per_entry: float = 0.0  # used_memory (all primaries) at the end / the entries the streams hold

    def rows(self) -> list[tuple[str, str]]:
        """(figure, value) rows of the printed table."""
        b, seconds = self.bench, self.seconds
        decided = sum(self.decided)
        per_k = 1000 / max(decided, 1)
        p50, p99 = (np.percentile(self.latency_ms, q) if len(self.latency_ms) else float("nan") for q in (50, 99))
        matcher_ms = [1e6 * c / max(n, 1) for c, n in zip(self.matcher_cpu_s, self.decided)]
        return [
            ("windows written /s (target)", f"{self.written / seconds:,.0f} ({b.streams * b.rate:,.0f})"),
            ("windows decided /s, per matcher", ", ".join(f"{n / seconds:,.0f}" for n in self.decided)),
            ("devices held, per matcher", ", ".join(map(str, self.devices))),
            ("windows written / decided (whole run, after the drain)", f"{self.total[0]:,} / {self.total[1]:,}"),
            ("matching windows / alerts (whole run)", f"{self.matching:,} / {self.alerts:,}"),
            ("duplicate alerts", str(self.duplicates)),
            ("rebalances / devices taken / devices lost, all matchers", " / ".join(f"{n:,}" for n in self.handovers)),
            ("alert latency p50 / p99, window XADD -> alert XADD (ms)", f"{p50:.1f} / {p99:.1f}"),
            ("Redis CPU, % of one core", f"{100 * self.redis_cpu_s / seconds:.1f}"),
            ("Redis CPU per 1,000 windows decided (ms; writes included)", f"{1000 * self.redis_cpu_s * per_k:.1f}"),
            ("matcher CPU per 1,000 windows (ms), per matcher", ", ".join(f"{ms:.1f}" for ms in matcher_ms)),
            (
                "matcher CPU, % of one core, per matcher",
                ", ".join(f"{100 * c / seconds:.1f}" for c in self.matcher_cpu_s),
            ),
            (
                "writer CPU per 1,000 windows (ms; the publisher's writes)",
                f"{1e6 * self.writer_cpu_s / max(self.written, 1):.1f}",
            ),
            # what one stream costs at the rate, from the CPU per window decided (not per stream: matchers that fell
            # behind would make a stream look cheaper than it is); exact while they keep up
            (f"per stream at {b.rate:g} window/s: Redis CPU (us/s)", f"{1e3 * self.redis_cpu_s * per_k * b.rate:.1f}"),
            (
                f"per stream at {b.rate:g} window/s: matchers' CPU (us/s)",
                f"{1e6 * sum(self.matcher_cpu_s) / max(decided, 1) * b.rate:.1f}",
            ),
            (
                f"Redis memory per entry kept, {b.dim}-d (bytes; its stream's index, state and registry included)",
                f"{self.redis_bytes_per_entry:,.0f}",
            ),
        ]


def matcher_process(settings: MatcherSettings, url: str, conn) -> None:
    """A matcher in this process, its loop on a thread; answers `conn`: "mark" -> (process CPU s, stats),
    "stop" -> the same after stopping."""
    matcher = Matcher(replace(settings, autostart=True), url)
    while True:
        command = conn.recv()
        if command == "stop":
            stats = matcher.stop()
            conn.send((time.process_time(), stats))
            return
        conn.send((time.process_time(), matcher.stats()))


class Matchers:
    """The matcher processes of one run."""

    def __init__(self, settings: MatcherSettings, url: str, count: int):
        ctx = multiprocessing.get_context("spawn")  # no fork of this process's threads and sockets
        saved = {k: os.environ.get(k) for k in ONE_BLAS_THREAD}
        os.environ.update(ONE_BLAS_THREAD)  # the children's BLAS: one thread, as the Ray actors'
        try:
            self.conns, self.procs = [], []
            for i in range(count):
                mine, theirs = ctx.Pipe()
                proc = ctx.Process(target=matcher_process, args=(replace(settings, consumer=f"bench-{i}"), url, theirs))
                proc.start()
                self.conns.append(mine)
                self.procs.append(proc)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k)
                else:
                    os.environ[k] = v

    def ask(self, command: str) -> list[tuple[float, dict]]:
        for conn in self.conns:
            conn.send(command)
        return [conn.recv() for conn in self.conns]

    def close(self) -> None:
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


def run_matcher_bench(b: MatcherBench, url: str | None = None, cluster: int = 0) -> MatcherFigures:
    """Run `b` against the Redis (or Redis Cluster) at `url`, a scratch one: the run's keys, named by its tag, stay
    there; or, without, against an embedded Redis Cluster of `cluster` masters, or an embedded redis-server."""
    with ExitStack() as stack:
        if url:
            where = f"{url.split('://')[0]}:// at --redis"
        elif cluster:
            url, where = stack.enter_context(EmbeddedCluster(cluster)).url, f"embedded Redis Cluster, {cluster} masters"
        else:
            url, where = stack.enter_context(RedisServer()).url, "embedded redis-server"
        client = connect(url)
        rng = np.random.default_rng(b.seed)
        tag = f"mbench-{rng.integers(1 << 30):08x}"
        devices = [f"{tag}-{i}" for i in range(b.streams)]
        keys = [stream_key(d, MODALITY) for d in devices]
        basis = np.linalg.qr(rng.standard_normal((b.dim, BACKGROUND + 1)))[0].T.astype(np.float32)
        query, background = basis[0], basis[1:]
        save_background(client, Background(MODEL, MODALITY, tuple(f"b{i}" for i in range(BACKGROUND)), background))
        save_query(client, Query("bench vector", MODALITY, query, MODEL, device=f"{tag}-*", decision=DECISION))
        noise = rng.standard_normal((NOISE_POOL, b.dim))  # a random direction plus as much of a background vector
        noise = (
            noise / np.linalg.norm(noise, axis=1, keepdims=True) + background[rng.integers(BACKGROUND, size=NOISE_POOL)]
        )
        quiet = [encode_embedding(Embedding("", MODALITY, 0, 0, v / np.linalg.norm(v), MODEL, 0, 0)) for v in noise]
        settings = MatcherSettings(group=tag, devices=f"{tag}-*", start_id="0")
        writer = Writer(client, keys, query, quiet, b)
        writer.write_until(time.monotonic() + 1 / b.rate)  # every stream exists before the matchers start
        matchers = Matchers(settings, url, b.matchers)
        try:
            matchers.ask("mark")  # every matcher process is up
            writer.rebase()
            writer.write_until(time.monotonic() + b.warmup_s)
            first, redis0, writer0 = matchers.ask("mark"), server_info_sum(client, *CPU), time.process_time()
            start, written0 = time.monotonic(), writer.sent
            writer.write_until(start + b.seconds)
            last, redis1, writer1 = matchers.ask("mark"), server_info_sum(client, *CPU), time.process_time()
            seconds, written = time.monotonic() - start, writer.sent - written0
            measured_from_ms = writer.first_ms_after(written0)
            deadline = time.monotonic() + b.drain_timeout_s
            while time.monotonic() < deadline and sum(count_in(s) for _, s in matchers.ask("mark")) < writer.sent:
                time.sleep(POLL_S)
            final = matchers.ask("stop")
            memory = server_info_sum(client, "memory", ("used_memory",))
        finally:
            matchers.close()
        alerts = [  # the query's events (the streams fall silent after the run: health events follow)
            a
            for a in (Alert.from_entry(i, f) for i, f in client.xrange(ALERTS_STREAM))
            if a.device.startswith(tag) and a.state == START and a.kind == QUERY_EVENT
        ]
        measured = [a for a in alerts if id_tuple(a.source_id)[0] >= measured_from_ms]
        latency = np.array([id_tuple(a.id)[0] - id_tuple(a.source_id)[0] for a in measured], dtype=float)
    handovers = [
        sum(Counts.of(s).get(event) for _, s in final) for event in ("rebalance", "device_taken", "device_lost")
    ]
    return MatcherFigures(
        b,
        where,
        written,
        seconds,
        [count_in(s1) - count_in(s0) for (_, s0), (_, s1) in zip(first, last)],
        [c1 - c0 for (c0, _), (c1, _) in zip(first, last)],
        redis1 - redis0,
        writer1 - writer0,
        latency,
        writer.matching,
        (writer.sent, sum(count_in(s) for _, s in final)),
        len(alerts),
        sum(Counts.of(s).get("duplicate_alert") for _, s in final),
        devices=[s.get("devices", 0) for _, s in last],
        handovers=(handovers[0], handovers[1], handovers[2]),
        redis_bytes_per_entry=memory / max(min(writer.sent, b.streams * b.maxlen), 1),
    )


def count_in(stats: dict) -> int:
    return Counts.of(stats).get("in")


class Writer:
    """Writes every stream's windows at `rate`, the streams' phases spread over the period, each tick's in one
    pipeline followed by their registration (as the publisher does)."""

    def __init__(self, client, keys: list[str], query: np.ndarray, quiet: list[dict], b: MatcherBench):
        self.client, self.keys, self.b = client, keys, b
        self.match = encode_embedding(Embedding("", MODALITY, 0, 0, query, MODEL, 0, 0))
        self.quiet = quiet
        self.sent = self.matching = 0
        self.started = time.monotonic()
        self.batches: list[tuple[int, int]] = []  # (sent before the batch, its first entry's ms)

    def rebase(self) -> None:
        """Go on from now, as if the windows written so far had been written just before: no burst to catch up
        on a wait (the matchers' start)."""
        self.started = time.monotonic() - self.sent / (self.b.rate * len(self.keys))

    def write_until(self, end: float) -> None:
        b, n = self.b, len(self.keys)
        while (now := time.monotonic()) < end:
            due = int((now - self.started) * b.rate * n) - self.sent
            if due <= 0:
                time.sleep(TICK_S)
                continue
            pipe = self.client.pipeline(transaction=False)
            touched = []
            for k in range(self.sent, self.sent + due):
                stream, window = k % n, k // n
                matching = (window + stream) % b.match_every == 0
                fields = dict(self.match if matching else self.quiet[k % len(self.quiet)])
                fields["t0"], fields["t1"] = window * 10**9, (window + 2) * 10**9
                pipe.xadd(self.keys[stream], fields, maxlen=b.maxlen, approximate=True)
                touched.append(self.keys[stream])
                self.matching += matching
            ids = pipe.execute()
            register_streams(self.client, list(dict.fromkeys(touched)))
            self.batches.append((self.sent, id_tuple(ids[0].decode())[0]))
            self.sent += due

    def first_ms_after(self, sent: int) -> int:
        """The server ms of the first batch written once `sent` windows were."""
        return next((ms for before, ms in self.batches if before >= sent), 0)
