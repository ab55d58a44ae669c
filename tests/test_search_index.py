"""The search index (streaming/index/): it returns brute force's top 10, survives a restart without duplicates,
honours device and time filters, keeps its bound, is used by `bindstream search` when present (brute force when
not), and skips bad entries. A real redis-server, real Ray for the actor. The windows are synthetic 64-d unit
vectors (tiny's joint space); no encoder runs, so no random weights are involved."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from streaming.alerts.search import search
from streaming.cli.bench import bench_search
from streaming.cli.search import search_command
from streaming.index.indexer import Indexer, start_indexers
from streaming.index.shard import IndexSettings, Shard
from streaming.pipeline import ConfigError, PipelineConfig
from streaming.records import Embedding
from streaming.redis_layout import (
    EVENTS_INDEX,
    QUERY_EVENT,
    Event,
    IndexInfo,
    encode_embedding,
    event_key,
    evidence_key,
    index_group,
    register_streams,
    search_index_key,
    stream_key,
)
from streaming.stage import Counts

from .conftest import wait_for

DIM, MODEL, SECOND = 64, "tiny", 1_000_000_000
FREE = np.arange(9, DIM)  # the windows' and queries' axes: the background prompts (e1..e8) stand apart from them,
# so that a window's calibrated score ranks as its cosine and brute force's top 10 is the cosine's
WAIT_S = 60.0


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def free(rng: np.random.Generator, n: int) -> np.ndarray:
    """`n` random unit vectors in the FREE axes."""
    out = np.zeros((n, DIM), np.float32)
    out[:, FREE] = rng.standard_normal((n, len(FREE)))
    return unit(out)


def planted(rng: np.random.Generator, query: np.ndarray, cosines) -> np.ndarray:
    """Unit vectors at the given cosines to `query` (all in the FREE axes)."""
    other = free(rng, len(cosines))
    other = unit(other - (other @ query)[:, None] * query)
    c = np.asarray(cosines, np.float32)[:, None]
    return unit(c * query + np.sqrt(1 - c**2) * other)


def write(client, device: str, vectors, ms: int | None = None, model: str = MODEL) -> list[str]:
    """XADD audio windows of `device` (2 s apart in device time; stream ids from `ms` on, one ms apart, when
    given) and register the stream, as the publisher does; returns the entry ids."""
    key, ids = stream_key(device, "audio"), []
    for i, v in enumerate(vectors):
        e = Embedding(device, "audio", 2 * i * SECOND, (2 * i + 2) * SECOND, np.asarray(v, np.float32), model, 0, 0)
        ids.append(client.xadd(key, encode_embedding(e), id=f"{ms + i}-0" if ms else "*").decode())
    register_streams(client, [key])
    return ids


def indexer(server, folder, **settings) -> Indexer:
    return Indexer(IndexSettings(block_ms=5, **settings), server.url, folder, MODEL, "audio")


def catch_up(ix: Indexer) -> Indexer:
    """Step until a step reads nothing (the first one takes the lease and loads the snapshot)."""
    while ix.step() or not ix.loaded:
        pass
    return ix


def ids_of(found) -> list[str]:
    return [h.record.id for h in found.hits]


def snapshot_ids(shard: Shard) -> list[str]:
    """The entry id of every vector a shard holds, in label order."""
    return [f"{row['ms']}-{row['seq']}" for seg in shard.segments for row in seg.rows]


def test_the_index_returns_brute_forces_top_10_and_reads_on_past_its_snapshot(server, client, tmp_path):
    rng = np.random.default_rng(1)
    query = free(rng, 1)[0]
    vectors = free(rng, 300)
    best = rng.choice(300, 10, replace=False)
    vectors[best] = planted(rng, query, np.linspace(0.95, 0.5, 10))
    ids = []
    for device, part in zip(("cam-1", "cam-2", "mic-1"), np.split(vectors, 3)):
        ids += write(client, device, part)
    ix = catch_up(indexer(server, tmp_path))
    ix.save()
    brute = search(client, {"audio": query}, MODEL, top=10, use_index=False)
    through = search(client, {"audio": query}, MODEL, top=10)
    assert through.indexed == ["audio"] and not through.notes
    assert ids_of(through) == ids_of(brute) == [ids[i] for i in best]
    shard = Shard.open(ix.path, view=True)
    exact = np.argsort(-(vectors @ query))[:10]
    assert [r.id for r in shard.records(shard.search(query, 10))] == [ids[i] for i in exact]
    newer = write(client, "mic-1", planted(rng, query, [0.99]))  # after the snapshot: read by brute force
    assert ids_of(search(client, {"audio": query}, MODEL, top=10))[:2] == [newer[0], ids[best[0]]]


def test_a_restarted_indexer_resumes_from_its_snapshot_without_duplicates(server, client, tmp_path):
    rng = np.random.default_rng(2)
    query = free(rng, 1)[0]
    first = free(rng, 40)
    first[7:10] = planted(rng, query, [0.9, 0.85, 0.8])  # the top 3, whatever random windows come later
    ids = write(client, "dev", first)
    ix = catch_up(indexer(server, tmp_path, lease_s=0.3))
    ix.save()
    before = ids_of(search(client, {"audio": query}, MODEL, top=3))
    ids += write(client, "dev", free(rng, 20))
    catch_up(ix)  # read and indexed, not in a snapshot; then the indexer dies (its lease expires)
    key = stream_key("dev", "audio")
    assert client.xinfo_groups(key)[0]["last-delivered-id"].decode() == ids[-1]
    again = indexer(server, tmp_path, lease_s=0.3)
    wait_for(lambda: again.step() or again.holding, WAIT_S, "the lease of the dead indexer to expire")
    catch_up(again)
    ids += write(client, "dev", free(rng, 10))
    catch_up(again).save()
    shard = Shard.open(again.path, view=True)
    assert snapshot_ids(shard) == ids  # every window once, in order: the snapshot's 40, then read again, then new
    assert ids_of(search(client, {"audio": query}, MODEL, top=3, use_index=True)) == before
    group = client.xinfo_groups(key)[0]
    assert group["name"].decode() == index_group(MODEL) and group["pending"] == 0
    assert group["last-delivered-id"].decode() == ids[-1]


def test_the_indexer_actor_restarts_and_resumes(ray_local, server, client, tmp_path):
    import ray

    rng = np.random.default_rng(3)
    settings = IndexSettings(save_s=0.2, lease_s=1.0, block_ms=20)
    (actor,) = start_indexers(settings, server.url, tmp_path, MODEL, ["audio"])

    def saved() -> int:
        info = IndexInfo.decode(client.hgetall(search_index_key(MODEL, "audio")))
        return info.vectors if info else 0

    def pid():
        return ray.get(actor.__ray_call__.remote(lambda _: os.getpid()), timeout=WAIT_S)

    def alive():  # ray.kill returns before the actor dies: only a new process is the restarted actor
        try:
            return pid() != first_pid
        except ray.exceptions.RayActorError:
            return False

    ids = write(client, "dev", free(rng, 30))
    wait_for(lambda: saved() == 30, WAIT_S, "the first snapshot")
    first_pid = pid()
    ray.kill(actor, no_restart=False)
    ids += write(client, "dev", free(rng, 20))
    wait_for(alive, WAIT_S, "the restarted actor")
    wait_for(lambda: saved() == 50, WAIT_S, "the restarted actor's snapshot")
    info = IndexInfo.decode(client.hgetall(search_index_key(MODEL, "audio")))
    assert snapshot_ids(Shard.open(Path(info.dir), view=True)) == ids
    ray.kill(actor)


def test_device_glob_and_time_filters_match_brute_force(server, client, tmp_path):
    rng = np.random.default_rng(4)
    query = free(rng, 1)[0]
    two_hours_ago = time.time_ns() // 1_000_000 - 2 * 3_600_000
    cosines = iter(np.split(rng.permutation(np.linspace(0.3, 0.95, 180)), 6))  # distinct: one order for all
    for i, device in enumerate(("cam-1", "cam-2", "mic-1")):
        write(client, device, planted(rng, query, next(cosines)), ms=two_hours_ago + 1000 * i)
        write(client, device, planted(rng, query, next(cosines)))
    catch_up(indexer(server, tmp_path)).save()
    graph = Shard.open(next(tmp_path.iterdir()), IndexSettings(exact_max=0), view=True)  # every filter by its graph
    for device, since_ms in (("cam-*", None), ("mic-1", None), ("*", 600_000), ("cam-2", 600_000)):
        brute = search(client, {"audio": query}, MODEL, device, since_ms, top=10, use_index=False)
        through = search(client, {"audio": query}, MODEL, device, since_ms, top=10)
        assert through.indexed == ["audio"] and ids_of(through) == ids_of(brute), (device, since_ms)
        assert all(h.record.device.startswith(device.rstrip("*")) for h in through.hits)
        assert since_ms is None or all(int(h.record.id.split("-")[0]) > two_hours_ago + 10_000 for h in through.hits)
        cutoff = None if since_ms is None else time.time_ns() // 1_000_000 - since_ms
        assert [r.id for r in graph.records(graph.search(query, 10, device, cutoff))] == ids_of(brute)


def test_the_shard_keeps_at_most_max_vectors_evicting_the_oldest(server, client, tmp_path):
    rng = np.random.default_rng(5)
    vectors = free(rng, 100)
    ids = write(client, "dev", vectors)
    ix = catch_up(indexer(server, tmp_path, max_vectors=60, segment_vectors=20))
    ix.save()
    assert Counts.of(ix.stats()).get("evicted") == 40 and Counts.of(ix.stats()).get("indexed") == 100
    shard = Shard.open(ix.path, view=True)
    assert len(shard) == 60 and shard.evicted == 40 and snapshot_ids(shard) == ids[40:]
    found = shard.records(shard.search(vectors[3], 5))  # the oldest window itself is gone
    assert ids[3] not in [r.id for r in found] and len(found) == 5


def test_search_command_uses_the_index_when_present_and_brute_force_when_not(server, client, tmp_path):
    rng = np.random.default_rng(6)
    query = free(rng, 1)[0]
    vectors = free(rng, 50)
    vectors[10:13] = planted(rng, query, [0.9, 0.8, 0.7])
    ids = write(client, "dev", vectors)
    np.save(tmp_path / "query.npy", query)
    event = Event("ab" * 8, QUERY_EVENT, "dev", "q1", "a dog", "audio", MODEL, stream_key("dev", "audio"), 20 * SECOND,
                  22 * SECOND, 0.9, ids[10], 1, detected_ns=time.time_ns())  # fmt: skip
    client.hset(event_key(event.id), mapping=event.encode())
    client.zadd(EVENTS_INDEX, {event.id: time.time_ns() // 1_000_000})
    client.hset(evidence_key(event.id), mapping={"audio.pcm": b"\0\0" * 160, "audio_rate": 16000, "audio_channels": 1})
    args = ["--vector", str(tmp_path / "query.npy"), "--modality", "audio", "--model", MODEL, "--top", "3"]
    args += ["--redis", server.url, "--json"]

    def search_cli() -> tuple[list[dict], str]:
        result = CliRunner().invoke(search_command, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout), result.stderr

    hits, notice = search_cli()
    assert "brute force over the streams: audio: no search index" in notice
    assert [h["id"] for h in hits] == ids[10:13]
    assert [(h["event"], h["evidence"]) for h in hits] == [(event.id, True), (None, False), (None, False)]
    catch_up(indexer(server, tmp_path / "index")).save()
    again, notice = search_cli()
    assert "through the search index: audio" in notice and "brute force" not in notice
    exact = ("score", "cosine")  # the index's are of its f16 copy of each vector
    assert [{k: v for k, v in h.items() if k not in exact} for h in again] == [
        {k: v for k, v in h.items() if k not in exact} for h in hits
    ]
    assert np.allclose([h["cosine"] for h in again], [h["cosine"] for h in hits], atol=1e-3)


def test_bad_entries_are_counted_and_acknowledged_and_never_block(server, client, tmp_path):
    rng = np.random.default_rng(7)
    key = stream_key("dev", "audio")
    ids = write(client, "dev", free(rng, 3))
    client.xadd(key, {"t0": 0, "t1": 1, "model": MODEL})  # no vector: malformed
    bad = {
        "not_unit": Embedding("dev", "audio", 0, SECOND, np.full(DIM, np.nan, np.float32), MODEL, 0, 0),
        "bad_time": Embedding("dev", "audio", 5 * SECOND, SECOND, free(rng, 1)[0], MODEL, 0, 0),
        "wrong_dim": Embedding("dev", "audio", 0, SECOND, unit(np.ones(32, np.float32)), MODEL, 0, 0),
        "other_model": Embedding("dev", "audio", 0, SECOND, free(rng, 1)[0], "imagebind_huge", 0, 0),
    }
    for e in bad.values():
        client.xadd(key, encode_embedding(e))
    ids += write(client, "dev", free(rng, 3))
    ix = catch_up(indexer(server, tmp_path))
    counts = Counts.of(ix.stats())
    assert [counts.get(f"rejected_{why}", "dev") for why in ("malformed", "not_unit", "bad_time", "wrong_dim")] == [
        1
    ] * 4
    assert counts.get("other_model", "dev") == 1 and counts.get("indexed") == 6
    assert snapshot_ids(ix.shard) == ids  # the good entries after the bad ones too
    group = client.xinfo_groups(key)[0]
    assert group["pending"] == 0 and group["last-delivered-id"].decode() == ids[-1]


def test_a_second_indexer_of_a_shard_stands_by_until_the_first_stops(server, client, tmp_path):
    write(client, "dev", free(np.random.default_rng(8), 5))
    first = catch_up(indexer(server, tmp_path))
    second = indexer(server, tmp_path)
    assert second.step() == 0 and not second.holding and not second.loaded
    stats = first.stop()  # snapshots and gives the lease up
    assert stats["vectors"] == 5 and Counts.of(stats).get("saved") == 1
    catch_up(second)
    assert second.holding and len(second.shard) == 5


def test_the_index_table_of_the_pipeline_config(tmp_path):
    config = PipelineConfig.from_dict({"index_dir": str(tmp_path), "index": {"dtype": "i8", "max_vectors": 10}})
    assert config.index.dtype == "i8" and config.index.max_vectors == 10 and config.index_dir == str(tmp_path)
    assert PipelineConfig().index_dir is None  # no index unless asked for
    for table, words in (({"dtype": "f32"}, "dtype must be one of"), ({"save_s": "soon"}, "save_s must be")):
        with pytest.raises(ConfigError, match=rf"\[index\]: {words}"):
            PipelineConfig.from_dict({"index": table})
    with pytest.raises(ConfigError, match="unknown pipeline config keys in \\[index\\]: 'ef'"):
        PipelineConfig.from_dict({"index": {"ef": 64}})


def test_bench_search_prints_its_figures():
    args = ["--windows", "3000", "--dim", "32", "--queries", "20", "--segment-vectors", "1000", "--devices", "10"]
    result = CliRunner().invoke(bench_search, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for figure in ("vectors/s into the index", "expansion_search 128: recall@10", "one device (10 %), exact"):
        assert figure in result.output
    assert "the live index's top-10 found" in result.output and "1.000" in result.output


def test_search_command_takes_a_clip_or_says_what_is_missing(server, client, tmp_path):
    """--example embeds the clip with the `tiny` encoder (RANDOM weights: the ranking means nothing, the command's
    path is what is tested)."""
    import soundfile

    write(client, "dev", free(np.random.default_rng(9), 5))
    clip = tmp_path / "clip.wav"
    soundfile.write(clip, np.random.default_rng(9).uniform(-0.5, 0.5, 32_000).astype(np.float32), 16_000)
    base = ["--model", MODEL, "--redis", server.url]
    found = CliRunner().invoke(search_command, ["--example", str(clip), "--modality", "audio", *base])
    assert found.exit_code == 0, found.output
    assert f"search example {clip} (tiny)" in found.stdout and "no search index" in found.stderr
    for args, words in (
        ([], "give what to search for"),
        (["a dog", "--vector", str(clip)], "give what to search for"),
        (["--example", str(clip)], "--example needs the clip's modality"),
    ):
        refused = CliRunner().invoke(search_command, [*args, *base])
        assert refused.exit_code == 2 and words in refused.output, refused.output
