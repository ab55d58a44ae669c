"""The event part of `bindstream demo`: every simulated wearable's mic plays a chirp burst at known times
(sensors/simulator.py, `ChirpBursts`); the demo writes one burst to a WAV file, adds it as an example query
(`alert add --example`), sends the notifications to a local HTTP endpoint of its own (a `json://` sink),
prints each event change and each notification as it arrives, and at the end counts the events and the
notifications and saves one event's evidence (`event show --save`).

The rule: what the demo reports is read back from where a user would look (the alerts stream, the event
records, what the endpoint received), never assumed from the schedule of the bursts.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import click
import redis

from sensors.simulator import MIC_RATE, ChirpBursts
from streaming.alerts.events import list_events
from streaming.alerts.notify import Notifier, NotifySettings
from streaming.alerts.queries import delete_query, load_queries
from streaming.alerts.sinks import body_key, idempotency_key, notification_key
from streaming.records import text
from streaming.redis_access import connect
from streaming.redis_layout import (
    ALERTS_STREAM,
    AUDIO_CHANNELS,
    AUDIO_PCM,
    AUDIO_RATE,
    AUDIO_T0,
    END,
    ENDED,
    PARSE_ERRORS,
    START,
    UPDATE,
    Alert,
    Event,
    evidence_key,
    now_id,
    pcm16,
    pcm_wav,
)

from .alerts import alert_add
from .review import event_show
from .terminal import console, table

NS_PER_S = 1_000_000_000


@dataclass(frozen=True)
class DemoEventSettings:
    """The demo's example query, its local endpoint, and how long its end waits for what is still on the way."""

    query_text: str = "demo chirp burst"  # the example query's label
    max_body_bytes: int = 8 * 1024 * 1024  # one notification: the attached evidence (<= 2.5 MB) comes as base64
    max_kept: int = 10_000  # notifications the endpoint keeps; later ones are counted only (`dropped`)
    read_count: int = 100  # alerts entries read per look (each loop of the live table looks once)
    max_events: int = 10_000  # events of the demo query listed at the end
    deliver_s: float = 20.0  # after the drain: longest wait for the notifications still queued
    evidence_s: float = 10.0  # longest wait for the saved event's evidence to reach the event's end
    poll_s: float = 0.1  # between two looks while waiting
    end_margin_s: float = 5.0  # streamed after a burst, so that the window ending its event (2 s, starting <= 1 s
    # after the burst) is cut: the least --seconds that shows an event is the first burst's end plus this


@dataclass(frozen=True)
class Notification:
    """One notification the endpoint received: its idempotency key, title and attachment names."""

    key: str
    title: str
    attachments: tuple[str, ...]


class Webhook:
    """A local HTTP endpoint on 127.0.0.1 (a free port) for a `json://` sink: it keeps each notification it is
    POSTed (up to `max_kept`; later ones are counted as `dropped`), and refuses, counted as `rejected`, a body
    that is not one (400), of no stated length (411) or over `max_body_bytes` (413)."""

    def __init__(self, settings: DemoEventSettings):
        self.settings = settings
        self.received: list[Notification] = []
        self.rejected = self.dropped = 0
        self._lock = threading.Lock()
        webhook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.send_response(webhook.take(self.headers.get("Content-Length"), self.rfile))
                self.end_headers()

            def log_message(self, *args) -> None:
                pass  # the demo prints what arrives; request lines would only interleave with its table

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, name="demo-webhook", daemon=True).start()

    @property
    def url(self) -> str:
        """The sink URL that POSTs here (apprise's JSON webhook)."""
        return f"json://127.0.0.1:{self.server.server_port}/"

    def take(self, length: str | None, body) -> int:
        """Keep one POSTed notification; returns the HTTP status to answer."""
        size = int(length) if length and length.isdigit() else -1
        if not 0 <= size <= self.settings.max_body_bytes:
            with self._lock:
                self.rejected += 1
            return 411 if size < 0 else 413
        try:
            payload = json.loads(body.read(size))
            key = body_key(payload["message"])
            if not key:
                raise ValueError("the message does not end with its idempotency key")
            found = Notification(
                key,
                str(payload["title"]),
                tuple(str(a["filename"]) for a in payload.get("attachments") or ()),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            with self._lock:
                self.rejected += 1
            return 400
        with self._lock:
            if len(self.received) < self.settings.max_kept:
                self.received.append(found)
            else:
                self.dropped += 1
        return 200

    def since(self, start: int) -> list[Notification]:
        with self._lock:
            return self.received[start:]

    def keys(self) -> Counter:
        """How many times each idempotency key arrived (at least once delivery may repeat one)."""
        with self._lock:
            return Counter(n.key for n in self.received)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class DemoEvents:
    """The event part of one demo run: `start` (the example query), `show_new` (each loop of the live table),
    `finish` (after the drain, while Redis is still up), `report` (after the summary). A context manager: the
    endpoint closes on exit; the folder (the example clip, the saved evidence) stays."""

    def __init__(self, bursts: ChirpBursts, seconds: float, devices: int, settings: DemoEventSettings):
        self.bursts, self.seconds, self.devices, self.settings = bursts, seconds, devices, settings
        self.folder = Path(tempfile.mkdtemp(prefix="bindstream-demo-"))
        self.webhook = Webhook(settings)
        self.start_ns = 0  # the wearables' clock starts here (simulate's start_ns); set by `start`
        self.redis_url = ""
        self.client: redis.Redis | None = None
        self.query_id = ""
        self.last_id = "0-0"
        self.expected: set[str] = set()  # idempotency keys of the demo query's alerts entries
        self.shown = 0  # notifications printed
        self.skipped = 0  # alerts entries that did not decode
        self.events: list[Event] = []
        self.saved: tuple[Event, Path] | None = None

    def __enter__(self) -> DemoEvents:
        return self

    def __exit__(self, *exc) -> None:
        self.webhook.close()

    def _client(self) -> redis.Redis:
        if self.client is None:
            raise RuntimeError("DemoEvents.start was not called")
        return self.client

    def start(self, redis_url: str, model: str, checkpoint: str | None) -> None:
        """Write one burst as a WAV file and add it as an example query (`alert add --example`, its defaults);
        say what will happen and when."""
        self.redis_url, self.client = redis_url, connect(redis_url)
        self.last_id = now_id()
        self.start_ns = time.monotonic_ns()
        clip = self.folder / "chirp.wav"
        clip.write_bytes(pcm_wav(pcm16(self.bursts.clip(MIC_RATE)).tobytes(), MIC_RATE, 1))
        click.get_current_context().invoke(
            alert_add,
            text=self.settings.query_text,
            modality="audio",
            example=str(clip),
            redis_url=redis_url,
            model=model,
            checkpoint=checkpoint,
        )
        query = next(q for q in load_queries(self._client()) if q.source == f"example:{clip}")
        self.query_id = query.id
        console.print(
            ("[bold red]random weights[/] + an example query" if model == "tiny" else "an example query")
            + ": the event is found by similarity to the example clip, not by understanding",
            soft_wrap=True,
        )
        starts = self.bursts.starts(self.seconds)
        warmup_s = query.calibration.warmup + 2  # 2 s windows every 1 s: the warm-up's last one ends about then
        if starts:
            console.print(
                f"each wearable's mic plays a {self.bursts.seconds:g} s chirp burst at "
                f"{', '.join(f'{s:g}' for s in starts)} s of its stream ({clip}); the query learns each stream's "
                f"usual sound in its first ~{warmup_s} s",
                soft_wrap=True,
            )
        else:
            console.print(
                f"[yellow]the wearables stop at {self.seconds:g} s, before their first chirp burst at "
                f"{self.bursts.first_s:g} s (the query first learns each stream's usual sound for ~{warmup_s} s): "
                f"pass --seconds {self.bursts.first_s + self.bursts.seconds + self.settings.end_margin_s:g} or "
                "more to see events[/]",
                soft_wrap=True,
            )
        console.print(f"notifications: {self.webhook.url} (a local HTTP endpoint of this demo)", soft_wrap=True)

    def _stream_s(self, t_ns: int) -> str:
        return f"{(t_ns - self.start_ns) / NS_PER_S:.1f}"

    def show_new(self) -> None:
        """Print the alerts entries and the notifications that arrived since the last look."""
        client = self._client()
        for _, entries in client.xread({ALERTS_STREAM: self.last_id}, count=self.settings.read_count) or []:
            for entry_id, fields in entries:
                self.last_id = text(entry_id)
                try:
                    a = Alert.from_entry(entry_id, fields)
                except PARSE_ERRORS:
                    self.skipped += 1
                    continue
                if a.query == self.query_id:
                    self.expected.add(idempotency_key(a))
                console.print(
                    f"event {a.state:<6} {a.device}  {a.query_text!r}  score {a.score:.3f}  "
                    f"{self._stream_s(a.t0)}-{self._stream_s(a.t1)} s of its stream  event {a.event}",
                    soft_wrap=True,
                )
        for n in self.webhook.since(self.shown):
            self.shown += 1
            console.print(
                f"endpoint got: {n.title}" + (f" [{', '.join(n.attachments)}]" if n.attachments else ""),
                soft_wrap=True,
            )

    def _wait(self, done, seconds: float, stop: threading.Event) -> bool:
        """Whether `done()` came true within `seconds` (a Ctrl-C stops the wait)."""
        deadline = time.monotonic() + seconds
        while not done():
            if stop.is_set() or time.monotonic() >= deadline:
                return False
            time.sleep(self.settings.poll_s)
        return True

    def _delivered(self) -> bool:
        return self.expected <= set(self.webhook.keys())

    def finish(self, notify: NotifySettings, stop: threading.Event) -> None:
        """After the drain: deliver what the pipeline's notifier (stopped by the drain) left queued, with a
        notifier of the same settings here; list the query's events; save the first ended one's evidence once
        it reaches the event's end; remove the query (a Redis given with --redis keeps no demo query)."""
        client = self._client()
        self.show_new()
        if not self._delivered():
            notifier = Notifier(notify, self.redis_url)
            notifier.start()
            try:
                self._wait(self._delivered, self.settings.deliver_s, stop)
            finally:
                notifier.stop()
        self.show_new()
        self.events = sorted(
            list_events(client, query=self.query_id, limit=self.settings.max_events)[0], key=lambda e: e.start_ns
        )
        ended = [e for e in self.events if e.state == ENDED]
        if ended:
            self._wait(lambda: self._evidence_until(ended[0]) >= ended[0].end_ns, self.settings.evidence_s, stop)
            folder = self.folder / f"evidence-{ended[0].id}"
            console.print(f"$ bindstream event show {ended[0].id} --save {folder}", soft_wrap=True)
            click.get_current_context().invoke(
                event_show, event_ref=ended[0].id, redis_url=self.redis_url, save=str(folder), as_json=False
            )
            self.saved = (ended[0], folder)
        delete_query(client, self.query_id)

    def _evidence_until(self, event: Event) -> int:
        """The device time up to which the event's evidence holds audio (0: none yet)."""
        pcm, rate, channels, t0 = self._client().hmget(
            evidence_key(event.id), [AUDIO_PCM, AUDIO_RATE, AUDIO_CHANNELS, AUDIO_T0]
        )
        try:
            return int(t0) + len(pcm) // (2 * int(channels)) * NS_PER_S // int(rate)
        except (TypeError, ValueError, ZeroDivisionError):
            return 0

    def report(self) -> None:
        """The events of the demo query, the notifications the endpoint received for each, the saved evidence."""
        keys = self.webhook.keys()
        out = table(
            f"demo events: query {self.query_id} {self.settings.query_text!r}",
            ("event", "device", "stream s", "peak", "windows", "state", "notified"),
            right=("peak", "windows"),
            whole=("event",),
        )
        for e in self.events:
            updates = sum(1 for key in keys if key.startswith(notification_key(e.id, UPDATE)))
            notified = [START] if notification_key(e.id, START) in keys else []
            notified += [f"{updates} {UPDATE}"] if updates else []
            notified += [END] if notification_key(e.id, END) in keys else []
            out.add_row(
                e.id,
                e.device,
                f"{self._stream_s(e.start_ns)}-{self._stream_s(e.end_ns)}",
                f"{e.peak:.3f}",
                str(e.windows),
                e.state,
                ", ".join(notified) or "-",
            )
        console.print(out if self.events else "demo events: none")
        ended = sum(e.state == ENDED for e in self.events)
        bursts = len(self.bursts.starts(self.seconds)) * self.devices
        console.print(f"events: {len(self.events)} started, {ended} ended; chirp bursts played: {bursts}")
        states = Counter(key.split(":")[1] for key in keys if key.count(":") >= 1)
        complete = sum(
            notification_key(e.id, START) in keys and notification_key(e.id, END) in keys for e in self.events
        )
        console.print(
            f"the local endpoint {self.webhook.url} received {len(self.webhook.received)} notifications: "
            f"{states[START]} {START}, {states[UPDATE]} {UPDATE}, {states[END]} {END} "
            f"({len(self.webhook.received) - len(keys)} repeated, {self.webhook.rejected} refused, "
            f"{self.webhook.dropped} not kept); "
            f"{complete} of {len(self.events)} events have their start and end",
            soft_wrap=True,
        )
        if self.skipped:
            console.print(f"skipped {self.skipped} alerts entries that do not decode")
        if self.saved:
            event, folder = self.saved
            console.print(
                f"evidence of event {event.id} ({event.device}, {self._stream_s(event.start_ns)}-"
                f"{self._stream_s(event.end_ns)} s of its stream) saved to {folder}; with a Redis that outlives "
                f"the demo (--redis URL), `bindstream event show {event.id} --save DIR` saves it again",
                soft_wrap=True,
            )
        else:
            console.print("no event ended: no evidence saved")
