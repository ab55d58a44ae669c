"""The console's Device timeline, Queries and Search pages, driven in a real headless Chromium (Selenium) against a
real redis-server, the console served by uvicorn on loopback, and a real in-process Matcher.

The model `tiny` has RANDOM weights: its embeddings say nothing, so, as in test_alerts and test_events, windows are
known unit vectors written straight into the streams (the background prompts are e1..e8; a window equal to a
query's vector scores ~1, QUIET ~0). A query added through the page gets tiny's text vector, which the test reads
back from Redis to write windows that match it. Each page's screenshot is written to the test's tmp dir.
"""

import re
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from streaming.alerts.events import list_events, set_review
from streaming.alerts.queries import load_query, save_query
from streaming.alerts.records import Decision, Query
from streaming.redis_layout import CONFIRMED, FALSE_POSITIVE, QUERY_SET, sink_id, stream_key
from streaming.ui.app import ConsoleServer, create_app
from streaming.ui.web import ConsoleSettings

from .conftest import BROWSER_SIZE, wait_for
from .test_alerts import DIM, MATCH, MODEL, QUIET, SECOND, WAIT_S, WINDOW_S, basis, write
from .test_alerts import with_share as share_window
from .test_events import matcher, settle
from .test_review import raise_event

PAGE_WAIT_S = 30.0  # a page load, a chart drawn
PHONE = (390, 844)  # a phone's window, CSS px
ONE_SHOT = Decision(k=1, n=1, cooldown_s=0)  # each window at or above 0.5 opens an event; QUIET ends it
SINK = "json://127.0.0.1:9/hook"  # a notify URL: checked and stored, never called


@pytest.fixture
def console(server):
    """The console over the test's Redis, embedding with `tiny` (RANDOM weights), served on a free loopback port."""
    served = ConsoleServer(create_app(server.url, model=MODEL), "127.0.0.1", 0).start()
    yield served.url
    served.stop()


def status(chromium) -> int:
    """The HTTP status of the page the browser shows (its navigation entry)."""
    return chromium.execute_script("return performance.getEntriesByType('navigation')[0].responseStatus")


def problem_line(chromium) -> str:
    return chromium.find_element(By.CSS_SELECTOR, "p.problem").text


def problem_text(answer: requests.Response) -> str:
    """The one line of a problem page fetched without the browser."""
    return re.search(r'<p class="problem" role="alert">(.*?)</p>', answer.text, re.S)[1].strip()


def shot(chromium, tmp_path: Path, name: str) -> None:
    """A screenshot of the whole page into the test's tmp dir, and a check that it serves a keyboard: every form
    control has a label, every action is a button."""
    height = chromium.execute_script("return document.documentElement.scrollHeight")
    width = chromium.get_window_size()["width"]
    chromium.set_window_size(width, max(height + 150, BROWSER_SIZE[1]))
    assert chromium.save_screenshot(str(tmp_path / f"{name}.png"))
    chromium.set_window_size(width, BROWSER_SIZE[1])
    unlabelled = chromium.execute_script(
        "return [...document.querySelectorAll('input:not([type=hidden]), select, textarea')]"
        ".filter(e => e.labels.length === 0).map(e => e.name)"
    )
    assert unlabelled == [], f"{name}: form controls without a label"
    assert not chromium.find_elements(By.CSS_SELECTOR, "[onclick]:not(button)"), f"{name}: a click target not a button"


def fits_a_phone(chromium, url: str, tmp_path: Path, name: str) -> bool:
    """Whether the page at `url`, on a phone's width, needs no sideways scrolling (wide tables scroll inside); its
    screenshot is `{name}-phone.png`."""
    chromium.set_window_size(*PHONE)
    try:
        chromium.get(url)
        assert chromium.save_screenshot(str(tmp_path / f"{name}-phone.png"))
        return chromium.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    finally:
        chromium.set_window_size(*BROWSER_SIZE)


def submit(chromium, form) -> None:
    """Submit `form` with its button, by the keyboard (Enter on the focused button), and wait for the next page."""
    button = form.find_element(By.CSS_SELECTOR, "button[type=submit]")
    old = chromium.find_element(By.TAG_NAME, "html")
    button.send_keys("\n")
    WebDriverWait(chromium, PAGE_WAIT_S).until(lambda b: old != b.find_element(By.TAG_NAME, "html"))


def fill(form, **values) -> None:
    for name, value in values.items():
        box = form.find_element(By.NAME, name)
        box.clear()
        box.send_keys(value)


def orthogonal_to(*vectors: np.ndarray) -> np.ndarray:
    """A random unit vector orthogonal to every one of `vectors`."""
    q, _ = np.linalg.qr(np.stack(vectors, axis=1).astype(np.float64))
    r = np.random.default_rng(len(vectors)).standard_normal(DIM)  # another draw for each count of vectors
    r -= q @ (q.T @ r)
    return (r / np.linalg.norm(r)).astype(np.float32)


def with_cos(v: np.ndarray, c: float, away: np.ndarray) -> np.ndarray:
    """A unit window whose cosine to `v` is `c` (the rest along `away`, orthogonal to v)."""
    return (c * v + np.sqrt(1 - c * c) * away).astype(np.float32)


# ----- Device timeline -----------------------------------------------------------------------------------


def test_the_timeline_draws_each_query_its_threshold_and_the_events(server, client, console, chromium, tmp_path):
    dog = save_query(client, Query("a dog barking", "audio", MATCH, MODEL, decision=ONE_SHOT))
    glass = save_query(client, Query("glass breaking", "audio", basis(3), MODEL, decision=Decision(threshold=0.7)))
    write(client, "dev", [QUIET, MATCH, MATCH, QUIET, basis(3), QUIET])
    settle(matcher(server))
    (event,) = list_events(client, device="dev")[0]
    assert event.query == dog.id

    chromium.get(f"{console}/devices/dev/timeline?since=1h")
    assert status(chromium) == 200
    plot = "return window.bindstreamTimeline && window.bindstreamTimeline.series.length"
    assert WebDriverWait(chromium, PAGE_WAIT_S).until(lambda b: b.execute_script(plot)) == 3  # x + one per query
    assert chromium.find_elements(By.CSS_SELECTOR, "#timeline-chart canvas")
    labels = chromium.execute_script("return window.bindstreamTimeline.series.slice(1).map(s => s.label)")
    assert labels == ["a dog barking (audio; threshold 0.5)", "glass breaking (audio; threshold 0.7)"]
    drawn = chromium.execute_script("return window.bindstreamTimeline.data")
    assert drawn[0] == [0, 2, 4, 6, 8, 10]  # device seconds from the first window
    assert [round(y, 3) for y in drawn[1]] == [0, 1, 1, 0, 0, 0] and round(drawn[2][4], 3) == 1
    assert chromium.find_element(By.LINK_TEXT, event.id).get_attribute("href").endswith(f"/events/{event.id}")
    shot(chromium, tmp_path, "timeline")

    data = requests.get(f"{console}/devices/dev/timeline.json", params={"since": "1h"}, timeout=PAGE_WAIT_S).json()
    assert [(q["id"], q["threshold"], q["windows"]) for q in data["queries"]] == [(dog.id, 0.5, 6), (glass.id, 0.7, 6)]
    assert [(e["id"], e["start_s"], e["end_s"]) for e in data["events"]] == [(event.id, 2.0, 6.0)]

    chromium.find_element(By.LINK_TEXT, "5m").send_keys("\n")
    WebDriverWait(chromium, PAGE_WAIT_S).until(lambda b: b.current_url.endswith("?since=5m"))
    chromium.get(f"{console}/devices/dev/timeline?since=soon")
    assert (status(chromium), problem_line(chromium)) == (
        400,
        "since: cannot read the duration 'soon'; write e.g. 30s, 10m, 2h or 1d",
    )
    chromium.get(f"{console}/devices/nobody/timeline")
    assert status(chromium) == 404 and "no device 'nobody'" in problem_line(chromium)
    chromium.get(f"{console}/timeline")
    chromium.find_element(By.LINK_TEXT, "dev").send_keys("\n")
    WebDriverWait(chromium, PAGE_WAIT_S).until(lambda b: b.current_url.endswith("/devices/dev/timeline"))
    assert fits_a_phone(chromium, f"{console}/devices/dev/timeline?since=1h", tmp_path, "timeline")


# ----- Queries -------------------------------------------------------------------------------------------


def test_a_query_added_by_text_on_the_page_is_used_by_the_matcher(server, client, console, chromium, tmp_path):
    m = matcher(server)
    settle(m)
    chromium.get(f"{console}/queries")
    assert "RANDOM weights" in chromium.find_element(By.ID, "add").find_element(By.XPATH, "following-sibling::p").text
    form = chromium.find_element(By.CSS_SELECTOR, "form.add-query")
    fill(form, text="a dog barking", k="1", n="1", cooldown_s="0", notify=SINK)
    shot(chromium, tmp_path, "queries-add")
    submit(chromium, form)
    assert "/queries?added=" in chromium.current_url and status(chromium) == 200
    (query_id,) = [i.decode() for i in client.smembers(QUERY_SET)]
    q = load_query(client, query_id)
    assert (q.text, q.modality, q.device, q.source, q.model, q.notify) == (
        "a dog barking",
        "audio",
        "*",
        "text",
        MODEL,
        (SINK,),
    )
    assert (q.decision.k, q.decision.n, q.decision.cooldown_s, q.decision.threshold) == (1, 1, 0.0, 0.5)
    row = chromium.find_element(By.ID, f"q-{query_id}")
    assert "a dog barking" in row.text and "1 of 1" in row.text and "json://127.0.0.1:9/hook" in row.text
    shot(chromium, tmp_path, "queries")

    write(client, "dev", [QUIET, q.emb, q.emb, QUIET])  # windows that match tiny's vector of the text

    def raised():  # the matcher finds the new stream at its next discovery (every discover_s) and reloads queries
        settle(m)
        return list_events(client, query=query_id)[0]

    events = wait_for(raised, WAIT_S, "the page's query to raise an event")
    assert [(e.device, e.windows, e.start_ns) for e in events] == [("dev", 2, WINDOW_S * SECOND)]
    assert fits_a_phone(chromium, f"{console}/queries", tmp_path, "queries")


def test_uploads_are_type_checked_and_size_limited(server, client, console, chromium, tmp_path):
    chromium.get(f"{console}/queries")
    form = chromium.find_element(By.CSS_SELECTOR, "form.add-query")
    broken = tmp_path / "crying.wav"
    broken.write_bytes(b"RIFF" + bytes(range(256)) * 8)  # not a WAV libsndfile decodes
    fill(form, text="a baby crying")
    form.find_element(By.CSS_SELECTOR, "input[name=source][value=example]").click()
    form.find_element(By.NAME, "file").send_keys(str(broken))
    submit(chromium, form)
    assert status(chromium) == 400
    assert problem_line(chromium).startswith("file: crying.wav does not load as audio: not audio that libsndfile")
    shot(chromium, tmp_path, "queries-bad-upload")
    assert not client.smembers(QUERY_SET)  # nothing stored

    clip = tmp_path / "chirp.wav"
    t = np.arange(32_000) / 16_000
    soundfile.write(clip, (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16_000)
    vector = tmp_path / "v.npy"
    np.save(vector, np.arange(DIM, dtype=np.float32) + 1)
    short = tmp_path / "short.npy"
    np.save(short, np.ones(DIM - 1, np.float32))
    for path, source, expect in ((clip, "example", "example:chirp.wav"), (vector, "vector", "vector:v.npy")):
        chromium.get(f"{console}/queries")
        form = chromium.find_element(By.CSS_SELECTOR, "form.add-query")
        fill(form, text=f"like {path.name}")
        form.find_element(By.CSS_SELECTOR, f"input[name=source][value={source}]").click()
        form.find_element(By.NAME, "file").send_keys(str(path))
        submit(chromium, form)
        assert status(chromium) == 200
        assert expect in chromium.find_element(By.CSS_SELECTOR, "table").text
    stored = {q.source: q for q in map(lambda i: load_query(client, i.decode()), client.smembers(QUERY_SET))}
    assert set(stored) == {"example:chirp.wav", "vector:v.npy"} and stored["vector:v.npy"].by_example
    np.testing.assert_allclose(stored["vector:v.npy"].emb, np.load(vector) / np.linalg.norm(np.load(vector)), rtol=1e-6)

    def post(url: str, source: str, path: Path):
        with path.open("rb") as f:
            files = {"file": (path.name, f)}
            return requests.post(url, data={"text": "x", "source": source}, files=files, timeout=PAGE_WAIT_S)

    answer = post(f"{console}/queries", "vector", short)
    assert answer.status_code == 400 and f"short.npy has {DIM - 1} dimensions; the model embeds in {DIM}" in answer.text
    big = tmp_path / "big.wav"
    soundfile.write(big, np.zeros(80_000, np.float32), 16_000)  # 160 kB: more than the file and form bounds together
    bounds = ConsoleSettings(max_upload_bytes=1000)  # the clip (64 kB) fits the form's bound, not the file's
    small = ConsoleServer(create_app(server.url, model=MODEL, settings=bounds), "127.0.0.1", 0).start()
    try:
        answer = post(f"{small.url}/queries", "example", clip)
        assert (answer.status_code, problem_text(answer)) == (413, "chirp.wav is larger than 1,000 bytes")
        answer = post(f"{small.url}/queries", "example", big)
        assert answer.status_code == 413 and problem_text(answer).endswith("; a file may have 1,000 bytes")
    finally:
        small.stop()
    assert len(client.smembers(QUERY_SET)) == 2


def test_editing_a_query_takes_effect_in_redis_and_bad_values_name_the_setting(
    server, client, console, chromium, tmp_path
):
    q = save_query(client, Query("a dog barking", "audio", MATCH, MODEL, notify=(SINK,)))
    chromium.get(f"{console}/queries/{q.id}")
    form = chromium.find_element(By.CSS_SELECTOR, f"form[action='/queries/{q.id}']")
    fill(form, threshold="0.8", k="3", n="5", cooldown_s="12", hysteresis="0.3")
    shot(chromium, tmp_path, "query")
    submit(chromium, form)
    assert status(chromium) == 200 and chromium.current_url.endswith(f"/queries/{q.id}?saved=1")
    d = load_query(client, q.id).decision
    assert (d.threshold, d.k, d.n, d.cooldown_s, d.hysteresis) == (0.8, 3, 5, 12.0, 0.3)
    assert load_query(client, q.id).notify == (SINK,)  # kept: its box was ticked

    for field, value, expect in (
        ("threshold", "1.5", "threshold 1.5 must lie strictly between 0 and 1 (a softmax share)"),
        ("k", "two", "k: 'two' is not an integer"),
        ("hysteresis", "0.9", "hysteresis 0.9 must lie in [0, threshold=0.8)"),
    ):
        chromium.get(f"{console}/queries/{q.id}")
        form = chromium.find_element(By.CSS_SELECTOR, f"form[action='/queries/{q.id}']")
        fill(form, **{field: value})
        submit(chromium, form)
        assert status(chromium) == 400 and problem_line(chromium).startswith(expect)
    assert load_query(client, q.id).decision == d

    chromium.get(f"{console}/queries/{q.id}")
    form = chromium.find_element(By.CSS_SELECTOR, f"form[action='/queries/{q.id}']")
    form.find_element(By.CSS_SELECTOR, f"input[name=keep][value='{sink_id(SINK)}']").click()  # untick: drop it
    fill(form, notify="ntfy://example.invalid/topic")
    submit(chromium, form)
    assert load_query(client, q.id).notify == ("ntfy://example.invalid/topic",)
    chromium.get(f"{console}/queries/nothere")
    assert status(chromium) == 404 and problem_line(chromium) == "no query 'nothere' (see the Queries page)"

    chromium.get(f"{console}/queries")
    submit(chromium, chromium.find_element(By.CSS_SELECTOR, f"#q-{q.id} form"))  # Remove
    assert not client.sismember(QUERY_SET, q.id) and f"Removed query {q.id}" in chromium.page_source


def test_tune_from_reviews_fits_the_threshold_or_says_why_not(server, client, console, chromium, tmp_path):
    q = save_query(client, Query("a dog barking", "audio", MATCH, MODEL, decision=ONE_SHOT))
    peaks = {"a": 0.95, "b": 0.9, "c": 0.7, "d": 0.6}
    events = {device: raise_event(server, client, q, device, share_window(p)) for device, p in peaks.items()}
    chromium.get(f"{console}/queries/{q.id}")
    submit(chromium, chromium.find_element(By.CSS_SELECTOR, f"form[action='/queries/{q.id}/tune']"))
    assert status(chromium) == 409
    assert problem_line(chromium) == (
        f"query {q.id}: tuning needs at least 2 confirmed and 2 false-positive events; it has 0 and 0 "
        "(review its events on the Events page)"
    )
    for device in "ab":
        set_review(client, events[device].id, CONFIRMED)
    for device in "cd":
        set_review(client, events[device].id, FALSE_POSITIVE)
    chromium.get(f"{console}/queries/{q.id}")
    submit(chromium, chromium.find_element(By.CSS_SELECTOR, f"form[action='/queries/{q.id}/tune']"))
    assert status(chromium) == 200
    threshold = load_query(client, q.id).decision.threshold
    assert peaks["d"] < threshold < peaks["a"]  # between a false positive and a confirmed peak (one of each held out)
    splits = [row.find_element(By.TAG_NAME, "td").text for row in chromium.find_elements(By.CSS_SELECTOR, "tbody tr")]
    assert splits == ["train", "held out", "held out, old threshold"]
    assert f"→ {threshold:.4g}" in chromium.find_element(By.CSS_SELECTOR, "[role=status]").text
    shot(chromium, tmp_path, "tuned")


# ----- Search --------------------------------------------------------------------------------------------


def test_search_ranks_the_stored_windows_and_links_the_covering_event(server, client, console, chromium, tmp_path):
    from streaming.alerts.prompts import ensemble
    from streaming.cli.options import load_encoder

    v = ensemble(load_encoder(MODEL, None), ["a dog barking"], "audio")[0]  # what the page embeds the text to
    background = [basis(i) for i in range(1, 9)]
    away = orthogonal_to(v, *background)
    other = orthogonal_to(v, away, *background)
    write(client, "dev", [with_cos(v, c, away) for c in (0.2, 0.9, 0.5, 0.7)], start_s=100)
    write(client, "other", [with_cos(v, 0.3, other), QUIET])  # the first window scores ~1 for a query `other`
    save_query(client, Query("a bark", "audio", other, MODEL, device="other", decision=ONE_SHOT))
    settle(matcher(server))
    (event,) = list_events(client)[0]  # on `other`'s first window; QUIET ends it

    chromium.get(f"{console}/search")
    form = chromium.find_element(By.CSS_SELECTOR, "form[role=search]")
    fill(form, text="a dog barking", top="5")
    Select(form.find_element(By.NAME, "modality")).select_by_visible_text("audio")
    submit(chromium, form)
    assert status(chromium) == 200
    rows = [
        [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
        for tr in chromium.find_elements(By.CSS_SELECTOR, "table.results tbody tr")
    ]
    assert [r[0] for r in rows] == ["1", "2", "3", "4", "5"]
    assert [(r[4], r[6]) for r in rows] == [  # ranked by score against the text: cosines 0.9, 0.7, 0.5, 0.3, 0.2
        ("dev", "102.0 – 104.0"),
        ("dev", "106.0 – 108.0"),
        ("dev", "104.0 – 106.0"),
        ("other", "0.0 – 2.0"),
        ("dev", "100.0 – 102.0"),
    ]
    scores = [float(r[1]) for r in rows]
    assert scores == sorted(scores, reverse=True) and [round(float(r[2]), 2) for r in rows] == [0.9, 0.7, 0.5, 0.3, 0.2]
    assert [r[7] for r in rows] == ["no event"] * 3 + ["event: a bark", "no event"]
    link = chromium.find_element(By.LINK_TEXT, "event: a bark").get_attribute("href")
    assert link.endswith(f"/events/{event.id}") and (event.device, event.start_ns) == ("other", 0)
    shot(chromium, tmp_path, "search")
    assert fits_a_phone(chromium, chromium.current_url, tmp_path, "search")

    chromium.get(f"{console}/search?text=x&top=0")
    assert status(chromium) == 400 and problem_line(chromium) == "top: '0' is not a whole number from 1 to 1000"
    chromium.get(f"{console}/search?text=x&modality=smell")
    assert status(chromium) == 400 and problem_line(chromium).startswith("modality: 'smell' is not one of all, vision")

    clip = tmp_path / "chirp.wav"
    t = np.arange(32_000) / 16_000
    soundfile.write(clip, (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16_000)
    chromium.get(f"{console}/search")
    chromium.find_element(By.TAG_NAME, "summary").click()
    form = chromium.find_element(By.CSS_SELECTOR, "form[enctype='multipart/form-data']")
    form.find_element(By.NAME, "file").send_keys(str(clip))
    Select(form.find_element(By.NAME, "modality")).select_by_visible_text("audio")
    submit(chromium, form)
    assert status(chromium) == 200 and "Results like chirp.wav" in chromium.find_element(By.TAG_NAME, "h2").text
    assert len(chromium.find_elements(By.CSS_SELECTOR, "table.results tbody tr")) == 6  # every stored audio window
    shot(chromium, tmp_path, "search-example")
    assert stream_key("dev", "audio") in {k.decode() for k in client.keys("bindstream:emb:*")}
