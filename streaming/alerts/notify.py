"""The notifier: delivers every alert to the phones and home automation that should get it, at least once.

Two halves, joined by one Redis stream per sink (its outbox), so that neither a crash nor a sink's outage
loses an alert:
* fan-out: reads `bindstream:alerts` through its own consumer group and appends each entry to the outbox of
  every sink that should get it (the global `urls`, and the `notify` URLs of the entry's query; health
  events go to the global sinks only); the appends and the XACK are one MULTI/EXEC, so an entry is queued
  once per sink, whatever crashes when;
* one sender thread per sink: sends the oldest entry of its outbox, then XDELs it; a failed send keeps it
  and backs off, so the sink gets every entry, in order, once it answers again, and holds up no other sink.

A plain class (`Notifier(settings, redis_url)`: `step()` one fan-out, `run()` to loop, `start()` the loop and
the senders) that also runs as a restartable Ray actor (`start_notifier`). The sinks are sinks.py's; ALERTS.md
("Delivery") describes the outboxes and the guarantees.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace

import ray
import redis

from ..records import text
from ..redis_access import connect
from ..redis_layout import (
    ALERTS_STREAM,
    HEALTH_EVENT,
    NOTIFY_FIELD,
    PARSE_ERRORS,
    SINKS,
    Alert,
    BadRecord,
    decode_notify,
    decode_outbox,
    encode_outbox,
    event_key,
    id_tuple,
    now_id,
    outbox_key,
    query_key,
    sink_id,
)
from ..retry import Backoff, repeat_until_stopped
from ..stage import StageMetrics, WarnOnce
from .sinks import ATTACH_MAX_BYTES, SEND_TIMEOUT_S, SendError, Sink, SinkError, Unsendable, parse_sink

log = logging.getLogger(__name__)

DEFAULT_GROUP = "bindstream-notifier"
FIRST_ENTRY = "0-0"  # XREAD after it: an outbox's oldest entry


@dataclass(frozen=True)
class NotifySettings:
    """How the notifier fans the alerts out and delivers them: the `[notify]` table of the pipeline config
    and the options of `bindstream notify`. Checked when built: every URL must name a sink."""

    urls: tuple[str, ...] = ()  # global sinks: every alert, and the health events
    group: str = DEFAULT_GROUP  # consumer group on bindstream:alerts
    consumer: str = "notifier"  # keep it stable across restarts: pending entries are per consumer
    start_id: str = field(default_factory=now_id)  # where the group starts when it is created ("0": every alert)
    read_count: int = 100  # alerts entries per fan-out; outbox entries per sender read
    block_ms: int = 100  # longest wait of one read (also how soon a stop is seen)
    outbox_maxlen: int = 10_000  # entries kept per sink; beyond, the oldest are dropped (dropped_outbox_full)
    send_timeout_s: float = SEND_TIMEOUT_S  # one send: connecting and the answer
    retry_max_s: float = 30.0  # backoff cap while a sink (or Redis) fails
    max_sinks: int = 256  # sinks with a sender thread; alerts for more are dropped (dropped_too_many_sinks)
    attach_max_bytes: int = ATTACH_MAX_BYTES  # evidence attached to one notification, in all
    max_logged: int = 1_000  # (reason, label) pairs warned about in the log; later ones are only counted
    autostart: bool = False  # start the loop and the senders in the constructor (actors: also after a restart)

    def __post_init__(self):
        urls = (self.urls,) if isinstance(self.urls, str) else tuple(self.urls)
        object.__setattr__(self, "urls", tuple(dict.fromkeys(urls)))
        for url in self.urls:
            parse_sink(url)  # SinkError (a ValueError) naming the URL
        try:
            id_tuple(self.start_id)
        except ValueError as err:
            raise ValueError(f"start_id {self.start_id!r} must be a stream id: 0 or ms-seq") from err
        for name in ("read_count", "block_ms", "outbox_maxlen", "max_sinks", "attach_max_bytes", "max_logged"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("send_timeout_s", "retry_max_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


class Notifier:
    """Fans the alerts out to the sinks' outboxes (queued and acknowledged in one transaction a batch) and
    runs one Sender per sink."""

    def __init__(self, settings: NotifySettings, redis_url: str):
        self.settings = settings
        self.client = connect(redis_url)
        self.metrics = StageMetrics("notify")
        self.sinks: dict[str, Sink] = {}  # sink id -> sink, for every sink queued to (at most max_sinks)
        self.senders: dict[str, Sender] = {}
        self.registered: set[str] = set()  # sink ids known to be in bindstream:sinks
        self.pending = True  # first fan out this consumer's read-but-unacknowledged entries
        self.grouped = False  # the consumer group exists
        self.resumed = False  # senders run for the outboxes left from before the start
        self.warn_once = WarnOnce(log, settings.max_logged)
        self.last_error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if settings.autostart:
            self.start()

    # ----- fan-out -----

    def step(self) -> int:
        """One fan-out: read a batch of alerts (this consumer's pending ones first), queue each on its sinks'
        outboxes and acknowledge it, in one transaction. Returns the number of entries read."""
        s = self.settings
        if not self.grouped:
            try:
                self.client.xgroup_create(ALERTS_STREAM, s.group, id=s.start_id, mkstream=True)
            except redis.ResponseError as err:
                if "BUSYGROUP" not in str(err):
                    raise
            self.grouped = True
        if self._thread is not None and not self.resumed:
            self._resume_senders()
        entries = self._read()
        if entries:
            self._fan_out(entries)
        return len(entries)

    def _read(self) -> list[tuple[str, dict]]:
        s = self.settings
        if self.pending:
            entries = self._xreadgroup("0", None)
            if entries:
                return entries
            self.pending = False
        return self._xreadgroup(">", s.block_ms)

    def _xreadgroup(self, marker: str, block_ms: int | None) -> list[tuple[str, dict]]:
        s = self.settings
        reply = self.client.xreadgroup(s.group, s.consumer, {ALERTS_STREAM: marker}, count=s.read_count, block=block_ms)
        return [(text(entry_id), f) for _, items in reply or [] for entry_id, f in items]

    def _fan_out(self, entries: list[tuple[str, dict]]) -> None:
        """Queue the batch on the outboxes and acknowledge it in one MULTI/EXEC; the outbox of each sink
        gets its entries in stream order, and its length before and after, to count what MAXLEN dropped.
        Entries that do not decode are acknowledged and counted (`rejected_malformed`; `trimmed`: trimmed
        by MAXLEN while pending). Counts are applied once the batch is committed."""
        s = self.settings
        tally: Counter = Counter()  # (event, label) -> n
        alerts = []
        for entry_id, f in entries:
            if not f:
                tally["trimmed", ""] += 1
                continue
            try:
                alerts.append(Alert.from_entry(entry_id, f))
            except PARSE_ERRORS as err:
                tally["rejected_malformed", ""] += 1
                self.warn_once("rejected_malformed", "", f"{ALERTS_STREAM} {entry_id}: {err!r}")
        queues: dict[str, list[Alert]] = defaultdict(list)  # sink id -> its alerts, in stream order
        for a, sinks in zip(alerts, self._routes(alerts, tally)):
            for sid in sinks:
                queues[sid].append(a)
        new = {sid: self.sinks[sid].url for sid in queues if sid not in self.registered}
        pipe = self.client.pipeline(transaction=True)
        for sid, queued in queues.items():
            pipe.xlen(outbox_key(sid))
            for a in queued:
                pipe.xadd(outbox_key(sid), encode_outbox(a), maxlen=s.outbox_maxlen, approximate=False)
            pipe.xlen(outbox_key(sid))
        if new:
            pipe.hset(SINKS, mapping=new)
        pipe.xack(ALERTS_STREAM, s.group, *[entry_id for entry_id, _ in entries])
        results = iter(pipe.execute())
        for sid, queued in queues.items():
            before = next(results)
            for _ in queued:
                next(results)
            tally["queued", sid] += len(queued)
            tally["dropped_outbox_full", sid] += before + len(queued) - next(results)
        self.registered |= new.keys()
        tally["in", ""] += len(entries)
        for (event, label), n in tally.items():
            self.metrics.count(event, label, n)
        if self._thread is not None:
            for sid in queues:
                self._sender(sid)

    def _routes(self, alerts: list[Alert], tally: Counter) -> list[list[str]]:
        """The sink ids of each alert: the global sinks, and for a query event the `notify` URLs of its query
        (of its event record once the query is removed: an event that started still ends where it started).
        A URL that names no sink is counted (`rejected_url` per query id), and so is one past `max_sinks`
        (`dropped_too_many_sinks`); an alert without any sink is counted as `no_sink` per query id."""
        queries = sorted({a.query for a in alerts if a.kind != HEALTH_EVENT})
        events = sorted({a.event for a in alerts if a.kind != HEALTH_EVENT and a.event})
        pipe = self.client.pipeline(transaction=False)
        for query in queries:
            pipe.exists(query_key(query))
            pipe.hget(query_key(query), NOTIFY_FIELD)
        for event in events:
            pipe.hget(event_key(event), NOTIFY_FIELD)
        replies = pipe.execute()
        by_query = {q: (bool(replies[2 * i]), decode_notify(replies[2 * i + 1])) for i, q in enumerate(queries)}
        by_event = dict(zip(events, map(decode_notify, replies[2 * len(queries) :])))
        out = []
        for a in alerts:
            urls = list(self.settings.urls)
            if a.kind != HEALTH_EVENT:
                exists, of_query = by_query[a.query]
                urls += of_query if exists else by_event.get(a.event, ())
            sinks = [sid for sid in dict.fromkeys(self._sink(url, a.query, tally) for url in urls) if sid]
            if not sinks:
                tally["no_sink", a.query] += 1
            out.append(sinks)
        return out

    def _sink(self, url: str, query: str, tally: Counter) -> str | None:
        """The id of the sink `url` names, parsed on first use; None (counted) if it names none or is one too
        many."""
        sid = sink_id(url)
        if sid in self.sinks:
            return sid
        if len(self.sinks) >= self.settings.max_sinks:
            tally["dropped_too_many_sinks", sid] += 1
            self.warn_once("dropped_too_many_sinks", "", f"{self.settings.max_sinks} sinks in use")
            return None
        try:
            self.sinks[sid] = parse_sink(url, self.settings.send_timeout_s, self.settings.attach_max_bytes)
        except SinkError as err:
            tally["rejected_url", query] += 1
            self.warn_once("rejected_url", query, str(err))
            return None
        return sid

    # ----- senders -----

    def _resume_senders(self) -> None:
        """Start senders for the global sinks and for every registered sink whose outbox is not empty (left
        from before a restart; a URL that no longer parses is counted as `rejected_url`)."""
        tally: Counter = Counter()
        registered = {text(k): text(v) for k, v in self.client.hgetall(SINKS).items()}
        self.registered |= registered.keys()
        pipe = self.client.pipeline(transaction=False)
        for sid in registered:
            pipe.xlen(outbox_key(sid))
        waiting = [url for url, n in zip(registered.values(), pipe.execute()) if n]
        for url in [*self.settings.urls, *waiting]:
            if found := self._sink(url, "", tally):
                self._sender(found)
        for (event, label), n in tally.items():
            self.metrics.count(event, label, n)
        self.resumed = True

    def _sender(self, sid: str) -> None:
        if sid not in self.senders:
            self.senders[sid] = Sender(self.sinks[sid], sid, self.client, self.settings, self.metrics, self._stop)

    # ----- running -----

    def run(self) -> None:
        """`step` until `stop`; errors back off and the unacknowledged entries are read again."""
        repeat_until_stopped(self.step, self._stop, self.settings.retry_max_s, self._failed)

    def _failed(self, err: Exception) -> None:
        """Redis down, the alerts stream deleted: count it, and keep going."""
        self.metrics.count("redis_error" if isinstance(err, redis.RedisError) else "error")
        self.last_error = str(err)
        if not isinstance(err, redis.RedisError):
            log.exception("fan-out failed; retrying")
        if "NOGROUP" in str(err):
            self.grouped = False
        self.pending = True

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="notifier", daemon=True)
        self._thread.start()

    def stop(self) -> dict:
        self._stop.set()
        if self._thread:
            self._thread.join()
        for sender in list(self.senders.values()):
            sender.join()
        return self.stats()

    def stats(self) -> dict:
        sinks, senders = dict(self.sinks), dict(self.senders)  # copies: the fan-out thread adds to both
        return self.metrics.snapshot(
            sinks={sid: sink.label for sid, sink in sinks.items()},
            failing=sorted(sid for sid, sender in senders.items() if sender.failing),
            pending=self.pending,
            last_error=self.last_error,
        )


class Sender:
    """Drains one sink's outbox in order, in a thread of its own: sends the oldest entry, then XDELs it. A
    failed send keeps it and backs off (`send_error`); an entry that does not decode or that the sink can
    never take is deleted and counted (`dropped_malformed`, `dropped_unsendable`); `sent` and evidence left
    out (`dropped_attach_*`) are counted per sink id, the latency from the alert's XADD to its delivery too."""

    def __init__(
        self,
        sink: Sink,
        sid: str,
        client: redis.Redis,
        settings: NotifySettings,
        metrics: StageMetrics,
        stop: threading.Event,
    ):
        self.sink, self.sid, self.client, self.settings, self.metrics = sink, sid, client, settings, metrics
        self.key = outbox_key(sid)
        self.failing = False
        self._stop = stop
        self._thread = threading.Thread(target=self.run, name=f"notify-{sid}", daemon=True)
        self._thread.start()

    def step(self) -> int:
        """Send what the outbox holds (up to `read_count` entries, waiting up to `block_ms` for one), oldest
        first; returns how many were done with. SendError (and Redis errors) leave the failed entry queued."""
        s = self.settings
        reply = self.client.xread({self.key: FIRST_ENTRY}, count=s.read_count, block=s.block_ms)
        done = 0
        for _, items in reply or []:
            for entry_id, f in items:
                if self._stop.is_set():
                    return done
                self._deliver(entry_id, f)
                self.client.xdel(self.key, entry_id)
                done += 1
        return done

    def _deliver(self, entry_id, f: dict) -> None:
        try:
            alert = decode_outbox(f)
            left_out = self.sink.send(alert, self.client)
        except BadRecord as err:
            self.metrics.count("dropped_malformed", self.sid)
            log.warning("%s: outbox entry %s does not decode: %s", self.sink.label, text(entry_id), err)
            return
        except Unsendable as err:
            self.metrics.count("dropped_unsendable", self.sid)
            log.warning("%s: %s", self.sink.label, err)
            return
        self.metrics.count("sent", self.sid)
        for reason in left_out:
            self.metrics.count(f"dropped_{reason}", self.sid)
        if alert.id:
            self.metrics.latency(time.time() - id_tuple(alert.id)[0] / 1000)

    def run(self) -> None:
        backoff = Backoff(self.settings.retry_max_s)
        while not self._stop.is_set():
            try:
                self.step()
            except (SendError, redis.RedisError) as err:
                self.metrics.count("send_error" if isinstance(err, SendError) else "redis_error", self.sid)
                if not self.failing:
                    log.warning("%s: %s; retrying with backoff, its notifications stay queued", self.sink.label, err)
                self.failing = True
                backoff.wait(self._stop)
                continue
            except Exception:  # a bug in a sink: keep the entry and go on trying, loudly
                self.metrics.count("error", self.sid)
                log.exception("%s: sending failed", self.sink.label)
                self.failing = True
                backoff.wait(self._stop)
                continue
            if self.failing:
                log.info("%s: delivering again", self.sink.label)
            self.failing = False
            backoff.reset()

    def join(self) -> None:
        self._thread.join()
        self.sink.close()


def start_notifier(settings: NotifySettings, redis_url: str, max_restarts: int = -1, num_cpus: float = 0):
    """A notifier actor, running from construction and restarted by Ray (up to `max_restarts`, -1: always)
    with the same settings after a crash; its consumer name is stable, so a restart resumes its pending
    alerts, and its senders the outboxes. Run one per Redis: two senders of one outbox would send its head
    twice."""
    return (
        ray.remote(Notifier)
        .options(max_restarts=max_restarts, num_cpus=num_cpus)
        .remote(replace(settings, autostart=True), redis_url)
    )
