"""The alert benchmark of `bindstream bench alerts`: matcher throughput, alert latency, event latency to a
notification, and the cost of a brute-force search, against a real redis-server, on random unit vectors (no
model). The matcher and the notifier run in spawned processes of their own with one BLAS thread (Ray actors get
the same) while this process writes the embeddings and receives the notifications (a local HTTP server for
apprise's json:// sink, or an MQTT subscriber); what a run writes to Redis it deletes after."""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from multiprocessing import get_context

import numpy as np
import paho.mqtt.client as mqtt
import redis

from ..records import Embedding, text
from ..redis_access import connect
from ..redis_layout import (
    ALERTS_STREAM,
    END,
    FANIN_CURSORS,
    SINKS,
    START,
    STREAM_REGISTRY,
    Alert,
    background_key,
    decode_embedding,
    device_alerts_key,
    encode_embedding,
    event_id,
    health_key,
    id_tuple,
    members_key,
    now_id,
    outbox_key,
    owner_key,
    register_streams,
    sink_id,
    state_key,
    stream_key,
)
from ..redis_server import RedisServer
from ..stage import Counts
from .matcher import ONE_BLAS_THREAD, Matcher, MatcherSettings
from .notify import Notifier, NotifySettings
from .queries import delete_query, save_background, save_query
from .records import Background, Decision, Query
from .scoring import ModalityIndex
from .search import XRANGE_CHUNK
from .sinks import SEND_TIMEOUT_S, MqttSink, SinkError, body_key, notification_key, parse_sink

BENCH_MODEL = "bench"
BENCH_MODALITY = "audio"
BENCH_BACKGROUND = 16  # background vectors
BENCH_DECISION = Decision(threshold=0.5, k=2, n=3, cooldown_s=0.0, hysteresis=0.2)
EVENT_WINDOWS = 3  # windows equal to a query's vector (one alert each, at the k-th), then a background one ends it
WINDOW_NS = 2_000_000_000
WRITER_TICK_S = 0.005
WRITE_BATCH = 1000  # XADDs per pipeline when filling the search stream
DRAIN_IDLE_STEPS = 3  # matcher steps reading nothing before the run counts as drained
READY_TIMEOUT_S = 120.0  # for the matcher and notifier processes to start
NOTIFY_POLL_S = 0.05  # how often the waits for the notifications look
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
    mqtt: str | None = None  # an MQTT broker (mqtt[s]://...) to notify through; None: a local HTTP receiver
    delivery_timeout_s: float = 30.0  # once the matcher drained, the longest wait for the last notifications
    seed: int = 0


@dataclass
class AlertFigures:
    score_per_s: float  # embeddings scored per second on one core, score_batch rows a call
    score_batch: int  # the matcher's read count
    sent: int  # embeddings written ...
    write_s: float  # ... in this long
    events: int  # events whose k-th window was written: each must give one alert and one start notification
    ended: int  # events whose ending window was written: each must give one end notification
    latency_ms: np.ndarray  # per alert: XADD of the window -> XADD of the alert
    start_ms: np.ndarray  # per start notification received: its firing window sent -> received
    end_ms: np.ndarray  # per end notification received: its ending window sent -> received
    sink: str  # where the notifications went (without secrets)
    malformed: int  # posts or messages received without an idempotency key
    matcher: Counts  # the matcher's counts
    notifier: Counts  # the notifier's counts
    search_s: dict[str, float] | None  # XRANGE / decode / score seconds of search_records windows


def run_bench(bench: AlertBench, url: str | None = None) -> AlertFigures:
    """Run `bench` against the Redis at `url` (a scratch one: the run writes there) or, without, an embedded
    redis-server of its own."""
    batch = MatcherSettings.read_count
    with ExitStack() as stack:
        # first: a broker out of reach fails before the scoring run
        receiver: Receiver = MqttReceiver(bench.mqtt) if bench.mqtt else HttpReceiver()
        stack.enter_context(receiver)
        with one_thread_pool() as pool:
            score_per_s = pool.submit(
                scoring_rate, bench.queries, bench.dim, batch, bench.score_rows, bench.seed
            ).result()
        url = url or stack.enter_context(RedisServer()).url
        client = connect(url)
        written, due, alerts, stats, notified = alert_run(client, url, bench, receiver)
        search_s = search_cost(client, bench.search_records, bench.dim, bench.seed) if bench.search_records else None
    latency = np.array([id_tuple(a.id)[0] - id_tuple(a.source_id)[0] for a in alerts], dtype=float)
    start_ms, end_ms = (
        np.array([1000 * (receiver.received[k] - t) for k, t in due[s].items() if k in receiver.received])
        for s in (START, END)
    )
    return AlertFigures(
        score_per_s,
        batch,
        written.sent,
        written.seconds,
        len(due[START]),
        len(due[END]),
        latency,
        start_ms,
        end_ms,
        receiver.label,
        receiver.malformed,
        Counts.of(stats),
        Counts.of(notified),
        search_s,
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
def one_thread_pool(workers: int = 1):
    """A pool of `workers` processes whose BLAS runs one thread (the matcher's one core; Ray actors get the
    same)."""
    saved = {k: os.environ.get(k) for k in ONE_BLAS_THREAD}
    os.environ.update(ONE_BLAS_THREAD)
    try:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
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


def notify_until_done(settings: NotifySettings, url: str, ready_key: str, done_key: str) -> dict:
    """Run a notifier (its fan-out and sender threads): set `ready_key` once its consumer group exists, stop
    when `done_key` exists."""
    notifier = Notifier(settings, url)
    notifier.step()
    notifier.client.set(ready_key, 1)
    notifier.start()
    while not notifier.client.exists(done_key):
        time.sleep(NOTIFY_POLL_S)
    return notifier.stop()


def mqtt_sink(url: str) -> MqttSink:
    """The MQTT sink `url` names; SinkError if it names another sink or none."""
    sink = parse_sink(url)
    if not isinstance(sink, MqttSink):
        raise SinkError(f"{sink.label} is no mqtt[s]://[user[:password]@]host[:port][/prefix] URL")
    return sink


class HttpReceiver:
    """The sink of apprise's `json://` URL: an HTTP server on 127.0.0.1 in a thread of this process, keeping the
    wall time each idempotency key (the body's last line) was first received; a post without one is answered
    400 and counted (`malformed`)."""

    def __init__(self):
        self.received: dict[str, float] = {}
        self.malformed = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                at = time.time()
                try:
                    key = body_key(json.loads(raw)["message"])
                except (ValueError, KeyError, TypeError, AttributeError):
                    key = ""
                if key:
                    receiver.received.setdefault(key, at)
                else:
                    receiver.malformed += 1
                self.send_response(200 if key else 400)
                self.end_headers()

            def log_message(self, *args) -> None:  # not a terminal line per notification
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)  # one request at a time: the sink's one sender posts
        self.url = self.label = f"json://127.0.0.1:{self.server.server_port}/"
        threading.Thread(target=self.server.serve_forever, name="bench-receiver", daemon=True).start()

    def __enter__(self) -> HttpReceiver:
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


class MqttReceiver:
    """The other side of an MQTT sink: a paho subscriber (a thread of this process) to the `event` topic of every
    (device, query) under the sink's prefix, keeping the wall time each idempotency key (`key` of the JSON) was
    first received; a message without one is counted (`malformed`). Its broker should be a scratch one, as
    `--redis`: the sink leaves its retained state and Home Assistant discovery messages there."""

    def __init__(self, url: str):
        sink = mqtt_sink(url)
        self.url, self.label = url, sink.label
        self.received: dict[str, float] = {}
        self.malformed = 0
        subscribed, refused = threading.Event(), []

        def on_connect(client, _userdata, _flags, reason, _properties) -> None:
            if reason.is_failure:
                refused.append(f"refused the connection: {reason}")
                subscribed.set()
            else:
                client.subscribe(f"{sink.prefix}/+/+/event", qos=1)

        def on_subscribe(_client, _userdata, _mid, reasons, _properties) -> None:
            refused.extend(f"refused the subscription: {r}" for r in reasons if r.is_failure)
            subscribed.set()

        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"bindstream-bench-{secrets.token_hex(6)}"
        )
        if sink.username is not None:
            self.client.username_pw_set(sink.username, sink.password)
        self.client.on_connect, self.client.on_subscribe, self.client.on_message = (
            on_connect,
            on_subscribe,
            self._on_message,
        )
        try:
            if sink.tls:
                self.client.tls_set()
            self.client.connect(sink.host, sink.port)
        except (OSError, ValueError) as err:  # refused, unreachable, TLS
            raise ConnectionError(f"the MQTT broker {sink.label}: cannot connect: {err}") from err
        self.client.loop_start()
        if not subscribed.wait(SEND_TIMEOUT_S) or refused:
            self.__exit__()
            raise ConnectionError(f"the MQTT broker {sink.label} {refused[0] if refused else 'did not answer'}")

    def _on_message(self, _client, _userdata, message) -> None:
        at = time.time()
        try:
            key = json.loads(message.payload)["key"]
        except (ValueError, KeyError, TypeError):
            self.malformed += 1
            return
        self.received.setdefault(key, at)

    def __enter__(self) -> MqttReceiver:
        return self

    def __exit__(self, *exc) -> None:
        self.client.disconnect()
        self.client.loop_stop()


Receiver = HttpReceiver | MqttReceiver


@dataclass
class WrittenEvent:
    """One event `write_stream` started: its device and query (indexes), the entry id of the window that fires
    it (the k-th matching one), and the wall times (s) the batches holding that window and the window ending the
    event (the first non-matching one after its run) were sent; None: not written before the run's end."""

    device: int
    query: int
    fired_id: str = ""
    fired_at: float | None = None
    ended_at: float | None = None


@dataclass
class Written:
    """What `write_stream` wrote: embeddings, in how long, and the events it started."""

    sent: int
    seconds: float
    events: list[WrittenEvent]


def write_stream(
    client: redis.Redis,
    devices: list[str],
    query_vectors: np.ndarray,
    background: np.ndarray,
    rate: float,
    seconds: float,
    events_per_s: float,
    seed: int,
) -> Written:
    """XADD embeddings round robin over `devices` at `rate`/s for `seconds`: background windows (a random
    background vector plus as much random noise), and every 1/`events_per_s` s, on the next device without an
    event in progress, an event: EVENT_WINDOWS windows equal to a query's vector (the queries in turn), then a
    background window, which ends it."""
    rng = np.random.default_rng(seed)
    dim = query_vectors.shape[1]
    t_dev, left = [0] * len(devices), [0] * len(devices)  # left: windows of the device's event to write, the end's too
    current: dict[int, WrittenEvent] = {}  # device -> its latest event
    events: list[WrittenEvent] = []
    written: set[str] = set()  # the streams of the batch
    sent = 0
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
        fired: list[tuple[int, WrittenEvent]] = []  # (row of the batch, event)
        ended: list[WrittenEvent] = []
        for i in range(due):
            d = sent % len(devices)
            if left[d] == 0 and time.monotonic() >= next_event:
                current[d] = WrittenEvent(d, len(events) % len(query_vectors))
                events.append(current[d])
                left[d] = EVENT_WINDOWS + 1
                next_event += 1 / events_per_s
            nth = EVENT_WINDOWS + 1 - left[d]  # of the device's event's windows, from 0 (left 0: past its end)
            v = query_vectors[current[d].query] if nth < EVENT_WINDOWS else noise[i]
            if nth == BENCH_DECISION.k - 1:
                fired.append((i, current[d]))
            elif nth == EVENT_WINDOWS:
                ended.append(current[d])
            left[d] = max(left[d] - 1, 0)
            e = Embedding(devices[d], BENCH_MODALITY, t_dev[d], t_dev[d] + WINDOW_NS, v, BENCH_MODEL, 0, 0)
            pipe.xadd(stream_key(devices[d], BENCH_MODALITY), encode_embedding(e))
            written.add(stream_key(devices[d], BENCH_MODALITY))
            t_dev[d] += WINDOW_NS
            sent += 1
        sent_at = time.time()  # the receivers' clock: a Redis elsewhere may have another
        ids = pipe.execute()
        register_streams(client, sorted(written))  # as the publisher does: the matcher reads what it lists
        written.clear()
        for i, event in fired:
            event.fired_id, event.fired_at = text(ids[i]), sent_at
        for event in ended:
            event.ended_at = sent_at
    return Written(sent, time.monotonic() - start, events)


def notifications_due(written: Written, query_ids: list[str], devices: list[str]) -> dict[str, dict[str, float]]:
    """{START: {idempotency key: wall time its firing window was sent}, END: {key: ... its ending window ...}}
    of the notifications the written events must give (keys: sinks.notification_key), their event ids the
    matcher's (the query, the stream, the firing window's entry)."""
    due: dict[str, dict[str, float]] = {START: {}, END: {}}
    for e in written.events:
        if e.fired_at is None:
            continue
        event = event_id(query_ids[e.query], stream_key(devices[e.device], BENCH_MODALITY), e.fired_id)
        due[START][notification_key(event, START)] = e.fired_at
        if e.ended_at is not None:
            due[END][notification_key(event, END)] = e.ended_at
    return due


def wait_ready(client: redis.Redis, starting: dict[str, Future]) -> None:
    """Wait until each process of `starting` (its ready key: its future) has set its key; raises the error of one
    that failed, TimeoutError after READY_TIMEOUT_S."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while client.exists(*starting) < len(starting):
        for future in starting.values():
            if future.done():
                future.result()  # raises the process's error
        if time.monotonic() > deadline:
            raise TimeoutError(f"the matcher and notifier processes did not start in {READY_TIMEOUT_S:g} s")
        time.sleep(WRITER_TICK_S)


def wait_delivered(receiver: Receiver, due: dict[str, dict[str, float]], timeout_s: float, notifier: Future) -> None:
    """Wait until `receiver` has every notification `due`, or `timeout_s` passed (the missing ones count as not
    received); raises the notifier's error if it failed."""
    deadline = time.monotonic() + timeout_s
    keys = [k for by_key in due.values() for k in by_key]
    while not all(k in receiver.received for k in keys) and time.monotonic() < deadline:
        if notifier.done():
            notifier.result()
        time.sleep(NOTIFY_POLL_S)


def alert_run(
    client: redis.Redis, url: str, bench: AlertBench, receiver: Receiver
) -> tuple[Written, dict[str, dict[str, float]], list[Alert], dict, dict]:
    """Queries (orthonormal, so that an event matches one query), a matcher and a notifier (its one sink
    `receiver`) in one-thread processes, and this process writing; returns (written, the notifications due,
    the run's alerts, the matcher's stats, the notifier's). Cleans up after."""
    rng = np.random.default_rng(bench.seed)
    tag = f"bench-{rng.integers(1 << 30):08x}"
    names = [f"{tag}-{i}" for i in range(bench.devices)]
    basis = np.linalg.qr(rng.standard_normal((bench.dim, bench.queries + BENCH_BACKGROUND)))[0].T.astype(np.float32)
    query_vectors, background = basis[: bench.queries], basis[bench.queries :]
    settings = MatcherSettings(group=tag, devices=f"{tag}-*", start_id="0")
    notify = NotifySettings(urls=(receiver.url,), group=f"{tag}-notifier", start_id=now_id())
    ready, done, notify_ready, notified = (f"{tag}:{k}" for k in ("ready", "done", "notify-ready", "notified"))
    save_background(
        client, Background(BENCH_MODEL, BENCH_MODALITY, tuple(f"b{i}" for i in range(len(background))), background)
    )
    for n in names:  # the streams exist before the run: stream discovery is not part of the latency
        client.xgroup_create(stream_key(n, BENCH_MODALITY), settings.group, id="0", mkstream=True)
    register_streams(client, [stream_key(n, BENCH_MODALITY) for n in names])
    added = [
        save_query(client, Query(f"q{i}", BENCH_MODALITY, v, BENCH_MODEL, device=f"{tag}-*", decision=BENCH_DECISION))
        for i, v in enumerate(query_vectors)
    ]
    try:
        with one_thread_pool(2) as pool:
            notifier = pool.submit(notify_until_done, notify, url, notify_ready, notified)
            try:
                matcher = pool.submit(match_until_done, settings, url, ready, done)
                try:
                    wait_ready(client, {ready: matcher, notify_ready: notifier})
                    written = write_stream(
                        client,
                        names,
                        query_vectors,
                        background,
                        bench.rate,
                        bench.seconds,
                        bench.events_per_s,
                        bench.seed,
                    )
                finally:
                    client.set(done, 1)  # the matcher drains and returns
                stats = matcher.result()
                due = notifications_due(written, [q.id for q in added], names)
                wait_delivered(receiver, due, bench.delivery_timeout_s, notifier)
            finally:
                client.set(notified, 1)  # the notifier stops
            notifier_stats = notifier.result()
        alerts = [  # the entries that start an event: one per event written
            a
            for a in (Alert.from_entry(i, f) for i, f in client.xrange(ALERTS_STREAM))
            if a.device.startswith(tag) and a.state == START
        ]
    finally:
        for q in added:
            delete_query(client, q.id)
        if client.exists(ALERTS_STREAM):
            client.xgroup_destroy(ALERTS_STREAM, notify.group)
        client.hdel(SINKS, sink_id(receiver.url))
        client.hdel(FANIN_CURSORS, *names)
        client.zrem(STREAM_REGISTRY, *[stream_key(n, BENCH_MODALITY) for n in names])
        client.delete(
            background_key(BENCH_MODEL, BENCH_MODALITY),
            ready,
            done,
            notify_ready,
            notified,
            outbox_key(sink_id(receiver.url)),
            members_key(settings.group),
            *[
                k
                for n in names
                for k in (
                    stream_key(n, BENCH_MODALITY),
                    state_key(settings.group, stream_key(n, BENCH_MODALITY)),
                    owner_key(settings.group, n),
                    health_key(settings.group, n),
                    device_alerts_key(n),
                )
            ],
        )
    return written, due, alerts, stats, notifier_stats


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
