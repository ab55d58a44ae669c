"""bindstream on a real Redis Cluster: three redis-server masters started here (streaming.redis_server's
EmbeddedCluster, the binary the other tests use), the pipeline and the matchers on `rediscluster://`.

Each device's keys share its hash tag, so every script and transaction touches one slot; the matchers of a group
share the devices by rendezvous hashing and hand them over, with their pending entries, when one joins or leaves.
The model is `tiny` (RANDOM weights): its windows say nothing, only the path through Redis is under test.
"""

import time

import msgpack
import numpy as np
import pytest
import redis
import zmq
from click.testing import CliRunner
from redis.crc import key_slot

import encoders
from sensors.protocol import decode
from sensors.simulator import SimulatedWearable
from streaming.alerts.bench import HttpReceiver
from streaming.alerts.matcher import Matcher, MatcherSettings
from streaming.alerts.notify import Notifier, NotifySettings
from streaming.alerts.queries import ensure_background, save_background, save_query
from streaming.alerts.records import Background, Decision, Query
from streaming.alerts.shards import owner
from streaming.cli import main
from streaming.pipeline import Pipeline, PipelineConfig
from streaming.records import Embedding
from streaming.redis_access import connect, is_cluster
from streaming.redis_layout import (
    ALERTS_STREAM,
    EVENTS_INDEX,
    FANIN_CURSORS,
    SINKS,
    START,
    STREAM_REGISTRY,
    Alert,
    decode_device_alert,
    dedup_key,
    device_alerts_key,
    encode_embedding,
    event_key,
    evidence_key,
    health_key,
    index_key,
    migrate_v1,
    owner_key,
    register_streams,
    state_key,
    stream_key,
)
from streaming.redis_server import EmbeddedCluster
from streaming.stage import Counts
from streaming.subscriber import read_all
from streaming.windowing import SECOND, Windower

from .conftest import wait_for
from .test_alerts import BACKGROUND, MATCH, MODEL, QUIET, WINDOW_S, basis

WAIT_S = 30.0
ONE_SHOT = Decision(k=1, n=1, cooldown_s=0)  # every re-armed matching window fires


@pytest.fixture(scope="module")
def cluster():
    with EmbeddedCluster(masters=3) as c:
        yield c


@pytest.fixture
def client(cluster):
    """A client of the cluster, emptied; it holds the audio background of test_alerts' queries."""
    c = connect(cluster.url)
    c.flushall()  # every primary
    prompts = tuple(f"b{i}" for i in BACKGROUND)
    save_background(c, Background(MODEL, "audio", prompts, np.stack([basis(i) for i in BACKGROUND])))
    return c


# ----- the layout ----------------------------------------------------------------------------------------


def test_the_keys_of_a_device_of_an_event_and_of_the_notifier_share_a_slot():
    stream = stream_key("glasses-1", "audio")
    device = {
        stream,
        index_key("glasses-1", "audio"),
        state_key("bindstream-matchers", stream),
        dedup_key("3fa2c1d0", stream, "1-0", "end"),
        owner_key("bindstream-matchers", "glasses-1"),
        health_key("bindstream-matchers", "glasses-1"),
        device_alerts_key("glasses-1"),
    }
    assert len({key_slot(k.encode()) for k in device}) == 1
    assert key_slot(event_key("ab12").encode()) == key_slot(evidence_key("ab12").encode())
    assert key_slot(FANIN_CURSORS.encode()) == key_slot(SINKS.encode()) == key_slot(ALERTS_STREAM.encode())
    assert key_slot(stream.encode()) != key_slot(stream_key("glasses-2", "audio").encode())
    with pytest.raises(ValueError, match="braces"):
        MatcherSettings(group="a{b}")


def test_rendezvous_moves_only_the_devices_of_the_member_that_comes():
    devices = [f"d{i}" for i in range(2000)]
    before = {d: owner(d, ["a", "b"]) for d in devices}
    after = {d: owner(d, ["a", "b", "c"]) for d in devices}
    moved = [d for d in devices if before[d] != after[d]]
    assert all(after[d] == "c" for d in moved) and 500 < len(moved) < 830  # a third, each to the newcomer
    assert abs(sum(o == "a" for o in before.values()) - 1000) < 120


# ----- the pipeline on a cluster -------------------------------------------------------------------------


def send_all(endpoint: str, messages) -> None:
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(endpoint)
    for header, payload in messages:
        push.send_multipart([msgpack.packb(header), payload])
    push.close(linger=-1)


def test_the_pipeline_publishes_every_window_and_a_vector_query_alerts_once(ray_local, cluster, client):
    device, seconds = "glasses-c", 8
    messages = list(SimulatedWearable(device, seed=7, start_ns=1_000 * SECOND).messages(seconds))
    windower, windows = Windower(), []
    for header, payload in messages:
        windows += windower.add(decode([msgpack.packb(header), payload]))
    expected = {(w.modality, w.t0) for w in windows}
    encoder = encoders.load("tiny", device="cpu")
    audio = next(w for w in windows if w.modality == "audio")
    ensure_background(client, encoder, "audio")
    # tiny's audio windows of one device are all alike (cosine > 0.98): the query matches every one of them, and
    # the decision (one event, its cooldown) makes one alert of them
    q = save_query(
        client, Query("a window of glasses-c", "audio", encoder.embed("audio", audio.data[None])[0], "tiny", device)
    )
    config = PipelineConfig(ingest=["tcp://127.0.0.1:*"], model="tiny", max_wait_ms=20)
    pipeline = Pipeline(config, cluster.url, "tiny")
    try:
        (endpoint,) = pipeline.start()
        send_all(endpoint, messages)
        wait_for(lambda: Counts.of(*pipeline.stats()["ingest"]).get("in") == len(messages), 60, "ingest to take all")
        final = pipeline.drain()
        starts = [a for a in (Alert.from_entry(i, f) for i, f in client.xrange(ALERTS_STREAM)) if a.state == START]
        # the windowing actors heard of it on the channel (PUBLISH reaches every node) and wrote its evidence, which
        # links the record: two keys of one slot, `{event}`
        evidence = wait_for(lambda: client.hget(event_key(starts[0].event), "evidence"), 30, "the event's evidence")
    finally:
        pipeline.kill()
    published = {(r.modality, r.t0) for r in read_all(client, device) if r.modality != "fused"}
    assert published == expected  # every window, once (a duplicate would repeat a pair: counted below)
    assert sum(client.xlen(stream_key(device, m)) for m in {m for m, _ in expected}) == len(expected)
    assert client.zscore(STREAM_REGISTRY, stream_key(device, "audio")) is not None
    assert [(a.query, a.device) for a in starts] == [(q.id, device)]
    assert evidence.decode() == evidence_key(starts[0].event) and client.hexists(evidence, "audio.pcm")
    own = [decode_device_alert(i, f)[0] for i, f in client.xrange(device_alerts_key(device))]
    assert [a.event for a in own if a.state == START] == [starts[0].event]
    assert client.exists(event_key(starts[0].event)) and client.zscore(EVENTS_INDEX, starts[0].event) is not None
    assert Counts.of(*final["match"]).get("alert") == 1 and not Counts.of(*final["match"]).get("duplicate_alert")


# ----- matchers joining and leaving ----------------------------------------------------------------------


def write_round(c, devices: list[str], n: int) -> None:
    """Window `n` of every device: a matching one when `n` is even, else a quiet one (which re-arms the query)."""
    for d in devices:
        t0 = n * WINDOW_S * SECOND
        e = Embedding(d, "audio", t0, t0 + WINDOW_S * SECOND, MATCH if n % 2 == 0 else QUIET, MODEL, 0, 0)
        c.xadd(stream_key(d, "audio"), encode_embedding(e))
    register_streams(c, [stream_key(d, "audio") for d in devices])


def fast_matcher(url: str, name: str) -> Matcher:
    settings = MatcherSettings(consumer=name, start_id="0", block_ms=10, discover_s=0.2, member_ttl_s=1.0)
    return Matcher(settings, url)


def read_by(matchers: list[Matcher]) -> int:
    return Counts.of(*(m.stats() for m in matchers)).get("in")


def test_matchers_joining_and_leaving_mid_stream_decide_every_window_once(cluster, client):
    assert is_cluster(client)
    save_query(client, Query("a dog barking", "audio", MATCH, MODEL, decision=ONE_SHOT))
    devices = [f"w{i}" for i in range(12)]
    a, b, c = (fast_matcher(cluster.url, name) for name in ("m-a", "m-b", "m-c"))
    everyone = [a, b, c]
    written = 0

    def rounds(first: int, last: int) -> None:
        nonlocal written
        for n in range(first, last):
            write_round(client, devices, n)
            written += len(devices)
            time.sleep(0.05)

    a.start()
    rounds(0, 4)
    b.start()  # joins mid-stream: takes its devices from a
    rounds(4, 10)
    wait_for(lambda: read_by(everyone) == written, WAIT_S, "a and b to read every window")
    assert b.stats()["devices"] > 0 and a.stats()["devices"] + b.stats()["devices"] == len(devices)
    # a dies: no leave, and two windows read under its name but never committed stay in the group's PEL
    a._stop.set()
    a._thread.join()
    rounds(10, 12)
    held_by_a = [d for d in devices if client.get(owner_key(a.settings.group, d)) == b"m-a"]
    taken = client.xreadgroup(a.settings.group, "m-a", {stream_key(held_by_a[0], "audio"): ">"}, count=2)
    assert len(taken[0][1]) == 2
    c.start()  # joins while b waits for a's heartbeat to expire
    rounds(12, 16)
    b.stop()  # leaves gracefully mid-stream: c takes everything
    rounds(16, 20)
    wait_for(lambda: read_by(everyone) == written, WAIT_S, "c to read every window, a's pending ones too")
    wait_for(lambda: c.stats()["devices"] == len(devices), WAIT_S, "c to hold every device")
    c.stop()
    decided = Counts.of(*(m.stats() for m in everyone))
    assert decided.get("scored") == written and decided.get("replayed") == 0 and decided.get("duplicate_alert") == 0
    starts = [x for x in (Alert.from_entry(i, f) for i, f in client.xrange(ALERTS_STREAM)) if x.state == START]
    fired = sorted((x.device, x.t0) for x in starts)
    assert fired == sorted((d, n * WINDOW_S * SECOND) for d in devices for n in range(0, 20, 2))  # each once
    for d in devices:
        key = stream_key(d, "audio")
        assert client.xpending(key, a.settings.group)["pending"] == 0
        last = client.xrevrange(key, count=1)[0][0]
        assert client.hget(state_key(a.settings.group, key), "last_id") == last  # decided up to the end
        assert client.hget(FANIN_CURSORS, d) == client.xrevrange(device_alerts_key(d), count=1)[0][0]


# ----- readers of the fan-in -----------------------------------------------------------------------------


def test_watch_and_the_notifier_read_the_alerts_of_every_node(cluster, client):
    save_query(client, Query("a dog barking", "audio", MATCH, MODEL, decision=ONE_SHOT))
    devices = [f"n{i}" for i in range(6)]  # spread over the three masters
    assert len({client.keyslot(stream_key(d, "audio")) for d in devices}) == len(devices)
    with HttpReceiver() as receiver:
        notifier = Notifier(NotifySettings(urls=(receiver.url,), start_id="0"), cluster.url)
        notifier.start()
        m = fast_matcher(cluster.url, "m-watch")
        try:
            write_round(client, devices, 0)
            wait_for(lambda: m.step() == 0 and client.xlen(ALERTS_STREAM) == len(devices), WAIT_S, "the alerts")
            wait_for(lambda: len(receiver.received) == len(devices), WAIT_S, "a notification per device")
        finally:
            m.stop()
            notifier.stop()
    out = CliRunner().invoke(main, ["watch", "--since", "10m", "--seconds", "0.2", "--redis", cluster.url]).output
    assert all(d in out for d in devices), out


# ----- layout v1 -----------------------------------------------------------------------------------------


def test_migrate_v1_moves_the_keys_of_a_single_instance(redis_server):
    c = redis.Redis.from_url(redis_server.url)
    c.flushall()
    c.xadd("bindstream:emb:old-1:audio", {"t0": 0})
    c.xgroup_create("bindstream:emb:old-1:audio", "bindstream-matchers", id="0")
    c.zadd("bindstream:embidx:old-1:audio", {"run:0:0": 1})
    c.hset("bindstream:alertstate:bindstream-matchers:bindstream:emb:old-1:audio", "last_id", "1-0")
    c.hset("bindstream:health:bindstream-matchers", "bindstream:emb:old-1:audio", "1-0 5")
    c.hset("bindstream:event:ab12", "id", "ab12")
    c.hset("bindstream:sinks", "s1", "json://x")
    c.set("bindstream:alerted:q:bindstream:emb:old-1:audio:1-0", 1, ex=60)
    c.sadd("bindstream:queries", "q")
    assert migrate_v1(c) == {"moved": 6, "kept": 0}
    stream = stream_key("old-1", "audio")
    assert c.xinfo_groups(stream)[0]["name"] == b"bindstream-matchers"
    assert c.exists(index_key("old-1", "audio"), state_key("bindstream-matchers", stream), event_key("ab12")) == 3
    assert c.hget(health_key("bindstream-matchers", "old-1"), stream) == b"1-0 5"
    assert c.hget(SINKS, "s1") == b"json://x" and c.zscore(STREAM_REGISTRY, stream) is not None
    assert c.exists("bindstream:queries", "bindstream:alerted:q:bindstream:emb:old-1:audio:1-0") == 2  # stay
    assert migrate_v1(c) == {"moved": 0, "kept": 0}  # nothing left to move


def test_a_cluster_url_with_a_database_is_refused():
    from streaming.redis_access import RedisAccessError, check_redis

    with pytest.raises(RedisAccessError, match="only database 0"):
        check_redis("rediscluster://127.0.0.1:1/3")
