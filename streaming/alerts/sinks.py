"""Notification sinks: where an alert is delivered. Any Apprise URL (ntfy, Pushover, Telegram, mailto, json://
and jsons:// webhooks, ...) through the apprise library, and `mqtt://` / `mqtts://` through paho-mqtt, with Home
Assistant discovery (apprise's own MQTT plugin is not used: it knows neither the topics nor the discovery).

`parse_sink(url)` checks a URL without any network traffic (`alert add --notify` and the notifier's settings
call it). A sink's `send` delivers one alert or raises SendError (try again later) or Unsendable (no retry can
help). Delivery is at least once: every notification carries its idempotency key (`idempotency_key`; a
receiver that expects one computes it with `notification_key`, and `body_key` finds it in an Apprise body),
so a receiver that must not act twice drops a key it has seen.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
import time
import wave
from dataclasses import asdict
from datetime import datetime
from typing import Protocol
from urllib.parse import unquote, urlsplit

import apprise
import paho.mqtt.client as mqtt
import redis
from apprise.attachment.memory import AttachMemory

from ..records import text
from ..redis_access import redact_url
from ..redis_layout import (
    AUDIO_CHANNELS,
    AUDIO_PCM,
    AUDIO_RATE,
    END,
    FRAME_EXTENSIONS,
    HEALTH_EVENT,
    START,
    UPDATE,
    Alert,
    evidence_key,
    parse_frame_field,
    pcm_wav,
)

SEND_TIMEOUT_S = 10.0  # one send: connecting and the answer (apprise's cto/rto; MQTT's CONNACK and PUBACKs)
ATTACH_MAX_BYTES = 2_500_000  # evidence attached to one notification, in all: push services cap attachments
MQTT_PORTS = {"mqtt": 1883, "mqtts": 8883}
MQTT_PREFIX = "bindstream"  # topic prefix of an MQTT URL without a path
MQTT_KEEPALIVE_S = 60  # paho's default: pings keep an idle connection known to be alive
HA_DISCOVERY_PREFIX = "homeassistant"  # Home Assistant's default discovery prefix
STATE_WORDS = {START: "started", UPDATE: "new peak", END: "ended"}
DEVICE_CLASSES = {"audio": "sound"}  # Home Assistant binary_sensor class of a query's modality (health: PROBLEM)
PROBLEM = "problem"
ON, OFF = "ON", "OFF"
JPEG = FRAME_EXTENSIONS["jpeg"]  # the extension of an evidence frame stored as the JPEG the device sent
KEY_LINE = "\nkey: "  # an Apprise body ends with this and its idempotency key


class _AppriseReasons(logging.Filter):
    """While this thread parses an Apprise URL, keeps apprise's log records (why the URL does not parse) for
    parse_sink's one-line error, instead of letting them through as lines of their own."""

    local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        reasons = getattr(self.local, "reasons", None)
        if reasons is None:
            return True
        if record.levelno >= logging.WARNING:
            reasons.append(record.getMessage())
        return False


_APPRISE_REASONS = _AppriseReasons()
logging.getLogger("apprise").addFilter(_APPRISE_REASONS)  # the one logger all of apprise logs to


class SinkError(ValueError):
    """A URL that names no sink this notifier can send to."""


class SendError(RuntimeError):
    """A send that failed for now (the sink is down, slow or refused): the alert stays queued."""


class Unsendable(ValueError):
    """An alert this sink can never take (e.g. a device id that is no MQTT topic level): dropped, counted."""


class Sink(Protocol):
    """One URL's way of delivering an alert; used by one sender thread at a time."""

    url: str
    label: str  # the URL without its secrets, for tables and logs

    def send(self, alert: Alert, client: redis.Redis) -> list[str]:
        """Deliver `alert`; returns the evidence left out (`attach_too_big`, `attach_malformed`)."""
        ...

    def close(self) -> None: ...


def parse_sink(url: str, timeout_s: float = SEND_TIMEOUT_S, attach_max_bytes: int = ATTACH_MAX_BYTES) -> Sink:
    """The sink `url` names (MQTT for mqtt:// and mqtts://, Apprise for any other scheme); SinkError in one
    line if none. Opens no connection."""
    if not isinstance(url, str) or not url.strip():
        raise SinkError(f"{url!r} is not a URL")
    if url.partition("://")[0].lower() in MQTT_PORTS:
        return MqttSink(url, timeout_s)
    return AppriseSink(url, timeout_s, attach_max_bytes)


def sink_label(url: str) -> str:
    """A sink URL as tables and pages show it: without its secrets."""
    try:
        return parse_sink(url).label
    except SinkError:
        return "(not a sink URL)"


def notification_key(event: str, state: str, source_id: str = "") -> str:
    """The idempotency key of `event`'s change to `state`: `{event}:{state}`, an update's also with its window's
    entry id `source_id` (an event has one start, one end, and an update per new peak)."""
    return f"{event}:{state}:{source_id}" if state == UPDATE else f"{event}:{state}"


def idempotency_key(a: Alert) -> str:
    """The key of alerts entry `a`: `notification_key` of its event's change; an entry written before events
    existed: `alert:{its entry id}`."""
    if not a.event:
        return f"alert:{a.id}"
    return notification_key(a.event, a.state, a.source_id)


def body_key(message: str) -> str:
    """The idempotency key on the last line of `message` (a `body`); '' where it has none."""
    _, line, key = message.rpartition(KEY_LINE)
    return key if line else ""


# ----- Apprise -------------------------------------------------------------------------------------------


def title(a: Alert) -> str:
    state = "" if a.state == START else f" ({STATE_WORDS.get(a.state, a.state)})"
    return f"bindstream: {a.query_text} on {a.device}{state}"


def body(a: Alert) -> str:
    """What happened, on which device, when (device clock and wall clock), how strongly, and how to get the
    evidence; the last line is the idempotency key."""
    detected = datetime.fromtimestamp(a.detected_ns / 1e9).astimezone().isoformat(timespec="seconds")
    lines = [
        f"{STATE_WORDS.get(a.state, a.state)}: {a.query_text} ({a.modality}) on {a.device}",
        f"{'peak score' if a.state == END else 'score'} {a.score:.3f}, threshold {a.threshold:.3f}",
        f"device time {a.t0 / 1e9:.3f} - {a.t1 / 1e9:.3f} s",
        f"detected {detected}",
    ]
    if a.event:
        lines.append(f"evidence: bindstream event show {a.event} --save DIR")
    return "\n".join(lines) + KEY_LINE + idempotency_key(a)


def evidence_attachments(client: redis.Redis, event: str, max_bytes: int) -> tuple[list[AttachMemory], list[str]]:
    """(the WAV of the event's evidence audio and its first JPEG frame by device time, those that exist and
    fit in `max_bytes` together; the reasons of those left out: `attach_too_big`, `attach_malformed`)."""
    key = evidence_key(event)
    found: list[tuple[str, bytes, str]] = []  # (name, content, mime type)
    left_out = []
    pcm, rate, channels = client.hmget(key, [AUDIO_PCM, AUDIO_RATE, AUDIO_CHANNELS])
    if pcm:
        try:
            if len(pcm) % (2 * int(channels)):
                raise ValueError(f"{len(pcm)} bytes are no whole number of int16 frames of {int(channels)} channels")
            found.append((f"{event}.wav", pcm_wav(pcm, int(rate), int(channels)), "audio/x-wav"))
        except (TypeError, ValueError, wave.Error, ZeroDivisionError):
            left_out.append("attach_malformed")
    jpegs = sorted(
        (frame[1], text(name)) for name in client.hkeys(key) if (frame := parse_frame_field(name)) and frame[2] == JPEG
    )
    if jpegs:
        name = jpegs[0][1]
        found.append((name.replace(":", "_"), client.hget(key, name) or b"", "image/jpeg"))
    out, size = [], 0
    for name, content, mime in found:
        if size + len(content) > max_bytes:
            left_out.append("attach_too_big")
            continue
        size += len(content)
        out.append(AttachMemory(content, name=name, mimetype=mime))
    return out, left_out


class AppriseSink:
    """Any Apprise URL: a title naming the query and the device, `body`, and the event's evidence attached
    when its hash exists (services without attachments get the text only)."""

    def __init__(self, url: str, timeout_s: float, attach_max_bytes: int):
        self.url = url
        self.attach_max_bytes = attach_max_bytes
        reasons: list[str] = []
        _APPRISE_REASONS.local.reasons = reasons
        try:
            plugin = apprise.Apprise.instantiate(url)
        finally:
            _APPRISE_REASONS.local.reasons = None
        if plugin is None:
            raise SinkError(
                f"{redact_url(url)} is neither a notification URL that apprise takes "
                f"({'; '.join(reasons) or 'see https://github.com/caronc/apprise/wiki'}) "
                "nor mqtt[s]://[user:password@]host[:port][/prefix]"
            )
        plugin.socket_connect_timeout = plugin.socket_read_timeout = timeout_s
        self.plugin = plugin
        self.label = plugin.url(privacy=True).split("?")[0]

    def send(self, alert: Alert, client: redis.Redis) -> list[str]:
        attach, left_out = evidence_attachments(client, alert.event, self.attach_max_bytes) if alert.event else ([], [])
        if not self.plugin.notify(
            body=body(alert), title=title(alert), attach=apprise.AppriseAttachment(attach) if attach else None
        ):
            raise SendError(f"{self.label} did not take the notification (apprise's log says why)")
        return left_out

    def close(self) -> None:
        pass


# ----- MQTT ----------------------------------------------------------------------------------------------


def ha_object_id(device: str, query: str) -> str:
    """Home Assistant's object id of a (device, query) sensor: only [A-Za-z0-9_-] is allowed there."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"bindstream_{device}_{query}")


class MqttSink:
    """`mqtt[s]://[user[:password]@]host[:port][/prefix]` (prefix default `bindstream`). Per alert: the JSON
    of the alert (and its `key`) on `{prefix}/{device}/{query}/event`, then ON (start, update) or OFF (end)
    retained on `{prefix}/{device}/{query}/state`, both QoS 1; before the first of each (device, query) on
    a connection, Home Assistant's discovery config, retained, so that it appears as a binary sensor. A send
    succeeds once the broker has acknowledged every message (PUBACK) within the timeout; otherwise the
    connection is dropped with what it had not sent, so a retry does not add to it."""

    def __init__(self, url: str, timeout_s: float):
        self.url = url
        self.timeout_s = timeout_s
        try:
            parts = urlsplit(url)
            self.port = parts.port or MQTT_PORTS[parts.scheme.lower()]
        except ValueError as err:
            raise SinkError(f"{redact_url(url)}: {err}") from err
        if not parts.hostname or parts.query or parts.fragment:
            raise SinkError(f"{redact_url(url)}: expected {parts.scheme}://[user[:password]@]host[:port][/prefix]")
        self.host = parts.hostname
        self.tls = parts.scheme.lower() == "mqtts"
        self.username = unquote(parts.username) if parts.username is not None else None
        self.password = unquote(parts.password) if parts.password is not None else None
        self.prefix = unquote(parts.path).strip("/") or MQTT_PREFIX
        if not topic_levels_ok(self.prefix.split("/")):
            raise SinkError(f"{redact_url(url)}: the topic prefix {self.prefix!r} has an empty level, + or #")
        self.label = redact_url(url)
        self.client: mqtt.Client | None = None
        self.announced: set[tuple[str, str]] = set()  # (device, query) whose discovery config this connection sent

    def send(self, alert: Alert, client: redis.Redis) -> list[str]:
        if not topic_levels_ok([alert.device, alert.query]):
            raise Unsendable(f"device {alert.device!r} or query {alert.query!r} is no MQTT topic level")
        base = f"{self.prefix}/{alert.device}/{alert.query}"
        messages = []
        if (alert.device, alert.query) not in self.announced:
            messages.append((self.discovery_topic(alert), json.dumps(self.discovery(alert, base)), True))
        messages.append((f"{base}/event", json.dumps({**asdict(alert), "key": idempotency_key(alert)}), False))
        messages.append((f"{base}/state", OFF if alert.state == END else ON, True))
        mq = self._connected()
        deadline = time.monotonic() + self.timeout_s
        try:
            infos = [mq.publish(topic, payload, qos=1, retain=retain) for topic, payload, retain in messages]
            for info in infos:
                info.wait_for_publish(max(deadline - time.monotonic(), 0.0))
        except (ValueError, RuntimeError) as err:
            self.close()
            raise SendError(f"{self.label}: {err}") from err
        if not all(info.is_published() for info in infos):
            self.close()
            raise SendError(f"{self.label}: the broker did not acknowledge within {self.timeout_s:g} s")
        self.announced.add((alert.device, alert.query))
        return []

    @staticmethod
    def discovery_topic(alert: Alert) -> str:
        return f"{HA_DISCOVERY_PREFIX}/binary_sensor/{ha_object_id(alert.device, alert.query)}/config"

    @staticmethod
    def discovery(alert: Alert, base: str) -> dict:
        """Home Assistant's MQTT discovery config of the (device, query) binary sensor; the event's JSON
        gives it its attributes (score, times, key)."""
        config = {
            "name": alert.query_text,
            "unique_id": ha_object_id(alert.device, alert.query),
            "state_topic": f"{base}/state",
            "json_attributes_topic": f"{base}/event",
            "payload_on": ON,
            "payload_off": OFF,
            "device": {"identifiers": [f"bindstream_{alert.device}"], "name": alert.device},
        }
        device_class = PROBLEM if alert.kind == HEALTH_EVENT else DEVICE_CLASSES.get(alert.modality)
        return {**config, "device_class": device_class} if device_class else config

    def _connected(self) -> mqtt.Client:
        """The connection, opened first if there is none (or it broke); SendError if the broker cannot be
        reached or refuses within the timeout."""
        if self.client is not None and self.client.is_connected():
            return self.client
        self.close()
        mq = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bindstream-{secrets.token_hex(6)}")
        if self.username is not None:
            mq.username_pw_set(self.username, self.password)
        answered, refused = threading.Event(), []

        def on_connect(_client, _userdata, _flags, reason, _properties) -> None:
            if reason.is_failure:
                refused.append(str(reason))
            answered.set()

        mq.on_connect = on_connect
        mq.connect_timeout = self.timeout_s
        try:
            if self.tls:
                mq.tls_set()
            mq.connect(self.host, self.port, keepalive=MQTT_KEEPALIVE_S)
        except (OSError, ValueError) as err:  # refused, unreachable, TLS (ssl.SSLError is an OSError)
            raise SendError(f"{self.label}: cannot connect: {err}") from err
        self.client = mq
        mq.loop_start()
        if not answered.wait(self.timeout_s) or refused:
            self.close()
            raise SendError(f"{self.label}: the broker {'refused: ' + refused[0] if refused else 'did not answer'}")
        return mq

    def close(self) -> None:
        """Drop the connection and what it had not sent."""
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None
        self.announced.clear()


def topic_levels_ok(levels: list[str]) -> bool:
    """Whether each of `levels` is one non-empty MQTT topic level without wildcards."""
    return all(level and not set(level) & set("/+#") for level in levels)
