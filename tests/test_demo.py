"""`bindstream demo` shows the event path end to end (issue 12): every simulated wearable's mic plays a chirp
burst at known device times; the demo adds that burst as an example query of the `tiny` model (RANDOM weights:
the event is found by similarity to the example clip, not by understanding), its notifications reach the demo's
own local HTTP endpoint, and one event's evidence is saved as files.

The demo runs as a real process with a real local Ray, a real redis-server (its own, kept for the test to read
the events back) and real ZeroMQ wearables."""

import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import redis
import soundfile

from sensors.simulator import AUDIO_FULL_SCALE, MIC_CHUNK, MIC_RATE, ChirpBursts, SimulatedWearable
from streaming.alerts.events import list_events
from streaming.cli.demo import DemoEventSettings
from streaming.redis_layout import ENDED, QUERY_EVENT, Event
from streaming.redis_server import RedisServer

BINDSTREAM = [sys.executable, "-c", "from streaming.cli import main; main()"]
DEVICES = ("sim-000", "sim-001")
BURSTS = ChirpBursts()
DEMO_S = BURSTS.first_s + BURSTS.seconds + DemoEventSettings().end_margin_s  # one burst per wearable, and its end
QUERY_TEXT = "demo chirp burst"


def mic(wearable: SimulatedWearable, seconds: float) -> np.ndarray:
    """The wearable's first `seconds` of mic samples, int16 as sent."""
    chunks = round(seconds * MIC_RATE / MIC_CHUNK)
    return np.concatenate([np.frombuffer(wearable.mic(k), "<i2") for k in range(chunks)]).astype(np.int64)


def test_every_wearable_plays_the_bursts_over_its_background_at_known_times_only():
    bursts, seconds = ChirpBursts(first_s=1.0, every_s=4.0), 10.0
    t = np.arange(round(seconds * MIC_RATE)) / MIC_RATE
    assert bursts.starts(seconds) == [1.0, 5.0, 9.0]
    on = np.zeros(len(t), bool)
    for start in bursts.starts(seconds):
        on[round(start * MIC_RATE) : round((start + bursts.seconds) * MIC_RATE)] = True
    assert np.abs(bursts.sound(t[on])).mean() > 0.25  # a loud sound (amplitude 0.5) while on ...
    assert not bursts.sound(t[~on]).any()  # ... and silence between bursts
    for device in DEVICES:
        heard = mic(SimulatedWearable(device, seed=0, start_ns=0, bursts=bursts), seconds)
        background = mic(SimulatedWearable(device, seed=0, start_ns=0, bursts=ChirpBursts(first_s=1000.0)), seconds)
        added = heard - background
        assert not added[~on].any()  # between bursts the mic is what it was: the background alone
        # during a burst, the burst is added (rounding to int16 moves a sample by at most one step)
        np.testing.assert_allclose(added[on], bursts.sound(t[on]) * AUDIO_FULL_SCALE, atol=1.01)
        # the clip the demo writes is what each burst adds
        first = round(bursts.first_s * MIC_RATE)
        clip = added[first : first + round(bursts.seconds * MIC_RATE)] / AUDIO_FULL_SCALE
        np.testing.assert_allclose(clip, bursts.clip(), atol=1.01 / AUDIO_FULL_SCALE)


def burst_correlation(audio: np.ndarray) -> np.ndarray:
    """Per sample offset, the normalised correlation of `audio` with one sweep of the burst (a burst repeats
    its sweep, so any whole sweep of it matches)."""
    n = round(BURSTS.sweep_s * MIC_RATE)
    sweep = BURSTS.clip()[MIC_RATE // 10 : MIC_RATE // 10 + n]  # past the fade-in
    windows = np.lib.stride_tricks.sliding_window_view(audio.astype(np.float64), n)
    return windows @ sweep / (np.linalg.norm(windows, axis=1) * np.linalg.norm(sweep) + 1e-12)


@pytest.mark.timeout(300)
def test_demo_finds_each_burst_notifies_its_local_endpoint_and_saves_the_evidence():
    with RedisServer() as server:
        done = subprocess.run(
            [*BINDSTREAM, "demo", "--seconds", f"{DEMO_S:g}", "--devices", str(len(DEVICES)), "--redis", server.url],
            capture_output=True,
            text=True,
            timeout=240,
        )
        out = done.stdout
        assert done.returncode == 0, out[-4000:] + done.stderr[-4000:]
        events = [e for e in list_events(redis.Redis.from_url(server.url))[0] if e.kind == QUERY_EVENT]
    folder = re.search(r"example:(\S+)/chirp\.wav", out)
    assert folder, out
    try:
        check_demo_output(out, events)
    finally:
        shutil.rmtree(folder[1])  # the demo keeps its folder (the clip, the saved evidence) for its user


def check_demo_output(out: str, events: list[Event]) -> None:
    assert "RANDOM weights" in out
    assert (
        "random weights + an example query: the event is found by similarity to the example clip, not by understanding"
        in out
    )
    assert "chirp burst at 35 s of its stream" in out

    # one event per burst on every wearable, each ended: the example query fired on the bursts and nowhere else
    assert sorted(e.device for e in events) == list(DEVICES), out
    assert all(e.state == ENDED and e.query_text == QUERY_TEXT for e in events)
    started = {
        m["event"]: (m["device"], float(m["t0"]), float(m["t1"]))
        for m in re.finditer(
            rf"event start\s+(?P<device>\S+)\s+'{QUERY_TEXT}'\s+score \S+\s+(?P<t0>[\d.]+)-(?P<t1>[\d.]+) s of "
            r"its stream\s+event (?P<event>\w+)",
            out,
        )
    }
    assert set(started) == {e.id for e in events}, out
    for e in events:
        device, t0, t1 = started[e.id]
        assert device == e.device
        assert t0 < BURSTS.first_s + BURSTS.seconds and t1 > BURSTS.first_s  # the window that opened it hears the burst
        assert re.search(rf"event end\s+{e.device}\s+'{QUERY_TEXT}'.*event {e.id}", out), out

    # the demo's endpoint got the start and the end of every event (updates: one per new peak, any number)
    received = re.search(r"received (\d+) notifications: (\d+) start, (\d+) update, (\d+) end \((\d+) repeated", out)
    assert received, out
    assert int(received[2]) == int(received[4]) == len(events)
    assert f"{len(events)} of {len(events)} events have their start and end" in out

    # one event's evidence, saved as `bindstream event show ID --save DIR` saves it: its audio holds the burst
    saved = re.search(r"evidence of event (\w+) \((\S+), [\d.]+-[\d.]+ s of its stream\) saved to (\S+);", out)
    assert saved and saved[1] in {e.id for e in events}, out
    audio, rate = soundfile.read(f"{saved[3]}/audio.wav", dtype="float32")
    assert rate == MIC_RATE and audio.ndim == 1
    correlation = burst_correlation(audio)
    # it opens with >= 1 s of background (the pre-roll before a window that hears the burst), then the burst
    assert correlation[:MIC_RATE].max() < 0.5
    assert correlation.max() > 0.8
