"""Activity gating (streaming/gating.py): the gate's decision per modality and its bounds, on synthetic model
inputs and on the simulator's `day` and `steady` profiles; the repeated embedding filled in stream order by real
embedder and publisher actors (real local Ray, a real redis-server), fused windows included; the `reused` field
in Redis; and that the matcher's events on the simulator's chirp burst are the same with gating on and off.

The `tiny` model has RANDOM weights (a fixed seed): its embeddings mean nothing, but they are deterministic, which
is all a comparison of gating on and off needs; the chirp is found by similarity to an example clip of it.
"""

from __future__ import annotations

import dataclasses
import uuid

import msgpack
import numpy as np
import pytest
import redis
import torch
import zmq
from rich.console import Console

import encoders
from encoders import transforms
from sensors.protocol import decode
from sensors.simulator import MIC_RATE, PROFILES, ChirpBursts, SimulatedWearable
from streaming.alerts.matcher import Matcher, MatcherSettings
from streaming.alerts.queries import ensure_background, save_query
from streaming.alerts.records import Calibration, Query
from streaming.dashboard import per_modality_table
from streaming.embedder import Embedder, EmbedderSettings
from streaming.gating import Gate, GatingSettings, Repeats
from streaming.pipeline import ConfigError, Pipeline, PipelineConfig
from streaming.publisher import FusedWindows, Publisher, PublisherSettings
from streaming.records import FUSED, FUSED_MODALITIES, NO_DATA, Embedding, Window
from streaming.redis_layout import (
    ALERTS_STREAM,
    END,
    START,
    UPDATE,
    Alert,
    BadRecord,
    decode_embedding,
    encode_embedding,
    stream_key,
)
from streaming.redis_server import RedisServer
from streaming.stage import Counts, NamedActor, StageMetrics
from streaming.subscriber import read_all
from streaming.windowing import REPLAY, SECOND, Windower, WindowingConfig, rms_dbfs

from .conftest import wait_for

DEVICE = "dev"
# one device's data windowed as fast as it comes may spend the windowing stage's CPU at will (not throttled)
UNTHROTTLED = WindowingConfig(device_cpu_share=100.0, device_cpu_burst_s=100.0)


def window(modality: str, t0_s: float, data: np.ndarray, epoch: int = 0, dbfs: float | None = None) -> Window:
    t0 = int(t0_s * SECOND)
    data = data if data.dtype == np.uint8 else np.asarray(data, np.float32)  # uint8: vision's levels, as they travel
    return Window(DEVICE, modality, t0, t0 + 2 * SECOND, data, 0, epoch=epoch, dbfs=dbfs)


def passes(gate: Gate, windows: list[Window]) -> list[float | None]:
    """What the gate makes of each window in turn: None (embedded) or the t0 it repeats, in seconds."""
    out = []
    for w in windows:
        checked = gate.check(w)
        assert (checked.reuses is None) == (checked is w)
        assert checked.reuses is None or checked.data.size == 0  # a gated window leaves its tensor behind
        out.append(None if checked.reuses is None else checked.reuses / SECOND)
    return out


# ----- model inputs: a still scene and a change, per modality ---------------------------------------------

RNG = np.random.default_rng(0)
SCENE = RNG.normal(0, 1, (3, 2, 224, 224)).astype(np.float32)  # a frame of anything, in model-input units


def frames(modality: str, moved: bool, noise_seed: int) -> np.ndarray:
    """The scene with fresh sensor noise (0.05 per pixel), and with `moved` a 48 x 48 object shifted in the
    second frame: 9 cells of 196 change by about 1 unit."""
    scene = SCENE if modality == "vision" else SCENE[:1, 0]
    x = scene + np.random.default_rng(noise_seed).normal(0, 0.05, scene.shape).astype(np.float32)
    if moved:
        x[..., -1 if modality == "vision" else 0, 100:148, 100:148] += 1.0
    return x if modality == "vision" else x[None, 0] if x.ndim == 3 else x


def as_levels(x: np.ndarray) -> np.ndarray:
    """Vision model input -> the uint8 RGB levels vision windows travel as (the encoder normalises them)."""
    mean, std = (np.array(v, np.float32).reshape(3, 1, 1, 1) for v in (transforms.CLIP_MEAN, transforms.CLIP_STD))
    return np.clip(np.round((x * std + mean) * 255), 0, 255).astype(np.uint8)


def test_vision_levels_are_compared_in_model_input_units():
    """The gate's thresholds are in model-input units: a window's 8-bit levels and the model input they make
    are the same content to it."""
    levels = as_levels(frames("vision", True, 3))
    model_input = transforms.model_input("vision", torch.from_numpy(levels[None]))[0].numpy()
    (pooled,), (expected,) = (Gate()._signature(window("vision", 0, x)) for x in (levels, model_input))
    np.testing.assert_allclose(pooled, expected, atol=1e-5)


def audio(kind: str, seed: int) -> tuple[np.ndarray, float]:
    """(model input, dBFS) of 2 s of mic: a quiet room, a tone with noise, or another tone."""
    t = np.arange(2 * MIC_RATE) / MIC_RATE
    noise = np.random.default_rng(seed).normal(0, 1, t.size)
    samples = {
        "quiet": 0.0005 * noise,
        "tone": 0.3 * np.sin(2 * np.pi * 440 * t) + 0.01 * noise,
        "other tone": 0.3 * np.sin(2 * np.pi * 880 * t) + 0.01 * noise,
    }[kind].astype(np.float32)
    return transforms.audio_tensor(samples[None], MIC_RATE).numpy(), rms_dbfs(samples[:, None])


def imu(kind: str, seed: int) -> np.ndarray:
    """5 s of IMU at 800 Hz as model input: standing still, still but turned on its side, or walking."""
    t = np.arange(5 * 800) / 800
    rows = np.random.default_rng(seed).normal(0, [0.04] * 3 + [0.005] * 3, (t.size, 6))
    rows[:, 0 if kind == "on its side" else 2] += 9.81
    if kind == "walking":
        rows[:, 2] += 1.5 * np.sin(2 * np.pi * 1.8 * t)
        rows[:, 3] += 0.25 * np.sin(np.pi * 1.8 * t)
    return transforms.imu_tensor(rows.astype(np.float32), 800).numpy()


def pair(modality: str, change: str) -> tuple[Window, Window]:
    """An embedded window and one 1 s later, unchanged (`same`) or changed in the modality's way."""
    if modality in ("vision", "depth", "thermal"):
        moved = change != "same"
        first, then = frames(modality, False, 1), frames(modality, moved, 2)
        if modality == "vision":
            first, then = as_levels(first), as_levels(then)
        return window(modality, 0, first), window(modality, 1, then)
    if modality == "imu":
        first = "walking" if change == "from walking" else "still"
        then = {"same": "still", "from walking": "still"}.get(change, change)
        return window("imu", 0, imu(first, 1)), window("imu", 2.5, imu(then, 2))
    first, then = {"same": ("quiet", "quiet"), "steady tone": ("tone", "tone")}.get(change, ("tone", "quiet"))
    if change == "tone changed":
        first, then = "tone", "other tone"
    (a, a_db), (b, b_db) = audio(first, 1), audio(then, 2)
    return window("audio", 0, a, dbfs=a_db), window("audio", 1, b, dbfs=b_db)


@pytest.mark.parametrize(
    "modality, change, gated",
    [
        ("vision", "same", True),
        ("vision", "moved", False),
        ("depth", "same", True),
        ("depth", "moved", False),
        ("thermal", "same", True),
        ("thermal", "moved", False),
        ("audio", "same", True),  # a quiet room after a quiet room
        ("audio", "steady tone", True),  # loud, but the same spectrum
        ("audio", "tone changed", False),
        ("audio", "quiet after loud", False),  # never repeat a loud window for a quiet one
        ("imu", "same", True),  # standing still
        ("imu", "on its side", False),  # still, but gravity points elsewhere
        ("imu", "walking", False),
        ("imu", "from walking", False),  # still after walking: the walk is not repeated
    ],
)
def test_the_gate_repeats_unchanged_windows_and_embeds_changed_ones(modality, change, gated):
    first, then = pair(modality, change)
    assert passes(Gate(), [first, then]) == [None, first.t0 / SECOND if gated else None]


def test_the_gate_compares_with_the_last_embedded_window_so_a_slow_drift_is_caught():
    """Each window brightens an object by 0.08, under the cell threshold (0.2) from one window to the next:
    the gate compares with the last embedded window, so the third step is a change."""
    x = frames("vision", False, 1)
    drift = []
    for i in range(6):
        y = x.copy()
        y[..., 100:148, 100:148] += 0.08 * i
        drift.append(window("vision", i, y))
    assert passes(Gate(), drift) == [None, 0, 0, None, 3, 3]


def test_a_run_of_repeats_is_bounded_and_never_crosses_an_epoch():
    still = [window("thermal", i, frames("thermal", False, i)) for i in range(35)]
    out = passes(Gate(GatingSettings(max_reuse_s=10)), still)
    assert out == [None] + [0] * 9 + [None] + [10] * 9 + [None] + [20] * 9 + [None] + [30] * 4
    restarted = [window("thermal", 0, frames("thermal", False, 1)), window("thermal", 1, frames("thermal", False, 2))]
    restarted.append(dataclasses.replace(restarted[1], t0=2 * SECOND, t1=4 * SECOND, epoch=1))
    restarted.append(dataclasses.replace(restarted[1], t0=0, t1=2 * SECOND, epoch=1))  # its clock starts anew
    assert passes(Gate(), restarted) == [None, 0, None, None]


def test_gating_off_embeds_every_window_and_bad_settings_are_refused():
    still = [window("depth", i, frames("depth", False, i)) for i in range(5)]
    assert passes(Gate(GatingSettings(enabled=False)), still) == [None] * 5
    config = PipelineConfig.from_dict({"gating": {"enabled": False, "max_reuse_s": 10}})
    assert config.gating == GatingSettings(enabled=False, max_reuse_s=10)
    for bad, why in [
        ({"enabled": "no"}, "true or false"),
        ({"max_reuse_s": 0}, "above 0"),
        ({"cell_px": 2.5}, "an integer"),
        ({"changed_cells": 1}, "share"),
        ({"tilt": float("nan")}, "finite"),
        ({"cel_px": 8}, "did you mean 'cell_px'"),
    ]:
        with pytest.raises(ConfigError, match=why):
            PipelineConfig.from_dict({"gating": bad})


def simulated_windows(profile: str, seconds: float) -> list[tuple[Window, int | None]]:
    """The windows of `seconds` of sim-000 (seed 0) with the profile, each with what the gate makes of it."""
    wearable = SimulatedWearable("sim-000", 0, start_ns=0, profile=PROFILES[profile])
    windower, gate, out = Windower(UNTHROTTLED), Gate(), []
    for header, payload in wearable.messages(seconds):
        out += [(w, gate.check(w).reuses) for w in windower.add(decode([msgpack.packb(header), payload]))]
    return out


def test_the_day_profile_is_gated_in_its_quiet_stretches_and_embedded_at_its_events():
    """sim-000's day: the wearer walks until 2.6 s, the scene moves from 9.7 to 15.7 s, the room is quiet."""
    wearable = SimulatedWearable("sim-000", 0, profile=PROFILES["day"])
    assert (wearable._motion_shift, wearable._walk_shift) == pytest.approx((2.29, 9.36), abs=0.01)
    embedded: dict[str, list[float]] = {}
    for w, reuses in simulated_windows("day", 19):
        if reuses is None:
            embedded.setdefault(w.modality, []).append(w.t0 / SECOND)
    for modality in ("vision", "depth", "thermal"):  # windows sampling a frame in 9.7..15.7 s, and the first
        assert set(embedded[modality]) - {0} <= set(range(9, 17)), modality
        assert set(range(10, 15)) <= set(embedded[modality]), modality
    assert embedded["audio"] == [0]  # a quiet room throughout (the chirp of the default bursts plays at 35 s)
    assert embedded["imu"] == [0, 2.5]  # walking until 2.6 s, then still


def test_the_steady_profile_is_never_gated():
    windows = simulated_windows("steady", 8)
    assert len(windows) == 4 * 7 + 2  # every window cut: 2 s ones every 1 s, IMU's 5 s ones every 2.5 s
    assert all(reuses is None for _, reuses in windows)


def test_the_summary_shows_per_modality_the_windows_gated_and_the_forwards_run():
    stats = {
        "window": [{"counts": {"out": {"vision": 10, "imu": 4}, "gated": {"vision": 7}}}],
        "embed": [{"counts": {"out": {"vision": 10, "imu": 4}, "reused": {"vision": 7}}}],
        "publish": [{"counts": {"out": {"vision": 10, "imu": 4, "fused": 10}}}],
    }
    console = Console(width=200, record=True)
    console.print(per_modality_table(stats))
    rows = {line.split()[1]: line.split()[2:] for line in console.export_text().splitlines() if line.startswith("│")}
    assert [x for x in rows["vision"] if x != "│"] == ["10", "7", "3", "10"]  # windows, gated, embedded, published
    assert [x for x in rows["imu"] if x != "│"] == ["4", "0", "4", "4"]
    assert [x for x in rows["fused"] if x != "│"] == ["-", "-", "-", "10"]


# ----- the repeated embedding: in stream order, or dropped (counted), never another one ------------------


def embedding(modality: str, t0_s: int, vector, epoch: int = 0, reused: int | None = None) -> Embedding:
    t0 = t0_s * SECOND
    emb = NO_DATA if vector is None else np.asarray(vector, np.float32)
    return Embedding(DEVICE, modality, t0, t0 + 2 * SECOND, emb, "tiny", 0, 0, epoch=epoch, reused=reused)


def test_repeats_put_a_gated_window_after_the_window_it_repeats_with_its_vector():
    a, b = np.eye(4, dtype=np.float32)[:2]
    repeats = Repeats(max_streams=2, keep=2, wait_s=5, max_waiting=2)
    assert repeats.take(embedding("audio", 1, None, reused=0), now=0) == ([], [])  # ahead of its window: waits
    ready, _ = repeats.take(embedding("audio", 0, a), now=1)
    assert [(e.t0, e.reused) for e in ready] == [(0, None), (SECOND, 0)] and (ready[1].emb == a).all()
    (filled,), _ = repeats.take(embedding("audio", 2, None, reused=0), now=2)
    assert filled.reused == 0 and (filled.emb == a).all()
    for t0_s in (3, 4):  # two newer embedded windows: with keep 2, the one of 0 s goes
        repeats.take(embedding("audio", t0_s, b), now=2)
    assert repeats.take(embedding("audio", 5, None, reused=0), now=3) == ([], [])
    assert repeats.expired(now=7.9) == [] and [e.t0 for e in repeats.expired(now=8)] == [5 * SECOND]  # in vain
    across = embedding("audio", 5, None, epoch=1, reused=3 * SECOND)  # never across a device's sessions
    assert repeats.take(across, now=10) == ([], [])
    repeats.take(dataclasses.replace(across, t0=6 * SECOND), now=11)
    _, gave_way = repeats.take(dataclasses.replace(across, t0=7 * SECOND), now=12)  # a third waits: the oldest goes
    assert [e.t0 for e in gave_way] == [5 * SECOND]
    assert [e.t0 for e in repeats.expired(now=12, all_of_them=True)] == [6 * SECOND, 7 * SECOND]
    repeats.take(embedding("vision", 0, a), now=13)
    repeats.take(embedding("depth", 0, a), now=13)  # a third stream: the least recently used (audio) goes
    assert repeats.take(embedding("audio", 6, None, reused=4 * SECOND), now=14) == ([], [])


def test_a_fused_window_repeats_only_when_all_its_members_repeat_the_last_fused_ones():
    vectors = dict(zip(FUSED_MODALITIES, np.eye(8, dtype=np.float32)))
    fused = FusedWindows(wait_s=60, remember=100, min_norm=1e-4, metrics=StageMetrics("test"))

    def moment(t0_s: int, embedded: tuple[str, ...], reused_from: int) -> Embedding:
        for m in FUSED_MODALITIES:
            e = embedding(m, t0_s, vectors[m] + (t0_s if m in embedded else reused_from) * vectors["vision"])
            fused.add(e if m in embedded else dataclasses.replace(e, reused=reused_from * SECOND))
        (out,) = fused.ready()
        assert out.modality == FUSED and out.members == FUSED_MODALITIES
        return out

    first = moment(0, FUSED_MODALITIES, 0)
    again = moment(1, (), 0)
    assert first.reused is None and again.reused == 0 and (again.emb == first.emb).all()
    assert moment(2, ("vision",), 0).reused is None  # mixed: summed as usual
    assert moment(3, (), 0).reused is None  # all repeat, but not what the last fused window summed


def test_reused_is_encoded_and_checked():
    e = embedding("vision", 5, np.eye(4)[0], reused=3 * SECOND)
    fields = encode_embedding(e)
    assert fields["reused"] == 3 * SECOND
    key = stream_key(DEVICE, "vision")
    assert decode_embedding(key, "1-0", fields).reused == 3 * SECOND
    assert "reused" not in encode_embedding(dataclasses.replace(e, reused=None))
    assert decode_embedding(key, "1-0", {k: v for k, v in fields.items() if k != "reused"}).reused is None
    for bad in (5 * SECOND, 6 * SECOND, -1):  # the t0 of an earlier window only
        with pytest.raises(BadRecord, match="reused"):
            decode_embedding(key, "1-0", {**fields, "reused": bad})


def test_a_restarted_publisher_reads_the_repeated_window_back_and_drops_what_never_came(server):
    first = Publisher(PublisherSettings(server.url))
    first.push([embedding("audio", 0, np.eye(64)[0])])
    first.drain()
    again = Publisher(PublisherSettings(server.url, repeat_wait_s=0.2))  # as Ray restarts it: holding nothing
    again.push([embedding("audio", 1, None, reused=0), embedding("audio", 3, None, reused=2 * SECOND)])
    final = again.drain()
    records = read_all(redis.Redis.from_url(server.url), DEVICE, "audio")
    assert [(r.t0 // SECOND, r.reused) for r in records] == [(0, None), (1, 0)]
    assert (records[1].emb == records[0].emb).all()
    assert Counts.of(final).get("dropped_reuse_missing", DEVICE) == 1  # the window of 2 s never came


def test_embedder_and_publisher_republish_in_stream_order(ray_local, server):
    """Gated windows pushed right behind the window they repeat, while it still waits in the embedder's batch,
    in one call and in the next: each entry follows the one it repeats, with its vector; a gated window whose
    window never came is dropped, counted; a moment whose members all repeat gives a repeating fused entry."""
    import ray

    prefix = uuid.uuid4().hex[:8]
    publisher = (
        ray.remote(Publisher).options(name=f"{prefix}-publish", num_cpus=0).remote(PublisherSettings(server.url))
    )
    embedder = (
        ray.remote(Embedder)
        .options(name=f"{prefix}-embed", num_cpus=0, max_concurrency=8)
        .remote(EmbedderSettings(model="tiny", max_wait_ms=500), [NamedActor(f"{prefix}-publish")])
    )
    shapes = {"vision": (3, 2, 224, 224), "audio": (1, 128, 204), "depth": (1, 224, 224), "thermal": (1, 224, 224)}
    rng = np.random.default_rng(3)

    def moment(t0_s: int, reuses: int | None) -> list[Window]:
        return [
            window(m, t0_s, rng.normal(0, 1, shapes[m]))
            if reuses is None
            else dataclasses.replace(window(m, t0_s, NO_DATA), reuses=reuses * SECOND)
            for m in shapes
        ]

    first = embedder.push.remote(moment(0, None) + moment(1, 0))
    second = embedder.push.remote(moment(2, 0))  # while the first batch still waits for more windows
    third = embedder.push.remote([dataclasses.replace(window("audio", 9, NO_DATA), reuses=7 * SECOND)])
    ray.get([first, second, third])
    final = ray.get(publisher.drain.remote())
    records = read_all(redis.Redis.from_url(server.url), DEVICE)
    by_modality: dict[str, list] = {}
    for r in records:
        by_modality.setdefault(r.modality, []).append(r)
    for m in [*shapes, FUSED]:  # the calls run concurrently: the second's windows may overtake the first's
        stream = by_modality[m]
        assert sorted((r.t0 // SECOND, r.reused) for r in stream) == [(0, None), (1, 0), (2, 0)], m
        assert stream[0].t0 == 0 and all((r.emb == stream[0].emb).all() for r in stream), m
    assert Counts.of(final).get("dropped_reuse_missing", DEVICE) == 1
    assert Counts.of(ray.get(embedder.stats.remote())).get("reused") == 9
    for actor in (embedder, publisher):
        ray.kill(actor)


# ----- the alerts on the simulator's events, with gating on and off ----------------------------------------

BURSTS = ChirpBursts(first_s=12.0)  # during the scene's motion (9.7 to 15.7 s), after a quiet start
SECONDS = 18  # the burst ends at 15 s: the first windows after it (15..17 s, 16..18 s) end its event
WARMUP = 8  # audio windows the example query learns each stream's usual sound from (a quiet room)
START_NS = 1_000 * SECOND


def send_all(endpoint: str, messages: list) -> None:
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(endpoint)
    for header, payload in messages:
        push.send_multipart([msgpack.packb(header), payload])
    push.close(linger=-1)


def run_day(ray_local, messages: list, gating: bool) -> tuple[list[tuple], dict[str, Counts]]:
    """The messages through a real pipeline (replay: nothing dropped) into a fresh redis-server, then the chirp's
    example query matched over what was stored; returns the events' (device, state, t0, t1), and each stage's
    counts."""
    with RedisServer() as server:
        config = PipelineConfig(
            ingest=["tcp://127.0.0.1:*"],
            model="tiny",
            matchers=0,
            overload=REPLAY,
            max_wait_ms=20,
            gating=GatingSettings(enabled=gating),
            windowing=UNTHROTTLED,
        )
        pipeline = Pipeline(config, server.url, "tiny")
        try:
            (endpoint,) = pipeline.start()
            send_all(endpoint, messages)
            wait_for(
                lambda: Counts.of(*pipeline.stats()["ingest"]).get("in") == len(messages), 60, "ingest to take all"
            )
            final = pipeline.drain()
        finally:
            pipeline.kill()
        client = redis.Redis.from_url(server.url)
        encoder = encoders.load("tiny", device="cpu")
        clip = transforms.audio_tensor(BURSTS.clip()[None], MIC_RATE)
        ensure_background(client, encoder, "audio")
        example = encoder.embed("audio", clip[None])[0]
        calibration = Calibration(warmup=WARMUP)
        save_query(client, Query("chirp", "audio", example, "tiny", source="example:chirp", calibration=calibration))
        matcher = Matcher(MatcherSettings(start_id="0", block_ms=10), server.url)
        stored = len(read_all(client))

        def matched() -> bool:  # every entry read, and every event change it made copied to the alerts stream
            busy, counts = matcher.step(), Counts.of(matcher.stats())
            return not busy and counts.get("in") >= stored and client.xlen(ALERTS_STREAM) >= counts.get("event_")

        wait_for(matched, 60, "the matcher to read every entry and copy its alerts")
        alerts = [Alert.from_entry(i, f) for i, f in client.xrange(ALERTS_STREAM)]
        start_s = START_NS // SECOND
        # starts and ends: an update marks a new peak, which a repeated vector cannot raise as a new one may
        events = [(a.device, a.state, a.t0 // SECOND - start_s, a.t1 // SECOND - start_s) for a in alerts]
        events = [event for event in events if event[1] != UPDATE]
        return events, {stage: Counts.of(*stats) for stage, stats in final.items()}


def test_gating_saves_forwards_on_the_day_profile_and_leaves_the_alerts_unchanged(ray_local):
    wearable = SimulatedWearable("sim-000", 0, start_ns=START_NS, bursts=BURSTS, profile=PROFILES["day"])
    messages = list(wearable.messages(SECONDS))
    on, on_counts = run_day(ray_local, messages, gating=True)
    off, off_counts = run_day(ray_local, messages, gating=False)
    assert on == off
    assert [state for _, state, _, _ in on] == [START, END]  # the chirp burst: one event
    assert on[0][2] in (11, 12, 13)  # it starts at a window that hears the burst (12..15 s)
    for counts in (*on_counts.values(), *off_counts.values()):
        assert not [e for e in counts.events() if e.startswith(("dropped", "rejected"))], counts.to_dict()
    windows = off_counts["window"].get("out")
    assert on_counts["window"].get("out") == windows
    assert on_counts["window"].get("gated") == on_counts["embed"].get("reused") > windows / 2  # most took no forward
    assert off_counts["window"].get("gated") == off_counts["embed"].get("reused") == 0
