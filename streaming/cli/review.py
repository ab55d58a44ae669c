"""Reviewing events (ALERTS.md, "Review"): `bindstream event list` (newest first, filtered), `event show` (one
record and a summary of its evidence; --save writes the evidence as files), and a person's verdict, `event ack`
and `event false-positive`, which `alert tune --from-reviews` fits on. An event is named by its id or the start
of exactly one id; one that names none, or several, is one line and exit status 1."""

from __future__ import annotations

import json
import wave
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import click
import redis

from sensors.protocol import NS_PER_S
from streaming.alerts.events import DEFAULT_LIMIT, HEX, NoEvent, find_event_id, list_events, load_event, set_review
from streaming.alerts.queries import find_query_id
from streaming.alerts.records import ID_BYTES, QueryError
from streaming.alerts.sinks import sink_label
from streaming.records import FRAME_SENSORS, text
from streaming.redis_layout import (
    AUDIO_CHANNELS,
    AUDIO_PCM,
    AUDIO_RATE,
    CONFIRMED,
    FALSE_POSITIVE,
    FRAME_EXTENSIONS,
    HEALTH_EVENT,
    HEALTH_QUERY,
    IMU_CSV,
    MISSING,
    NPY,
    OPEN,
    QUERY_EVENT,
    BadRecord,
    Event,
    evidence_key,
    evidence_wav,
    parse_frame_field,
)

from .options import JSON_OPTION, Duration, connect, redis_option
from .terminal import console, table

FRAME_FILE_EXTENSIONS = frozenset([*FRAME_EXTENSIONS.values(), NPY])  # a frame field's extension, or it is refused
EVENT_JSON, AUDIO_WAV = "event.json", "audio.wav"  # --save's file names besides the frames and imu.csv


@click.group("event")
def event() -> None:
    """Events (a query fired, or a sensor fell silent): list them, show one with its evidence, review them."""


def find_event(client: redis.Redis, ref: str) -> Event:
    """The event `ref` names (its id or the start of one), or one line saying why none."""
    try:
        return load_event(client, find_event_id(client, ref))
    except (NoEvent, BadRecord) as err:
        raise click.ClickException(str(err)) from None


def wall_time(ns: int) -> str:
    return datetime.fromtimestamp(ns / NS_PER_S).strftime("%Y-%m-%d %H:%M:%S")


def event_json(e: Event) -> dict:
    """A record as JSON shows it: every field, the sink URLs without their secrets."""
    return asdict(e) | {"notify": [sink_label(url) for url in e.notify]}


def peak_text(e: Event) -> str:
    """A query event's peak score; a health event's silence in seconds."""
    return f"{e.peak:.1f} s silent" if e.kind == HEALTH_EVENT else f"{e.peak:.3f}"


def duration_text(e: Event) -> str:
    """Device time from the event's start to its end; '+' while it is open (so far)."""
    return f"{(e.end_ns - e.start_ns) / NS_PER_S:.1f} s" + ("+" if e.state == OPEN else "")


def query_id_of(client: redis.Redis, ref: str) -> str:
    """The query id `ref` names: an active query's id, the start of one, or its text (find_query_id); else
    `health`, or a whole query id (the events of a removed query); else one line saying why none."""
    try:
        return find_query_id(client, ref)
    except QueryError as err:
        if ref == HEALTH_QUERY or (len(ref) == 2 * ID_BYTES and set(ref) <= HEX):
            return ref
        raise click.ClickException(str(err)) from None


@event.command("list")
@redis_option()
@click.option("--device", default=None, help="Device id or glob.")
@click.option(
    "--query",
    "query_ref",
    default=None,
    help="Query id, the start of an active query's id, or its text; 'health': the health events.",
)
@click.option(
    "--since",
    type=Duration(),
    default=None,
    help="Only the events started in this last while (30s, 10m, 2h, 1d); default or 0: every event kept.",
)
@click.option("--kind", type=click.Choice((QUERY_EVENT, HEALTH_EVENT)), default=None, help="Only events of this kind.")
@click.option("--limit", type=click.IntRange(1), default=DEFAULT_LIMIT, help="Events shown, newest first.")
@JSON_OPTION
def event_list(redis_url, device, query_ref, since, kind, limit, as_json):
    """The events, newest first: state, device, query, start, duration, peak, review, evidence."""
    client = connect(redis_url)
    query = None if query_ref is None else query_id_of(client, query_ref)
    events, skipped = list_events(client, device=device, query=query, since_ms=since or None, limit=limit, kind=kind)
    pipe = client.pipeline(transaction=False)
    for e in events:
        pipe.exists(evidence_key(e.id))
    evidence = [bool(n) for n in pipe.execute()]
    if as_json:
        click.echo(json.dumps([event_json(e) | {"evidence": has} for e, has in zip(events, evidence)], indent=2))
    else:
        columns = (
            "id",
            "state",
            "device",
            "query",
            "modality",
            "start",
            "device s",
            "duration",
            "peak",
            "windows",
            "review",
            "evidence",
        )
        out = table("bindstream events", columns, right=("device s", "duration", "peak", "windows"), whole=("id",))
        for e, has in zip(events, evidence):
            out.add_row(
                e.id,
                e.state,
                e.device,
                e.query_text,
                e.modality,
                wall_time(e.detected_ns),
                f"{e.start_ns / NS_PER_S:.1f}",
                duration_text(e),
                peak_text(e),
                str(e.windows),
                e.review,
                "yes" if has else "no",
            )
        console.print(out if events else "no events")
    if skipped:
        click.echo(f"skipped {skipped} event record(s) that do not decode", err=True)


@dataclass
class Evidence:
    """An evidence hash (ALERTS.md, "Evidence") as the files `event show --save` writes: `audio.wav` (16-bit PCM),
    `frame-{sensor}-{t_ns}.{ext}`, `imu.csv`; a field that does not decode is left out and named in `malformed`
    (a frame field names a file: only known sensors and extensions pass)."""

    files: dict[str, bytes] = field(default_factory=dict)
    audio_s: float | None = None  # seconds of audio; None: none stored
    audio_rate: int = 0
    audio_channels: int = 0
    frames: dict[str, int] = field(default_factory=dict)  # frames per sensor
    imu_rows: int = 0
    missing: list[str] = field(default_factory=list)  # kinds of which some data was no longer buffered
    malformed: list[str] = field(default_factory=list)  # fields left out, each with why

    @classmethod
    def decode(cls, raw: dict) -> Evidence:
        f = {text(k): v for k, v in raw.items()}
        out = cls(missing=[kind for kind in text(f.get(MISSING, b"")).split(",") if kind])
        if AUDIO_PCM in f:
            try:
                rate, channels = int(f[AUDIO_RATE]), int(f[AUDIO_CHANNELS])
                out.files[AUDIO_WAV], out.audio_s = evidence_wav(f[AUDIO_PCM], rate, channels)
                out.audio_rate, out.audio_channels = rate, channels
            except (KeyError, ValueError, wave.Error) as err:
                out.malformed.append(f"{AUDIO_PCM}: {err}")
        if IMU_CSV in f:
            out.files[IMU_CSV] = f[IMU_CSV]
            out.imu_rows = max(len(f[IMU_CSV].splitlines()) - 1, 0)  # the first line is the header
        for name, value in f.items():
            frame = parse_frame_field(name)
            if frame is None:
                continue
            sensor, t_ns, ext = frame
            if sensor not in FRAME_SENSORS or ext not in FRAME_FILE_EXTENSIONS:
                out.malformed.append(f"{name}: not a frame of a known sensor and format")
                continue
            out.files[f"frame-{sensor}-{t_ns}.{ext}"] = value
            out.frames[sensor] = out.frames.get(sensor, 0) + 1
        return out

    def summary(self) -> str:
        audio = (
            f"audio {self.audio_s:.2f} s ({self.audio_rate} Hz, {self.audio_channels} ch)"
            if self.audio_s is not None
            else "no audio"
        )
        frames = ", ".join(f"{sensor} {n}" for sensor, n in sorted(self.frames.items())) or "none"
        return (
            f"{audio}; frames: {frames}; IMU rows: {self.imu_rows}; missing: {', '.join(self.missing) or 'nothing'}"
            + "".join(f"; malformed {why}" for why in self.malformed)
        )

    def as_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "files"} | {"files": sorted(self.files)}


@event.command("show")
@click.argument("event_ref", metavar="ID")
@redis_option()
@click.option(
    "--save",
    type=click.Path(file_okay=False),
    default=None,
    help="Write event.json and the evidence (audio.wav, frame-*, imu.csv) into this folder (made if missing).",
)
@JSON_OPTION
def event_show(event_ref, redis_url, save, as_json):
    """One event (ID: its id or the start of one): its record and a summary of its evidence."""
    client = connect(redis_url)
    e = find_event(client, event_ref)
    raw = client.hgetall(evidence_key(e.id))
    evidence = Evidence.decode(raw) if raw else None
    if as_json:
        click.echo(json.dumps({"event": event_json(e), "evidence": evidence.as_json() if evidence else None}, indent=2))
    else:
        out = table(f"event {e.id}", ("field", "value"), whole=("field",))
        subject = f"{e.query_text!r} (query {e.query})" if e.kind == QUERY_EVENT else e.query_text
        rows = [
            ("kind, state", f"{e.kind}, {e.state}"),
            ("query", f"{subject}, {e.modality}, model {e.model}"),
            ("device", f"{e.device}, stream {e.source}"),
            ("detected", wall_time(e.detected_ns) + (f", ended {wall_time(e.ended_ns)}" if e.ended_ns else "")),
            ("device time", f"{e.start_ns / NS_PER_S:.3f} s to {e.end_ns / NS_PER_S:.3f} s ({duration_text(e)})"),
            ("peak", f"{peak_text(e)} at entry {e.peak_source_id}; {e.windows} window(s) at or above threshold"),
            ("review", e.review + (f" ({wall_time(e.reviewed_ns)})" if e.reviewed_ns else "")),
            ("notify", ", ".join(map(sink_label, e.notify)) or "-"),
        ]
        for name, value in rows:
            out.add_row(name, value)
        console.print(out)
        click.echo(
            f"evidence: {evidence.summary()}"
            if evidence
            else f"no evidence stored for event {e.id} (none written, or expired)"
        )
    if save:
        folder = Path(save)
        folder.mkdir(parents=True, exist_ok=True)
        files = {EVENT_JSON: json.dumps(event_json(e), indent=2).encode(), **(evidence.files if evidence else {})}
        for name, content in files.items():
            (folder / name).write_bytes(content)
        click.echo(f"saved {len(files)} file(s) to {folder}", err=as_json)


def review_command(name: str, verdict: str, summary: str):
    """`event NAME ID`: record `verdict` on the event."""

    @event.command(name, short_help=summary, help=f"{summary} ID: its id or the start of one; its review: {verdict}.")
    @click.argument("event_ref", metavar="ID")
    @redis_option()
    def command(event_ref, redis_url):
        client = connect(redis_url)
        try:
            e = set_review(client, find_event(client, event_ref).id, verdict)
        except NoEvent as err:  # expired since it was found
            raise click.ClickException(str(err)) from None
        click.echo(f"event {e.id} ({e.query_text!r} on {e.device}): {e.review}")

    return command


event_ack = review_command("ack", CONFIRMED, "Confirm an event: it was real.")
event_false_positive = review_command("false-positive", FALSE_POSITIVE, "Mark an event as a false positive.")
