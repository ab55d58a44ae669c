"""Hostile neighbours (issue 9): each attack runs against one real pipeline (ZeroMQ ingest, Ray actors,
redis-server) while a legitimate wearable streams beside it at its real pace. Each test asserts that the
legitimate device lost at most one window, that the attack was counted under the attacker's id (or, for
forgeries, the id it claimed) and reason, and that every stage's memory stayed within the bound
SECURITY.md states. `python bench/hostile.py` runs the same attacks, larger, and prints a table.

The matcher's attacks are in test_hostile_matcher.py, Redis-side failures in test_hostile_publish.py.
"""

import time

import numpy as np
import pytest
import redis

from streaming.connections import ConnectionLimits
from streaming.pipeline import Pipeline, PipelineConfig
from streaming.stage import Counts
from streaming.subscriber import read_all
from streaming.windowing import WindowingConfig

from . import attacks
from .conftest import wait_for

pytestmark = pytest.mark.timeout(300)

# bounds of this test's pipeline, small so that the attacks reach them quickly
CONNECTIONS = ConnectionLimits(
    max_connections=64,
    idle_timeout_s=3.0,
    evict_idle_s=1.0,
    handshake_timeout_s=2.0,
    max_devices=100,
    device_idle_s=30.0,
    device_evict_idle_s=3.0,
)
WINDOWING = WindowingConfig(device_cpu_burst_s=0.5)
GROWTH_BOUND_MB = 400  # private memory a stage may gain under any attack here (SECURITY.md)


@pytest.fixture(scope="module")
def pipeline(ray_local, redis_server):
    config = PipelineConfig(
        ingest=["tcp://127.0.0.1:*"], max_wait_ms=20, matchers=0, connections=CONNECTIONS, windowing=WINDOWING
    )
    pipeline = Pipeline(config, redis_server.url, "tiny")
    pipeline.start()
    yield pipeline
    pipeline.kill()


def run(pipeline, redis_server, name, attack, **kw) -> attacks.Outcome:
    outcome = attacks.beside_legit(
        pipeline, redis_server.url, name, lambda endpoint, victim: attack(endpoint, victim, **kw)
    )
    assert outcome.lost <= 1, f"{name}: the legitimate device lost {outcome.lost} of {outcome.expected} windows"
    grown = {stage: mb for stage, mb in outcome.growth_mb.items() if mb > GROWTH_BOUND_MB}
    assert not grown, f"{name}: memory grew beyond {GROWTH_BOUND_MB} MB: {grown}"
    return outcome


def test_odd_sample_rates_resample_at_bounded_cost(pipeline, redis_server):
    run(pipeline, redis_server, "rates", attacks.odd_rate_audio)
    client = redis.Redis.from_url(redis_server.url)
    for device in (f"{attacks.ATTACKER}-rate0", f"{attacks.ATTACKER}-rate1"):  # 44,101 and 191,999 Hz
        audio = [r for r in read_all(client, device) if r.modality == "audio"]
        assert len(audio) == 2, f"{device}: its 3 s of audio were windowed and embedded, not refused"


def test_decompression_bombs_are_refused_at_ingest(pipeline, redis_server):
    outcome = run(pipeline, redis_server, "bombs", attacks.image_bombs)
    assert outcome.counted["ingest: rejected_too_costly"] == 4


def test_pngs_with_more_data_than_pixels_are_refused_before_decoding(pipeline, redis_server):
    outcome = run(pipeline, redis_server, "padded", attacks.padded_pngs)
    assert outcome.counted["window: dropped_too_costly"] >= 1


def test_a_device_over_its_cpu_share_is_throttled(pipeline, redis_server):
    outcome = run(pipeline, redis_server, "costly", attacks.costly_frames)
    assert outcome.counted["window: dropped_throttled"] >= 1


def test_a_flood_of_omitted_frames_costs_only_the_senders_windows(pipeline, redis_server):
    outcome = run(pipeline, redis_server, "omitted", attacks.omitted_frames)
    dropped = outcome.counted["window: dropped_empty"] + outcome.counted["window: dropped_throttled"]
    assert dropped >= 1, outcome.counted  # its windows had no pixels (or it spent its CPU share): counted, its own
    assert not read_all(redis.Redis.from_url(redis_server.url), f"{attacks.ATTACKER}-omit")  # nothing embedded


def test_huge_imu_values_publish_finite_unit_embeddings(pipeline, redis_server):
    run(pipeline, redis_server, "imu", attacks.huge_imu)
    records = [
        r for r in read_all(redis.Redis.from_url(redis_server.url), f"{attacks.ATTACKER}-imu") if r.modality == "imu"
    ]
    assert records, "the clipped IMU windows were embedded"
    for r in records:
        assert np.isfinite(r.emb).all() and abs(np.linalg.norm(r.emb) - 1) < 1e-3


def test_forged_seq_and_clock_in_a_victims_name_cost_it_nothing(pipeline, redis_server):
    outcome = run(pipeline, redis_server, "forged", attacks.forged_seq_and_clock)
    assert outcome.lost == 0
    assert outcome.counted["window: dropped_seq_jump"] == 1 and outcome.counted["window: dropped_clock_jump"] == 1
    assert outcome.counted["window: dropped_seq_lost"] == 0


def test_a_flood_of_device_ids_is_capped_and_new_devices_return_later(pipeline, redis_server):
    outcome = run(pipeline, redis_server, "ids", attacks.device_id_flood)
    assert outcome.counted["ingest: rejected_device_cap"] >= 2000 - CONNECTIONS.max_devices
    (endpoint,) = pipeline.endpoints
    # once the flood's ids have been silent for device_evict_idle_s, a new device takes one's place
    wait_for(
        lambda: _delivers(endpoint, pipeline),
        CONNECTIONS.device_evict_idle_s + 20,
        "a new device to be admitted",
        poll_s=0.5,
    )


def _delivers(endpoint: str, pipeline) -> bool:
    """Whether a message from a device id never seen before is admitted (counted as `in`, which ingest counts
    with the batch it passes on, or as refused, at once)."""
    ingested, refused = attacks.ingested(pipeline), _refused(pipeline)
    attacks.device_id_flood(endpoint, "", ids=1, name=f"newcomer-{time.monotonic_ns()}-")
    wait_for(
        lambda: attacks.ingested(pipeline) + _refused(pipeline) > ingested + refused, 10, "the message to be counted"
    )
    return attacks.ingested(pipeline) > ingested


def _refused(pipeline) -> int:
    return Counts.of(pipeline.stats()["ingest"][0]).get("rejected_device_cap")


def test_silent_and_stalled_connections_are_bounded_and_closed(pipeline, redis_server):
    outcome = run(pipeline, redis_server, "connections", attacks.connection_flood)
    closed = outcome.counted["ingest: refused_connection_cap"] + outcome.counted["ingest: evicted_idle"]
    assert closed >= 200 + 100 + 10 - CONNECTIONS.max_connections
    assert outcome.counted["ingest: closed_idle"] + outcome.counted["ingest: evicted_idle"] >= 1
    # after the attack, the connections it left are closed and a newcomer's message arrives
    wait_for(
        lambda: pipeline.stats()["ingest"][0]["connections"] <= 2,
        CONNECTIONS.idle_timeout_s + 10,
        "the attack's connections to be closed",
    )
    before = attacks.ingested(pipeline)
    attacks.huge_imu(pipeline.endpoints[0], "")  # on a new connection
    wait_for(lambda: attacks.ingested(pipeline) > before, 20, "a newcomer's messages")


def test_the_pipeline_drains_cleanly_after_the_attacks(pipeline):
    final = pipeline.drain()
    assert all(not s.get("queue") for stage in ("window", "embed", "publish") for s in final[stage])
