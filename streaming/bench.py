"""Pipeline benchmark: end-to-end windows/s and publish latency, next to the same work done offline in one
process (windowing + encoder), and the ingest stage's decode throughput on its own."""

from __future__ import annotations

import multiprocessing
import os
import time
from dataclasses import dataclass

import msgpack
import numpy as np
import psutil
import ray
import zmq

import encoders
from sensors.protocol import decode
from sensors.simulator import SimulatedWearable

from .pipeline import PipelineConfig, pipeline_session
from .stage import Counts
from .windowing import SECOND, Windower

START_NS = 1_000 * SECOND
MB = 2**20


def actor_pids(pipeline) -> dict[str, int]:
    """{"ingest-0": pid, ...} for every actor of the pipeline."""
    refs = {}
    for stage, actors in pipeline.stages.items():
        for i, actor in enumerate(actors):
            refs[f"{stage}-{i}"] = actor.__ray_call__.remote(lambda self: os.getpid())
    return {name: ray.get(ref, timeout=120) for name, ref in refs.items()}


def private_rss_mb(pids: dict[str, int]) -> dict[str, float]:
    """Private resident memory (RSS less shared pages) per process, MB. Shared pages are left out: Ray's
    object store is shared memory that every process touching it maps, and file pages are reclaimable."""
    out = {}
    for name, pid in pids.items():
        try:
            info = psutil.Process(pid).memory_info()
            out[name] = (info.rss - info.shared) / MB
        except psutil.Error:
            out[name] = float("nan")
    return out


@dataclass
class PipelineFigures:
    messages: int
    payload_mb: float
    windows: int
    pipeline_windows_per_s: float
    offline_windows_per_s: float  # windowing + encoder in one process, no transport
    encoder_windows_per_s: float  # encoder alone on the same windows
    latency_p50_ms: float
    latency_p99_ms: float
    ingest_mb_per_s: float  # receive + validate on one core
    elapsed_s: float
    busy_s: dict[str, float]  # per stage, seconds spent working during the pipeline run

    @property
    def efficiency(self) -> float:
        return self.pipeline_windows_per_s / self.offline_windows_per_s


def simulated_frames(devices: int, seconds: float, seed: int = 0) -> list[list[bytes]]:
    """Wire messages (header, payload) of `devices` simulated wearables, interleaved by device time."""
    streams = [SimulatedWearable(f"bench-{i:03d}", seed, START_NS).messages(seconds) for i in range(devices)]
    out = []
    for batch in zip(*streams):
        out += [[msgpack.packb(h), p] for h, p in batch]
    return out


def _send(endpoint: str, frames: list[list[bytes]], repeats: int = 1) -> None:
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(endpoint)
    for _ in range(repeats):
        for message in frames:
            push.send_multipart(message, copy=False)
    push.close(linger=-1)
    ctx.term()


def ingest_throughput(frames: list[list[bytes]], repeats: int = 3) -> float:
    """MB/s of payload received and validated by one thread (the sender is another process)."""
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind("tcp://127.0.0.1:*")
    endpoint = pull.getsockopt_string(zmq.LAST_ENDPOINT)
    total = len(frames) * repeats
    sender = multiprocessing.get_context("fork").Process(target=_send, args=(endpoint, frames, repeats))
    sender.start()
    message = pull.recv_multipart(copy=False)
    start, nbytes = time.perf_counter(), decode(message).nbytes
    for _ in range(total - 1):
        nbytes += decode(pull.recv_multipart(copy=False)).nbytes
    elapsed = time.perf_counter() - start
    sender.join()
    pull.close()
    ctx.term()
    return nbytes / elapsed / 1e6


def offline_throughput(frames: list[list[bytes]], encoder, max_batch: int) -> tuple[int, float, float]:
    """(windows, windows/s of windowing + encoding, windows/s of encoding alone, vision's normalisation of its
    levels included) in this process."""
    start = time.perf_counter()
    windower = Windower()
    windows = []
    for message in frames:
        windows += windower.add(decode(message))
    windowed = time.perf_counter()
    by_modality: dict[str, list] = {}
    for w in windows:
        by_modality.setdefault(w.modality, []).append(w.data)
    for modality, data in by_modality.items():
        for i in range(0, len(data), max_batch):
            encoder.embed(modality, np.stack(data[i : i + max_batch]))
    done = time.perf_counter()
    return len(windows), len(windows) / (done - start), len(windows) / (done - windowed)


def pipeline_throughput(frames: list[list[bytes]], config: PipelineConfig) -> tuple[float, dict]:
    """(windows published per second, final stats) for one run of the whole pipeline over `frames`."""
    config.ingest = ["tcp://127.0.0.1:*"]
    with pipeline_session(config) as (pipeline, _, _):
        start = time.perf_counter()
        _send(pipeline.endpoints[0], frames)
        while Counts.of(*pipeline.stats()["ingest"]).get("in") < len(frames):
            time.sleep(0.05)
        final = pipeline.drain()
        elapsed = time.perf_counter() - start
    publish = Counts.of(*final["publish"])
    published = publish.get("out") - publish.get("out", "fused")
    final["elapsed_s"] = elapsed
    return published / elapsed, final


def bench_pipeline(devices: int, seconds: float, config: PipelineConfig, rounds: int = 2) -> PipelineFigures:
    """Offline and pipeline runs alternate `rounds` times; each figure is the best of its runs, so that
    a noisy neighbour on a shared machine disturbs both sides alike."""
    frames = simulated_frames(devices, seconds)
    encoder = encoders.load(config.model or "tiny")
    payload_mb = sum(len(m[1]) for m in frames) / 1e6
    ingest_mb_s = ingest_throughput(frames)
    offline, pipeline_runs = [], []
    for _ in range(rounds):
        offline.append(offline_throughput(frames, encoder, config.max_batch))
        pipeline_runs.append(pipeline_throughput(frames, config))
    windows = offline[0][0]
    wps, final = max(pipeline_runs, key=lambda run: run[0])
    publish = final["publish"][0]
    return PipelineFigures(
        messages=len(frames),
        payload_mb=payload_mb,
        windows=windows,
        pipeline_windows_per_s=wps,
        offline_windows_per_s=max(o[1] for o in offline),
        encoder_windows_per_s=max(o[2] for o in offline),
        latency_p50_ms=publish.get("latency_p50_ms", float("nan")),
        latency_p99_ms=publish.get("latency_p99_ms", float("nan")),
        ingest_mb_per_s=ingest_mb_s,
        elapsed_s=final["elapsed_s"],
        busy_s={stage: sum(a["busy_s"] for a in final[stage]) for stage in ("ingest", "window", "embed", "publish")},
    )
