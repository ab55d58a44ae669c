"""The notifier against real processes: a real redis-server, a real MQTT broker (mosquitto), a local HTTP server
that receives apprise's json:// posts, and, for the actor restart, a real local Ray.

Alerts are written as the matcher writes them (XADD and PUBLISH of `Alert.fields()`, as its EMIT_ALERT); their
model is `tiny` (random weights: nothing here embeds anything). Deliveries are counted by idempotency key.
"""

import base64
import io
import json
import threading
import wave
from collections import Counter
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import redis
from click.testing import CliRunner

from streaming.alerts.notify import Notifier, NotifySettings, start_notifier
from streaming.alerts.queries import load_query, save_background, save_query
from streaming.alerts.records import Background, Query
from streaming.alerts.sinks import SinkError, Unsendable, evidence_attachments, idempotency_key, parse_sink
from streaming.cli.alerts import alert, notify_command
from streaming.cli.terminal import console
from streaming.pipeline import ConfigError, PipelineConfig
from streaming.redis_layout import (
    ALERTS_CHANNEL,
    ALERTS_STREAM,
    AUDIO_CHANNELS,
    AUDIO_PCM,
    AUDIO_RATE,
    END,
    HEALTH_EVENT,
    HEALTH_QUERY,
    NOTIFY_FIELD,
    QUERY_SET,
    SINKS,
    START,
    UPDATE,
    Alert,
    event_key,
    evidence_key,
    frame_field,
    outbox_key,
    query_key,
    sink_id,
    stream_key,
)
from streaming.stage import Counts

from .conftest import wait_for

MODEL = "tiny"  # random weights: only a name on the alerts here
DIM = 64
SECOND = 1_000_000_000
WAIT_S = 30.0  # bound on every wait for a delivery
FAST = dict(start_id="0", block_ms=20, retry_max_s=0.2, send_timeout_s=5.0)  # retries quickly in tests


@pytest.fixture
def client(redis_server):
    c = redis.Redis.from_url(redis_server.url)
    c.flushdb()
    return c


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Tables one line per row (CliRunner's terminal is 80 columns wide)."""
    monkeypatch.setattr(console, "width", 250)


class Receiver:
    """A local HTTP server on 127.0.0.1 recording the JSON of every POST (apprise's json:// sink). `stop()`, then
    `start()` again on the same port: an outage."""

    def __init__(self):
        self.posts: list[dict] = []
        self.port = 0
        self.server: ThreadingHTTPServer | None = None
        self.start()

    def start(self) -> None:
        posts = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    @property
    def url(self) -> str:
        return f"json://127.0.0.1:{self.port}/"

    def keys(self) -> list[str]:
        """The idempotency key of each post, in arrival order (the body's last line)."""
        return [post["message"].rsplit("\nkey: ", 1)[1] for post in self.posts]


@pytest.fixture
def http():
    receiver = Receiver()
    yield receiver
    receiver.stop()


class Subscriber:
    """A paho MQTT client subscribed to every topic of the broker, recording (topic, payload, retained)."""

    def __init__(self, url: str):
        self.messages: list[tuple[str, str, bool]] = []
        subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_message = lambda _c, _u, m: self.messages.append((m.topic, m.payload.decode(), m.retain))
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_connect = lambda c, *_: c.subscribe("#", qos=1)
        host, port = url.removeprefix("mqtt://").split(":")
        self.client.connect(host, int(port))
        self.client.loop_start()
        assert subscribed.wait(WAIT_S), "no SUBACK from mosquitto"

    def on(self, suffix: str) -> list[tuple[str, str, bool]]:
        return [m for m in self.messages if m[0].endswith(suffix)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def vector() -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[0] = 1
    return v


def add_query(client, text="a baby crying", notify=()) -> Query:
    return save_query(client, Query(text, "audio", vector(), MODEL, notify=tuple(notify)))


def make_alert(q: Query | None, event: str, state: str, device="glasses-1", entry="1-0", t_s=10) -> Alert:
    """An alerts entry of `q`'s event (None: a health event of the device's microphone)."""
    return Alert(
        device,
        q.id if q else HEALTH_QUERY,
        q.text if q else "microphone silent",
        "audio",
        0.9,
        q.decision.threshold if q else 0.0,
        t_s * SECOND,
        (t_s + 2) * SECOND,
        stream_key(device, "audio"),
        entry,
        MODEL,
        1_700_000_000 * SECOND,
        state=state,
        event=event,
        kind=HEALTH_EVENT if q is None else "query",
    )


def emit(client, a: Alert) -> str:
    """Write `a` as the matcher's EMIT_ALERT does: XADD its fields to the alerts stream, PUBLISH them with the id."""
    entry_id = client.xadd(ALERTS_STREAM, a.fields(), maxlen=100_000).decode()
    client.publish(ALERTS_CHANNEL, json.dumps({**a.fields(), "id": entry_id}))
    return entry_id


def counts(n: Notifier, event: str, label: str | None = None) -> int:
    return Counts.of(n.stats()).get(event, label)


# ----- delivery ------------------------------------------------------------------------------------------


def test_start_and_end_reach_each_sink_once_and_home_assistant_sees_a_sensor(client, redis_server, http, mosquitto):
    """The query's own sink (HTTP) and the global one (MQTT) each get the event's start and end once; the health
    event goes to the global sink only; Home Assistant's discovery configs and the states stay retained."""
    q = add_query(client, notify=[http.url])
    watcher = Subscriber(mosquitto)
    n = Notifier(NotifySettings(urls=(mosquitto,), **FAST), redis_server.url)
    n.start()
    try:
        emit(client, make_alert(q, "ev1", START, entry="1-0"))
        emit(client, make_alert(q, "ev1", END, entry="2-0"))
        emit(client, make_alert(None, "ev2", START, entry="3-0"))
        wait_for(lambda: len(http.posts) >= 2, WAIT_S, "two posts")
        wait_for(lambda: len(watcher.on("/event")) >= 3, WAIT_S, "three MQTT events")
        wait_for(lambda: counts(n, "sent") == 5, WAIT_S, "five notifications sent")
    finally:
        final = n.stop()
        watcher.close()
    assert Counter(http.keys()) == {"ev1:start": 1, "ev1:end": 1}
    assert Counts.of(final).get("queued", sink_id(http.url)) == 2  # the health event never went there
    first = http.posts[0]
    assert first["title"] == "bindstream: a baby crying on glasses-1"
    assert "score 0.900" in first["message"] and "device time 10.000 - 12.000 s" in first["message"]
    assert "bindstream event show ev1 --save DIR" in first["message"]
    assert http.posts[1]["title"].endswith("(ended)") and not first.get("attachments")

    events = [json.loads(payload) for _, payload, _ in watcher.on("/event")]
    assert Counter(e["key"] for e in events) == {"ev1:start": 1, "ev1:end": 1, "ev2:start": 1}
    assert {e["device"] for e in events} == {"glasses-1"} and events[0]["score"] == 0.9
    base = f"bindstream/glasses-1/{q.id}"
    assert [(t, p) for t, p, _ in watcher.on("/state") if t.startswith(base)] == [
        (f"{base}/state", "ON"),
        (f"{base}/state", "OFF"),
    ]

    later = Subscriber(mosquitto)  # a Home Assistant that starts now gets the retained messages
    try:
        wait_for(lambda: len(later.on("/config")) == 2 and len(later.on("/state")) == 2, WAIT_S, "retained messages")
    finally:
        later.close()
    retained = {t: p for t, p, r in later.messages if r}
    config = json.loads(retained[f"homeassistant/binary_sensor/bindstream_glasses-1_{q.id}/config"])
    assert config["name"] == "a baby crying" and config["device_class"] == "sound"
    assert config["state_topic"] == f"{base}/state" and (config["payload_on"], config["payload_off"]) == ("ON", "OFF")
    assert config["device"] == {"identifiers": ["bindstream_glasses-1"], "name": "glasses-1"}
    health = json.loads(retained["homeassistant/binary_sensor/bindstream_glasses-1_health/config"])
    assert health["device_class"] == "problem" and retained["bindstream/glasses-1/health/state"] == "ON"
    assert retained[f"{base}/state"] == "OFF"


def test_a_sink_outage_loses_nothing_doubles_nothing_and_holds_up_no_other_sink(client, redis_server, http, mosquitto):
    """With the HTTP sink down, the MQTT sink gets every notification meanwhile; once the HTTP server is back on
    its port, it gets each one exactly once, in order."""
    q = add_query(client)
    watcher = Subscriber(mosquitto)
    n = Notifier(NotifySettings(urls=(http.url, mosquitto), **FAST), redis_server.url)
    n.start()
    http.stop()
    try:
        keys = []
        for i in range(3):
            for j, state in enumerate((START, UPDATE, END)):
                a = make_alert(q, f"ev{i}", state, entry=f"{10 * i + j + 1}-0", t_s=10 * i)
                emit(client, a)
                keys.append(idempotency_key(a))
        wait_for(lambda: len(watcher.on("/event")) == 9, WAIT_S, "MQTT to get every notification meanwhile")
        wait_for(lambda: counts(n, "send_error", sink_id(http.url)) >= 2, WAIT_S, "failed tries at the HTTP sink")
        assert client.xlen(outbox_key(sink_id(http.url))) == 9 and http.posts == []
        assert sink_id(http.url) in n.stats()["failing"]
        http.start()
        wait_for(lambda: client.xlen(outbox_key(sink_id(http.url))) == 0, WAIT_S, "the HTTP outbox to drain")
    finally:
        final = n.stop()
        watcher.close()
    assert http.keys() == keys  # each once, in order
    assert [json.loads(p)["key"] for _, p, _ in watcher.on("/event")] == keys
    assert Counts.of(final).get("sent", sink_id(http.url)) == 9 and final["failing"] == []


def test_evidence_is_attached_when_it_exists(client, redis_server, http):
    """An event with an evidence hash gets its audio as a WAV and its first JPEG frame (by device time); one
    without gets the text only; attachments beyond the bound are left out, counted."""
    q = add_query(client, notify=[http.url])
    pcm = (np.arange(1600, dtype="<i2") % 200).tobytes()  # 800 stereo frames
    first, later = b"\xff\xd8 the first frame", b"\xff\xd8 a later frame"
    client.hset(
        evidence_key("ev1"),
        mapping={
            AUDIO_PCM: pcm,
            AUDIO_RATE: 8000,
            AUDIO_CHANNELS: 2,
            frame_field("camera", 2 * SECOND, "jpeg"): later,
            frame_field("camera", 1 * SECOND, "jpeg"): first,
            frame_field("depth", 0, None): b"npy bytes",
        },
    )
    n = Notifier(NotifySettings(**FAST), redis_server.url)
    n.start()
    try:
        emit(client, make_alert(q, "ev1", START, entry="1-0"))
        emit(client, make_alert(q, "ev2", START, entry="2-0"))
        wait_for(lambda: len(http.posts) == 2, WAIT_S, "two posts")
    finally:
        n.stop()
    with_evidence, without = sorted(http.posts, key=lambda p: "ev2" in p["message"])
    files = {a["filename"]: base64.b64decode(a["base64"]) for a in with_evidence["attachments"]}
    assert set(files) == {"ev1.wav", "frame_camera_1000000000.jpg"} and files["frame_camera_1000000000.jpg"] == first
    with wave.open(io.BytesIO(files["ev1.wav"])) as w:
        assert (w.getnchannels(), w.getframerate(), w.getsampwidth(), w.getnframes()) == (2, 8000, 2, 800)
        assert w.readframes(800) == pcm
    assert not without.get("attachments")

    attached, left_out = evidence_attachments(client, "ev1", max_bytes=len(pcm))  # the WAV's header does not fit
    assert [a.name for a in attached] == ["frame_camera_1000000000.jpg"] and left_out == ["attach_too_big"]
    client.hset(evidence_key("ev1"), AUDIO_PCM, b"odd")
    assert evidence_attachments(client, "ev1", max_bytes=10**6)[1] == ["attach_malformed"]


# ----- fan-out -------------------------------------------------------------------------------------------


def test_fan_out_queues_each_alert_once_per_sink_across_a_crash_and_bounds_the_outbox(client, redis_server):
    """Entries read but not acknowledged by a notifier that died are queued by the next one, once; an outbox
    keeps its newest `outbox_maxlen` entries and counts the others; bad entries and stored URLs are counted."""
    sink = "json://127.0.0.1:9/"  # nothing is sent: no sender runs without start()
    q = add_query(client)
    settings = NotifySettings(urls=(sink,), outbox_maxlen=3, **FAST)
    emitted = [emit(client, make_alert(q, f"ev{i}", START, entry=f"{i + 1}-0")) for i in range(5)]
    client.xgroup_create(ALERTS_STREAM, settings.group, id="0")
    read = client.xreadgroup(settings.group, settings.consumer, {ALERTS_STREAM: ">"}, count=2)  # then it died
    assert len(read[0][1]) == 2

    n = Notifier(settings, redis_server.url)
    while n.step():
        pass
    outbox = client.xrange(outbox_key(sink_id(sink)))
    assert [f[b"alert_id"].decode() for _, f in outbox] == emitted[2:]  # the newest 3, each once
    assert counts(n, "queued", sink_id(sink)) == 5 and counts(n, "dropped_outbox_full", sink_id(sink)) == 2
    assert client.xpending(ALERTS_STREAM, settings.group)["pending"] == 0
    assert client.hget(SINKS, sink_id(sink)).decode() == sink

    again = Notifier(settings, redis_server.url)  # a restart reads nothing twice
    assert again.step() == 0 and client.xlen(outbox_key(sink_id(sink))) == 3

    client.xadd(ALERTS_STREAM, {"device": "d"})  # not an alert
    client.hset(query_key(q.id), NOTIFY_FIELD, "not a url")  # edited by hand
    emit(client, make_alert(q, "ev9", START, entry="9-0"))
    while again.step():
        pass
    assert counts(again, "rejected_malformed") == 1 and counts(again, "rejected_url", q.id) == 1
    assert counts(again, "queued", sink_id(sink)) == 1  # the global sink still got it


def test_alerts_of_a_removed_query_go_where_its_event_started(client, redis_server):
    """Once a query is removed, its event's end goes to the sinks its event record names."""
    sink = "json://127.0.0.1:9/"
    q = add_query(client)
    client.hset(event_key("ev1"), NOTIFY_FIELD, sink)
    emit(client, make_alert(q, "ev1", END))
    n = Notifier(NotifySettings(**FAST), redis_server.url)
    while n.step():
        pass
    assert counts(n, "no_sink", q.id) == 1  # the query exists and names no sink
    client.delete(query_key(q.id))
    emit(client, make_alert(q, "ev1", END, entry="2-0"))
    while n.step():
        pass
    assert counts(n, "queued", sink_id(sink)) == 1


# ----- sinks and settings --------------------------------------------------------------------------------


def test_urls_are_checked_without_any_connection():
    assert parse_sink("ntfy://bindstream-alerts").label.startswith("ntfy")
    mq = parse_sink("mqtts://user:s3cret@broker.lan/home/bindstream")
    assert "s3cret" not in mq.label and (mq.port, mq.prefix, mq.password) == (8883, "home/bindstream", "s3cret")
    assert parse_sink("mqtt://broker.lan").prefix == "bindstream"
    for bad in ("foo://bar", "notaurl", "", "mqtt://", "mqtt://h:99999/x", "mqtt://h/a/+/b", "mqtt://h/x?qos=1"):
        with pytest.raises(SinkError):
            parse_sink(bad)
    with pytest.raises(Unsendable):
        parse_sink("mqtt://broker.lan").send(make_alert(None, "e", START, device="a+b"), None)
    with pytest.raises(ValueError, match="outbox_maxlen"):
        NotifySettings(outbox_maxlen=0)


def test_idempotency_keys():
    q = Query("x", "audio", vector(), MODEL)
    assert idempotency_key(make_alert(q, "ev", START)) == "ev:start"
    assert idempotency_key(make_alert(q, "ev", END)) == "ev:end"
    assert idempotency_key(make_alert(q, "ev", UPDATE, entry="7-1")) == "ev:update:7-1"
    assert idempotency_key(replace(make_alert(q, "", START), id="5-0")) == "alert:5-0"


def test_pipeline_config_notify_table():
    config = PipelineConfig.from_dict({"notify": {"urls": ["json://127.0.0.1:9/"], "outbox_maxlen": 5}})
    assert config.notify.urls == ("json://127.0.0.1:9/",) and config.notify.outbox_maxlen == 5
    with pytest.raises(ConfigError, match=r"\[notify\].*foo://x"):
        PipelineConfig.from_dict({"notify": {"urls": ["foo://x"]}})
    with pytest.raises(ConfigError, match="outbox_max"):
        PipelineConfig.from_dict({"notify": {"outbox_max": 5}})


# ----- commands ------------------------------------------------------------------------------------------


def test_alert_add_notify_refuses_a_bad_url_and_lists_the_good_ones(client, redis_server, tmp_path, caplog):
    save_background(client, Background(MODEL, "audio", ("b",), np.eye(DIM, dtype=np.float32)[1:2]))
    np.save(tmp_path / "q.npy", vector())
    base = ["add", "a baby crying", "--modality", "audio", "--vector", str(tmp_path / "q.npy")]
    base += ["--model", MODEL, "--redis", redis_server.url]
    bad = CliRunner().invoke(alert, [*base, "--notify", "json://127.0.0.1:9/", "--notify", "foo://nothing"])
    errors = [line for line in bad.output.splitlines() if line.startswith("Error")]
    assert bad.exit_code == 2 and len(errors) == 1 and "--notify" in errors[0] and "foo://nothing" in errors[0]
    assert not [r for r in caplog.records if r.name == "apprise"]  # apprise's reason is in that line, not beside
    assert client.scard(QUERY_SET) == 0

    urls = ["json://127.0.0.1:9/", "mqtt://ha:s3cret@127.0.0.1/home"]
    ok = CliRunner().invoke(alert, [*base, "--notify", urls[0], "--notify", urls[1]], catch_exceptions=False)
    assert ok.exit_code == 0, ok.output
    (query_id,) = [x.decode() for x in client.smembers(QUERY_SET)]
    assert client.hget(query_key(query_id), NOTIFY_FIELD).decode() == "\n".join(urls)
    assert load_query(client, query_id).notify == tuple(urls)
    listed = CliRunner().invoke(alert, ["list", "--redis", redis_server.url]).output
    assert "json://127.0.0.1:9/" in listed and "mqtt://ha:***@127.0.0.1/home" in listed and "s3cret" not in listed
    rows = json.loads(CliRunner().invoke(alert, ["list", "--json", "--redis", redis_server.url]).output)
    assert rows[0]["notify"] == ["json://127.0.0.1:9/", "mqtt://ha:***@127.0.0.1/home"]
    client.hdel(query_key(query_id), NOTIFY_FIELD)  # as written before the field existed
    assert load_query(client, query_id).notify == ()


def test_notify_command_delivers_and_reports(client, redis_server, http):
    q = add_query(client)
    emit(client, make_alert(q, "ev1", START))
    args = ["--url", http.url, "--from-start", "--seconds", "5", "--redis", redis_server.url]
    result = CliRunner().invoke(notify_command, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert http.keys() == ["ev1:start"]
    final = result.output.split("bindstream notifier: final")[1]
    assert sink_id(http.url) in final and "json://127.0.0.1" in final
    bad = CliRunner().invoke(notify_command, ["--url", "foo://x", "--redis", redis_server.url])
    assert bad.exit_code == 2 and "Invalid value for --url: foo://x" in bad.output


# ----- the actor -----------------------------------------------------------------------------------------


def test_actor_restart_resumes_delivery(ray_local, client, redis_server, http):
    """A notifier actor killed by a crash while a query's sink is down comes back (Ray restarts it), finds that
    sink's outbox and delivers what waits there, once."""
    q = add_query(client, notify=[http.url])
    actor = start_notifier(NotifySettings(**FAST), redis_server.url)
    emit(client, make_alert(q, "ev1", START))
    wait_for(lambda: http.keys() == ["ev1:start"], WAIT_S, "the start")
    http.stop()
    emit(client, make_alert(q, "ev1", END, entry="2-0"))
    wait_for(lambda: client.xlen(outbox_key(sink_id(http.url))) == 1, WAIT_S, "the end to be queued")
    ray_local.kill(actor, no_restart=False)

    def restarted() -> bool:
        """The new actor answers (its counts start at zero; the old one has sent one)."""
        try:
            return Counts.of(ray_local.get(actor.stats.remote(), timeout=WAIT_S)).get("sent") == 0
        except ray_local.exceptions.RayActorError:
            return False

    wait_for(restarted, WAIT_S, "the restarted actor")
    http.start()
    wait_for(lambda: len(http.posts) == 2, WAIT_S, "the end, from the restarted actor")
    final = ray_local.get(actor.stop.remote())
    ray_local.kill(actor)
    assert http.keys() == ["ev1:start", "ev1:end"] and Counts.of(final).get("sent") == 1
