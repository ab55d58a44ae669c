"""The web console (streaming/ui): its Devices and Events pages, its token rule and its one-line problems, driven in a
real headless Chromium (the `chromium` fixture) against a real redis-server; the console runs on uvicorn, on a free
loopback port.

The end-to-end test is what a user does: `bindstream run --ui` (a real process: Ray, the pipeline, the console on a
thread beside it), a simulated wearable whose mic plays a chirp burst, an example query of the burst matched by an
in-process Matcher. The model is `tiny`, with RANDOM weights: the event is found by similarity to the example clip,
not by understanding. The other tests write records as the matcher and the evidence writer do. Each page's
screenshot is written to a pytest temporary folder (its path is printed)."""

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import cv2
import numpy as np
import pytest
import redis
from click.testing import CliRunner
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from sensors.simulator import MIC_RATE, ChirpBursts, simulate
from streaming.alerts.events import load_event
from streaming.alerts.matcher import Matcher, MatcherSettings
from streaming.alerts.queries import ensure_background, save_query
from streaming.alerts.records import Calibration, Decision, Query
from streaming.records import Embedding
from streaming.redis_layout import (
    ALERTS_CHANNEL,
    ALERTS_STREAM,
    AUDIO_CHANNELS,
    AUDIO_PCM,
    AUDIO_RATE,
    AUDIO_T0,
    CONFIRMED,
    END,
    ENDED,
    EVENTS_INDEX,
    EVIDENCE_FIELD,
    FALSE_POSITIVE,
    IMU_CSV,
    QUERY_EVENT,
    START,
    Alert,
    Event,
    encode_embedding,
    event_id,
    event_key,
    evidence_key,
    frame_field,
    npy_bytes,
    pcm16,
    pcm_wav,
    stream_key,
)
from streaming.ui.app import ConsoleServer, create_app
from streaming.ui.auth import COOKIE
from streaming.ui.web import ConsoleSettings

from .conftest import BROWSER_SIZE, wait_for

BINDSTREAM = [sys.executable, "-c", "from streaming.cli import main; main()"]
SECOND = 1_000_000_000
TOKEN = "a-console-token-for-the-tests"
WAIT_S = 30  # bound on every wait for the browser or the console
PHONE = (390, 844)  # a phone's screen, CSS pixels
NAV = ("Devices", "Events", "Timeline", "Queries", "Search")
AUDIO_S = 1.5  # the written event's audio
RATE = 16_000


# ----- the console and what it shows ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    """Where the screenshots go (not committed)."""
    folder = tmp_path_factory.mktemp("console-screenshots")
    print(f"\nscreenshots of the console: {folder}")
    return folder


def shoot(driver, folder, name: str) -> None:
    """A screenshot of the whole page: the window is made as tall as the page for it, then sized back."""
    size = driver.get_window_size()
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(
        size["width"], max(size["height"], height + size["height"] - driver.execute_script("return window.innerHeight"))
    )
    try:
        path = folder / f"{name}.png"
        assert driver.save_screenshot(str(path))
    finally:
        driver.set_window_size(size["width"], size["height"])
    print(f"screenshot: {path}")


@pytest.fixture(scope="module")
def console(redis_server):
    """The console without a token, on 127.0.0.1."""
    server = ConsoleServer(create_app(redis_server.url), "127.0.0.1", 0).start()
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def locked(redis_server):
    """The console as it runs off loopback: every request needs the token."""
    server = ConsoleServer(create_app(redis_server.url, token=TOKEN), "127.0.0.1", 0).start()
    yield server.url
    server.stop()


def fetch(base: str, path: str, method: str = "GET", headers: dict | None = None, body: str | None = None):
    """(status, headers, body text) of one request, redirects not followed."""
    parts = urlsplit(base)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=WAIT_S)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.headers, response.read().decode()
    finally:
        connection.close()


def one_line(body: str) -> str:
    """The one line a problem page says; fails unless there is exactly one, and no traceback."""
    lines = re.findall(r'<p class="problem" role="alert">(.*?)</p>', body, flags=re.S)
    assert len(lines) == 1 and "\n" not in lines[0], body
    assert "Traceback" not in body
    return lines[0]


def tone(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return pcm16((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))


def write_event(client: redis.Redis, device: str, query: str = "feedbeef") -> Event:
    """An ended event of `device` with its evidence (1.5 s of audio, a camera JPEG, a raw depth frame, IMU rows)
    and one window in its audio stream, written as the matcher, the evidence writer and the publisher do."""
    source, now_ns = stream_key(device, "audio"), time.time_ns()
    t0 = 1_000 * SECOND
    e = Event(
        event_id(query, source, f"{now_ns}-0"),
        QUERY_EVENT,
        device,
        query,
        "glass breaking",
        "audio",
        "tiny",
        source,
        t0,
        t0 + 2 * SECOND,
        0.91,
        "1-0",
        2,
        state=ENDED,
        detected_ns=now_ns,
        ended_ns=now_ns,
    )
    client.hset(event_key(e.id), mapping=e.encode() | {EVIDENCE_FIELD: evidence_key(e.id)})
    client.zadd(EVENTS_INDEX, {e.id: now_ns // 1_000_000})
    camera = cv2.imencode(".jpg", np.full((48, 64, 3), 90, np.uint8))[1].tobytes()
    depth = np.tile(np.arange(64, dtype=np.uint16) * 40, (48, 1))
    imu = "t_ns,ax,ay,az,gx,gy,gz\n" + "".join(f"{t0 + i},0,0,9.8,0,0,0\n" for i in range(5))
    client.hset(
        evidence_key(e.id),
        mapping={
            AUDIO_PCM: tone(AUDIO_S, RATE).tobytes(),
            AUDIO_RATE: RATE,
            AUDIO_CHANNELS: 1,
            AUDIO_T0: t0 - SECOND,
            frame_field("camera", t0 + SECOND // 2, "jpeg"): camera,
            frame_field("depth", t0 + SECOND // 2, None): npy_bytes(depth),
            IMU_CSV: imu,
        },
    )
    window = Embedding(device, "audio", t0, t0 + 2 * SECOND, np.eye(64, dtype=np.float32)[0], "tiny", 0, 0)
    client.xadd(source, encode_embedding(window))
    return e


@pytest.fixture(scope="module")
def written(redis_server) -> Event:
    return write_event(redis.Redis.from_url(redis_server.url), "ui-written")


# ----- one line for what cannot be done -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "status", "says"),
    [
        ("/events/0123456789abcdef", 404, "no event '0123456789abcdef'"),
        ("/events/not-an-id", 404, "event ids are hexadecimal"),
        ("/events/" + "a" * 40, 404, "event ids are 16 hex characters"),
        ("/events?limit=abc", 400, "limit: 'abc' is not a whole number from 1 to 500"),
        ("/events?limit=0", 400, "limit: '0' is not a whole number"),
        ("/events?since=soon", 400, "since: cannot read the duration 'soon'"),
        ("/events?kind=alarm", 400, "kind: 'alarm' is not one of query, health"),
        ("/events?query=*", 400, "query: '*' is neither a query id"),
        ("/events?device=" + "x" * 201, 400, "device: longer than 200 characters"),
        ("/events/table?limit=-1", 400, "limit: '-1' is not a whole number"),
        ("/no/such/page", 404, "no page /no/such/page"),
    ],
)
def test_bad_input_is_one_line_on_a_4xx_page(console, path, status, says):
    code, headers, body = fetch(console, path)
    assert code == status and headers["content-type"].startswith("text/html")
    assert says.replace("'", "&#39;") in one_line(body)


def test_evidence_and_reviews_of_what_is_not_there_are_404_or_400(console, written, redis_server):
    client = redis.Redis.from_url(redis_server.url)
    bare = write_event(client, "ui-bare", query="0badc0de")
    client.delete(evidence_key(bare.id))
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for path, method, body, status, says in [
        (f"/events/{bare.id}/audio.wav", "GET", None, 404, f"no audio stored for event {bare.id}"),
        (f"/events/{written.id}/frames/frame:camera:1.jpg", "GET", None, 404, "has no frame frame:camera:1.jpg"),
        (f"/events/{written.id}/frames/imu.csv", "GET", None, 404, "is not a frame of event"),
        (f"/events/{written.id}/review", "POST", "review=maybe", 400, "review: 'maybe' is not one of"),
        ("/events/0123456789abcdef/review", "POST", "review=confirmed", 404, "no event"),
    ]:
        code, _, text = fetch(console, path, method, form, body)
        assert code == status, (path, code, text)
        assert says.replace("'", "&#39;") in one_line(text), path
    # a form another site makes the browser send (cross-site request forgery), and a page reached through DNS
    # rebinding (a loopback console asked for another host name), are refused
    code, _, text = fetch(
        console, f"/events/{written.id}/review", "POST", form | {"Origin": "http://evil.example"}, "review=confirmed"
    )
    assert code == 403 and "another site" in one_line(text)
    assert load_event(client, written.id).review == "none"
    code, _, text = fetch(console, "/devices", headers={"Host": "evil.example"})
    assert code == 403 and "loopback" in one_line(text)


# ----- the live stream ------------------------------------------------------------------------------------------


def an_alert(device: str, state: str) -> Alert:
    source = stream_key(device, "audio")
    return Alert(device, "feedbeef", "glass breaking", "audio", 0.9, 0.5, 0, SECOND, source, "1-0", "tiny", 1, state)


def server_sent(response, count: int) -> list[dict[str, str]]:
    """The next `count` server-sent events of a /live response, each its fields (comments skipped)."""
    events: list[dict[str, str]] = []
    fields: dict[str, str] = {}
    while len(events) < count:
        line = response.readline().decode().rstrip("\n")
        if not line and fields:
            events.append(fields)
            fields = {}
        elif line and not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = value
    return events


def open_live(base: str, headers: dict | None = None):
    parts = urlsplit(base)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=WAIT_S)
    connection.request("GET", "/live", headers=headers or {})
    return connection, connection.getresponse()


def test_the_live_stream_relays_alerts_catches_up_after_a_reconnect_and_is_bounded(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    app = create_app(redis_server.url, settings=ConsoleSettings(max_live=1))
    server = ConsoleServer(app, "127.0.0.1", 0).start()
    try:
        seen = client.xadd(ALERTS_STREAM, an_alert("ui-live", START).fields()).decode()
        missed = client.xadd(ALERTS_STREAM, an_alert("ui-live", END).fields()).decode()
        # a browser that reconnects says the last id it saw: what came after it is sent first, from the stream
        connection, response = open_live(server.url, {"Last-Event-ID": seen})
        try:
            assert response.status == 200 and response.headers["content-type"].startswith("text/event-stream")
            retry, caught_up = server_sent(response, 2)
            assert set(retry) == {"retry"} and caught_up["id"] == missed and caught_up["event"] == "alert"
            assert json.loads(caught_up["data"])["state"] == END
            # one stream at most (max_live=1): another is refused with a page
            code, _, body = fetch(server.url, "/live")
            assert code == 503 and "1 live streams are open already" in one_line(body)
            # then each message of the channel; one that is no alert is dropped and counted
            wait_for(lambda: client.pubsub_numsub(ALERTS_CHANNEL)[0][1] >= 1, WAIT_S, "the stream to subscribe")
            client.publish(ALERTS_CHANNEL, "not json")
            fresh = an_alert("ui-live-2", START)
            client.publish(ALERTS_CHANNEL, json.dumps({"id": "9999999999999-0", **fresh.fields()}))
            (relayed,) = server_sent(response, 1)
            assert relayed["id"] == "9999999999999-0" and json.loads(relayed["data"])["device"] == "ui-live-2"
            assert app.state.live_dropped == 1
        finally:
            connection.close()
        wait_for(lambda: app.state.live == 0, WAIT_S, "the closed stream to be let go")
    finally:
        server.stop()


# ----- the token ------------------------------------------------------------------------------------------------


def test_off_loopback_every_request_needs_the_token_and_only_then_a_cookie_is_set(locked, console, chromium):
    code, headers, body = fetch(locked, "/devices")
    assert code == 401 and headers["WWW-Authenticate"] == "Bearer" and "needs its token" in one_line(body)
    assert fetch(locked, "/static/style.css")[0] == 401  # every request, the static files too
    assert fetch(locked, "/devices?token=not-the-token-at-all")[0] == 401
    assert fetch(locked, "/devices", headers={"Authorization": "Bearer not-the-token-at-all"})[0] == 401
    code, headers, _ = fetch(locked, "/devices", headers={"Authorization": f"Bearer {TOKEN}"})
    assert code == 200 and "set-cookie" not in headers
    # ?token= once: a session cookie (HttpOnly, SameSite=Strict, not the token itself), and the URL without it
    code, headers, _ = fetch(locked, f"/events?kind=query&token={TOKEN}")
    assert code == 303 and headers["Location"].endswith("/events?kind=query")
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower() and TOKEN not in cookie
    # without a token (loopback) no page sets a cookie
    for path in ("/devices", "/events", "/devices/table", f"/devices?token={TOKEN}"):
        assert "set-cookie" not in fetch(console, path)[1], path

    chromium.delete_all_cookies()
    chromium.get(f"{locked}/devices")
    assert "needs its token" in chromium.find_element(By.CSS_SELECTOR, "p.problem").text
    chromium.get(f"{locked}/devices?token={TOKEN}")
    assert chromium.current_url == f"{locked}/devices"
    assert chromium.find_element(By.TAG_NAME, "h1").text == "Devices"
    (session,) = chromium.get_cookies()
    assert session["name"] == COOKIE and session["httpOnly"] and session["sameSite"] == "Strict"
    chromium.get(f"{locked}/events")  # a link: the cookie carries the session
    assert chromium.find_element(By.TAG_NAME, "h1").text == "Events"
    chromium.delete_all_cookies()


def test_bindstream_ui_refuses_to_listen_off_loopback_without_a_token(redis_server, monkeypatch):
    from streaming.cli import main

    monkeypatch.delenv("BINDSTREAM_UI_TOKEN", raising=False)
    for args, says in [
        (["--host", "0.0.0.0"], "would be open to the network: give --token or $BINDSTREAM_UI_TOKEN"),
        (["--host", "0.0.0.0", "--token", "short"], "at least 16 characters"),
    ]:
        done = CliRunner().invoke(main, ["ui", "--redis", redis_server.url, *args])
        assert done.exit_code == 1 and done.output.count("\n") == 1 and says in done.output, done.output


def test_bindstream_ui_serves_the_console_until_ctrl_c(redis_server):
    ui = subprocess.Popen(
        [*BINDSTREAM, "ui", "--redis", redis_server.url, "--port", "0", "--model", "tiny"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert ui.stdout is not None
        said = ui.stdout.readline() + ui.stdout.readline()
        assert "model: tiny" in said and "RANDOM weights" in said  # the encoder of the Queries and Search pages
        url = re.search(r"web console: (http://127\.0\.0\.1:\d+)/", said)
        assert url, said
        code, _, body = fetch(url[1], "/devices")
        assert code == 200 and "<h1>Devices</h1>" in body
    finally:
        ui.send_signal(signal.SIGINT)
        assert ui.wait(timeout=WAIT_S) == 0


# ----- in the browser: keyboard, a phone's width, the event's evidence and review -------------------------------


def wait(driver, what: str, predicate, timeout: float = WAIT_S):
    """`predicate(driver)` once truthy; an element replaced meanwhile (a table that reloads) is looked up again."""
    waiting = WebDriverWait(driver, timeout, poll_frequency=0.2, ignored_exceptions=[StaleElementReferenceException])
    return waiting.until(lambda d: predicate(d), message=what)


def focused_text(driver) -> str:
    return driver.execute_script("return document.activeElement.textContent.trim()")


def test_keyboard_reaches_the_nav_and_a_phone_width_needs_no_sideways_scroll(console, written, chromium, shots):
    chromium.get(f"{console}/events")
    chromium.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    assert focused_text(chromium) == "Skip to content"
    for label in NAV:
        chromium.switch_to.active_element.send_keys(Keys.TAB)
        assert focused_text(chromium) == label
    current = chromium.find_elements(By.CSS_SELECTOR, "nav a[aria-current='page']")
    assert [a.text for a in current] == ["Events"]

    chromium.set_window_size(*PHONE)
    try:
        for name, path in [
            ("devices", "/devices"),
            ("events", "/events"),
            ("event", f"/events/{written.id}"),
            ("problem", "/events/0123456789abcdef"),
        ]:
            chromium.get(console + path)
            width, body = chromium.execute_script(
                "return [document.documentElement.clientWidth, document.body.scrollWidth]"
            )
            assert width <= PHONE[0] and body <= width, (path, width, body)
            shoot(chromium, shots, f"phone-{name}")
    finally:
        chromium.set_window_size(*BROWSER_SIZE)


AUDIO_DURATION_JS = """
const done = arguments[arguments.length - 1], audio = document.querySelector("audio");
if (audio.readyState >= 1) { done(audio.duration); return; }
audio.addEventListener("loadedmetadata", () => done(audio.duration));
audio.addEventListener("error", () => done(-1));
audio.load();
"""


def loaded_frames(driver) -> list[int]:
    """Each frame's natural width, once every frame has loaded (0: did not decode)."""
    frames = driver.find_elements(By.CSS_SELECTOR, "img.frame")
    for img in frames:
        driver.execute_script("arguments[0].scrollIntoView()", img)  # lazy images load once in view
    wait(driver, "the frames to load", lambda d: all(img.get_property("complete") for img in frames))
    return [img.get_property("naturalWidth") for img in frames]


def test_an_event_page_plays_its_audio_shows_its_frames_and_records_a_verdict(console, redis_server, chromium, shots):
    client = redis.Redis.from_url(redis_server.url)
    e = write_event(client, "ui-review", query="5eed5eed")
    chromium.get(f"{console}/events/{e.id[:8]}")  # the start of an id leads to the event's own address
    assert chromium.current_url == f"{console}/events/{e.id}"
    assert chromium.execute_async_script(AUDIO_DURATION_JS) == pytest.approx(AUDIO_S, abs=1e-3)
    assert loaded_frames(chromium) == [64, 64]  # the camera JPEG as sent, the raw depth frame rendered to PNG
    assert "5 row(s)" in chromium.find_element(By.TAG_NAME, "main").text
    shoot(chromium, shots, "event-written")
    chromium.find_element(By.CSS_SELECTOR, "button[name='false-positive']").click()
    wait(
        chromium,
        "the review on the page",
        lambda d: "false_positive" in d.find_element(By.CSS_SELECTOR, "[data-review]").text,
    )
    assert chromium.current_url == f"{console}/events/{e.id}"
    assert load_event(client, e.id).review == FALSE_POSITIVE


# ----- end to end: bindstream run --ui, a wearable, an event ----------------------------------------------------

STREAM_S = 28.0  # the wearable streams this long; its burst at BURSTS.first_s
# after the example query's warm-up (WARMUP windows of 2 s every 1 s), and late enough that the Events page, opened
# once the Devices page showed the wearable's audio, listens before the event starts (its live feed shows what comes
# after it opens; a slow CI machine took past 7 s there)
BURSTS = ChirpBursts(first_s=20.0)
WARMUP = 4
SILENCE_S = 3.0  # the matcher's silence_s: the wearable's streams fall silent this soon after it stops


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chirp_query(client: redis.Redis, folder) -> Query:
    """The burst as an example query (what `alert add --example` stores), with a short warm-up and one window."""
    import encoders
    from encoders.transforms import load_file

    clip = folder / "chirp.wav"
    clip.write_bytes(pcm_wav(pcm16(BURSTS.clip(MIC_RATE)).tobytes(), MIC_RATE, 1))
    encoder = encoders.load("tiny")
    ensure_background(client, encoder, "audio")
    emb = encoder.embed("audio", load_file(clip, "audio")[1].unsqueeze(0))[0]
    decision, calibration = Decision(k=1, n=1, cooldown_s=0.0), Calibration(warmup=WARMUP)
    q = Query(
        "a chirp burst", "audio", emb, "tiny", decision=decision, calibration=calibration, source=f"example:{clip}"
    )
    return save_query(client, q)


class Output:
    """The lines a process prints, read on a thread; `wait_for` the first that matches."""

    def __init__(self, process: subprocess.Popen):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self.thread.start()

    def _read(self, process: subprocess.Popen) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if found := re.search(pattern, line):
                    return found
            if not self.thread.is_alive():
                break
            time.sleep(0.1)
        raise AssertionError(f"no line matches {pattern!r}:\n{''.join(self.lines)[-4000:]}")


def evidence_until(client: redis.Redis, e: Event) -> int:
    """The device time up to which the event's evidence holds audio (0: none yet)."""
    pcm, rate, channels, t0 = client.hmget(evidence_key(e.id), [AUDIO_PCM, AUDIO_RATE, AUDIO_CHANNELS, AUDIO_T0])
    if pcm is None:
        return 0
    return int(t0) + len(pcm) // (2 * int(channels)) * SECOND // int(rate)


def mark(driver) -> None:
    """Mark the page: the mark is gone if it reloads."""
    driver.execute_script("window.notReloaded = true")


def not_reloaded(driver) -> bool:
    return driver.execute_script("return window.notReloaded === true")


@pytest.mark.timeout(420)
def test_run_ui_shows_a_wearable_live_its_event_within_seconds_with_its_audio_and_takes_an_ack(
    redis_server, chromium, shots, tmp_path
):
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    query = chirp_query(client, tmp_path)
    matcher = Matcher(MatcherSettings(silence_s=SILENCE_S, discover_s=1.0), redis_server.url)
    ingest = f"tcp://127.0.0.1:{free_port()}"
    run = subprocess.Popen(
        [*BINDSTREAM, "run", "--redis", redis_server.url, "--ingest", ingest, "--model", "tiny", "--matchers", "0"]
        + ["--max-wait-ms", "20", "--no-live", "--ui", "--ui-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = Output(run)
    wearable = threading.Thread(target=simulate, kwargs={"endpoint": ingest, "seconds": STREAM_S, "bursts": BURSTS})
    try:
        base = out.wait_for(r"web console: (http://127\.0\.0\.1:\d+)/", 240)[1]
        matcher.start()

        # Devices: the wearable appears while the page is open, with a rate for each stream
        chromium.get(f"{base}/devices")
        assert not chromium.find_elements(By.CSS_SELECTOR, "tbody[data-device]")
        mark(chromium)
        wearable.start()
        device = "tbody[data-device='sim-000']"
        wait(chromium, "sim-000 on the Devices page", lambda d: d.find_elements(By.CSS_SELECTOR, device))
        rate = f"{device} tr[data-modality='audio'] td.num"
        wait(chromium, "audio windows per minute", lambda d: float(d.find_element(By.CSS_SELECTOR, rate).text) > 0)
        assert not_reloaded(chromium)
        shoot(chromium, shots, "devices")

        # Events: the burst's event appears in the live feed and the history, without a reload
        chromium.get(f"{base}/events")
        mark(chromium)
        line = wait(
            chromium,
            "the event's start in the live feed",  # a query event (a slow machine may also raise a health event)
            lambda d: d.find_elements(By.CSS_SELECTOR, "[data-live-feed] li[data-state='start'][data-kind='query']"),
            timeout=BURSTS.first_s + 60,
        )[0]
        found = line.get_attribute("data-event")
        wait(
            chromium,
            "the event in the history",
            lambda d: d.find_elements(By.CSS_SELECTOR, f"tr[data-event='{found}']"),
        )
        assert not_reloaded(chromium) and "sim-000" in line.text and query.text in line.text
        e = load_event(client, found)
        assert (e.device, e.query, e.kind) == ("sim-000", query.id, QUERY_EVENT)
        shoot(chromium, shots, "events")

        # its page: the audio element loads a WAV as long as the evidence, the frames load, Ack is recorded
        def ended_with_its_evidence():
            e = load_event(client, found)
            return e if e.state == ENDED and evidence_until(client, e) >= e.end_ns else None

        e = wait(chromium, "the event to end with its evidence", lambda _: ended_with_its_evidence(), timeout=60)
        chromium.get(f"{base}/events/{e.id}")
        pcm, rate_hz, channels = client.hmget(evidence_key(e.id), [AUDIO_PCM, AUDIO_RATE, AUDIO_CHANNELS])
        stored_s = len(pcm) / (2 * int(channels) * int(rate_hz))
        assert stored_s >= (e.end_ns - e.start_ns) / SECOND  # the pre-roll, and the event to its end
        assert chromium.execute_async_script(AUDIO_DURATION_JS) == pytest.approx(stored_s, abs=1e-3)
        frames = loaded_frames(chromium)
        assert frames and all(width > 0 for width in frames)
        shoot(chromium, shots, "event")
        chromium.find_element(By.CSS_SELECTOR, "button[name='ack']").click()
        wait(
            chromium,
            "the ack on the page",
            lambda d: CONFIRMED in d.find_element(By.CSS_SELECTOR, "[data-review]").text,
        )
        assert load_event(client, e.id).review == CONFIRMED

        # the wearable stops: its streams are marked silent on the open Devices page (health events, live)
        chromium.get(f"{base}/devices")
        mark(chromium)
        wearable.join(timeout=STREAM_S + WAIT_S)
        silent = f"{device} tr.silent[data-modality='audio']"
        wait(
            chromium,
            "sim-000's audio stream marked silent",
            lambda d: "silent: health event" in d.find_element(By.CSS_SELECTOR, silent).text,
            timeout=SILENCE_S + 30,
        )
        assert not_reloaded(chromium)
        shoot(chromium, shots, "devices-silent")
    finally:
        matcher.stop()
        run.send_signal(signal.SIGINT)
        code = run.wait(timeout=120)
        if wearable.is_alive():
            wearable.join(timeout=WAIT_S)
    assert code == 0, "".join(out.lines)[-4000:]
