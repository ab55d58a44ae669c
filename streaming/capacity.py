"""Capacity benchmark (`bindstream bench capacity`): the largest fleet of simulated wearables streaming at real
pace that the pipeline keeps up with on this machine, and what a window costs in CPU, stage by stage.

The fleet replays `pool` recorded wearables (sensors/simulator.py, in one of its `PROFILES`) under ids of its
own, each from its own socket and at its own phase, a recording of `loop_s` seconds replayed in a loop (its clock
and `seq` going on). A wearable's clock is monotonic (PROTOCOL.md section 4): it reads the wall clock less that
phase, as if each had booted at its own moment, so the window grids of different wearables (whole seconds of their
clocks) end at different moments; with `aligned_clocks` every clock is the wall clock and every wearable's windows
end at the same moments, the worst case (a second's windows arrive at once). The wearables omit the frames no
window uses and send audio and IMU in 100 ms chunks (`chunk_ms`), as PROTOCOL.md section 5 recommends. A sender
process streams the fleet, so that its sending does not share this process's interpreter; on a small machine it
shares the CPU with the pipeline, as the devices' own computers would not (its CPU is reported apart).

Each step streams a fleet for `seconds`, then waits up to `settle_s` for the windows cut to be published. A
fleet keeps up when nothing was dropped (by any stage, or by a wearable's full socket), every window cut was
published, and for each modality the `quantile` of its windows was published within the window's hop of its
end (the latency from a window's last sample, on the wall clock, to its entry's id in Redis).
Fleets double from `first` until one falls behind; then `refine` bisections narrow the largest that keeps up.

CPU is each actor process's CPU time (all its threads: Ray's, ZeroMQ's) over a step, per window published
(`fused` records are not windows), the encoder's forward apart (the embedder's `forward_cpu_s`); with
`preprocess_on` embedder, the embedder's preprocessing of media is told apart too (`preprocess_cpu_s`, still in
`embed`: on this machine's CPU it is CPU work, on a GPU node the GPU's). Efficiency
is the largest real-time fleet's windows/s over what windowing and the encoder do in one process, offline, on
the recorded wearables' messages (streaming/bench.py's `offline_throughput`).
"""

from __future__ import annotations

import heapq
import math
import multiprocessing
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgpack
import numpy as np
import psutil
import redis
import zmq

from sensors.protocol import NS_PER_S, OMITTED, header_map
from sensors.sampling import FrameOmitter, FrameSampling
from sensors.simulator import DEFAULT_PROFILE, PROFILES, SimulatedWearable

from .records import FUSED, STREAMS
from .redis_access import connect
from .redis_layout import stream_key

if TYPE_CHECKING:
    from .pipeline import PipelineConfig
    from .windowing import WindowingConfig

# Ray, torch and the pipeline are imported by the functions that use them: the sender process imports this
# module too, and needs none of them (seconds of start-up and hundreds of MB on a machine the pipeline shares).

CPU_STAGES = ("ingest", "window", "embed", "publish", "match", "notify")  # the actors whose CPU is counted
QUERIES = (("a person walking", "vision"), ("a dog barking", "audio"), ("a person walking", "fused"))  # scored
GOLDEN = (math.sqrt(5) - 1) / 2  # wearable j starts j * GOLDEN seconds (mod 1) into the second: spread phases
WINDOW_STAGES = ("ingest", "window", "embed", "publish")  # the stages whose drops lose windows
POLL_S = 0.2
START_DELAY_NS = NS_PER_S // 10  # a fleet's clocks start this long after it is sent off
OFFLINE_ROUNDS = 2  # offline runs, the best one counted (the first one also warms the encoder up)


@dataclass(frozen=True)
class CapacitySettings:
    seconds: float = 15.0  # wall seconds each fleet streams
    profile: str = DEFAULT_PROFILE  # sensors/simulator.py PROFILES
    first: int = 1  # wearables of the first step
    max_wearables: int = 256  # no fleet beyond this
    refine: int = 2  # bisections between the largest fleet that kept up and the smallest that fell behind
    pool: int = 2  # distinct recorded wearables the fleet replays
    loop_s: int = 10  # seconds of each recording (whole seconds: every sensor's messages then loop evenly)
    quantile: float = 0.99  # of each modality's windows, the share that must be published within their hop
    settle_s: float = 10.0  # after a step, the longest wait for the windows cut to be published
    # one wearable first, not reported: every stage's first calls (imports, first kernels) are slow; 6 s takes in
    # a first window of every modality (IMU windows are 5 s long)
    warmup_s: float = 6.0
    sndhwm: int = 1000  # messages a wearable's socket queues; a send beyond is dropped (the fleet fell behind)
    seed: int = 0
    # wearables send every frame's pixels (ingest drops those no window uses); default: they omit them, as a
    # wearable saving its radio does (sensors/sampling.py): 0.8 instead of 19.7 MB/s each
    all_frames: bool = False
    # wearables send their audio and IMU samples in chunks of at least this many ms, as the device publishers do
    # (PROTOCOL.md section 5): the simulator's 20 ms audio and 50 ms IMU chunks joined (0: sent as they are)
    chunk_ms: int = 100
    # every wearable's clock is the wall clock (their windows end together) instead of reading it less its phase
    aligned_clocks: bool = False

    def __post_init__(self):
        if self.profile not in PROFILES:
            raise ValueError(f"unknown profile {self.profile!r}; choose from {', '.join(PROFILES)}")
        if not (self.seconds > 0 and self.settle_s >= 0 and 0 < self.quantile <= 1):
            raise ValueError(f"need seconds > 0, settle_s >= 0 and 0 < quantile <= 1: {self}")
        if not 1 <= self.first <= self.max_wearables or self.pool < 1 or self.loop_s < 1 or self.refine < 0:
            raise ValueError(f"need 1 <= first <= max_wearables, pool >= 1, loop_s >= 1, refine >= 0: {self}")
        if not 0 <= self.chunk_ms <= 1000:
            raise ValueError(f"need 0 <= chunk_ms <= 1000: {self}")


@dataclass
class Step:
    """One fleet's run: what it published, how late, what was lost, and the CPU each stage spent."""

    wearables: int
    seconds: float  # wall time the fleet streamed
    windows: int  # published (`fused` records left out)
    latency_s: dict[str, float]  # per modality, the settings' quantile of the publish latency
    dropped: dict[str, int]  # "stage: reason" -> n, the sender's full sockets as "sender: dropped"
    unpublished: int  # windows cut but not published once the step settled
    cpu_s: dict[str, float]  # per stage (CPU_STAGES), the encoder's forward left out of `embed`
    forward_cpu_s: float
    other_cpu_s: dict[str, float]  # outside the stages: the sender, redis-server, Ray's raylet
    behind: str = ""  # why the fleet fell behind; "" when it kept up
    cut: int = 0  # windows cut
    gated: int = 0  # of them, windows the gate found unchanged: published again without a forward (gating.py)
    # the share of the machine's CPU time (every core, every process) that was busy while the fleet streamed: near
    # 1, the machine is the limit, not the pipeline's stages
    machine_busy: float = math.nan
    # of `embed`: preprocessing windows that carry their media (`preprocess_on` embedder); on a GPU node the GPU
    # does this work, so the CPU side there is about `cpu_ms_per_window` less this
    preprocess_cpu_s: float = 0.0

    @property
    def forwards_saved(self) -> float:
        """The share of the windows cut that took no model forward (activity gating)."""
        return self.gated / self.cut if self.cut else math.nan

    @property
    def windows_per_s(self) -> float:
        return self.windows / self.seconds

    def per_window_ms(self, cpu_s: float) -> float:
        return 1000 * cpu_s / self.windows if self.windows else math.nan

    @property
    def per_stage_cpu_ms(self) -> dict[str, float]:
        return {stage: self.per_window_ms(s) for stage, s in self.cpu_s.items()}

    @property
    def cpu_ms_per_window(self) -> float:
        return self.per_window_ms(sum(self.cpu_s.values()))


@dataclass
class Capacity:
    settings: CapacitySettings
    model: str
    steps: list[Step]
    offline_windows_per_s: float  # windowing + encoder in one process, on the recorded wearables' messages
    cores: int = field(default_factory=lambda: psutil.cpu_count() or 1)

    @property
    def best(self) -> Step | None:
        """The largest fleet that kept up."""
        return max((s for s in self.steps if not s.behind), key=lambda s: s.wearables, default=None)

    def as_json(self) -> dict:
        best = self.best
        figures = {
            "wearables": best.wearables if best else 0,
            "windows_per_s": best.windows_per_s if best else 0.0,
            "cpu_ms_per_window": best.cpu_ms_per_window if best else math.nan,
            "per_stage_cpu_ms": best.per_stage_cpu_ms if best else {},
            "forward_cpu_ms_per_window": best.per_window_ms(best.forward_cpu_s) if best else math.nan,
            "preprocess_cpu_ms_per_window": best.per_window_ms(best.preprocess_cpu_s) if best else math.nan,
            "other_cpu_ms_per_window": {k: best.per_window_ms(v) for k, v in best.other_cpu_s.items()} if best else {},
            "efficiency": (best.windows_per_s if best else 0.0) / self.offline_windows_per_s,
            "offline_windows_per_s": self.offline_windows_per_s,
            "forwards_saved": best.forwards_saved if best else math.nan,
            "machine_busy": best.machine_busy if best else math.nan,
        }
        return {
            **figures,
            "model": self.model,
            "profile": self.settings.profile,
            "chunk_ms": self.settings.chunk_ms,
            "aligned_clocks": self.settings.aligned_clocks,
            "cores": self.cores,
            "steps": [
                {
                    "wearables": s.wearables,
                    "windows": s.windows,
                    "windows_per_s": s.windows_per_s,
                    "cpu_ms_per_window": s.cpu_ms_per_window,
                    "per_stage_cpu_ms": s.per_stage_cpu_ms,
                    "forward_cpu_ms_per_window": s.per_window_ms(s.forward_cpu_s),
                    "preprocess_cpu_ms_per_window": s.per_window_ms(s.preprocess_cpu_s),
                    "latency_s": s.latency_s,
                    "dropped": s.dropped,
                    "unpublished": s.unpublished,
                    "behind": s.behind,
                    "forwards_saved": s.forwards_saved,
                    "machine_busy": s.machine_busy,
                }
                for s in self.steps
            ],
        }


# ----- the recorded wearables and the sender -----


@dataclass(frozen=True)
class Recorded:
    """One recorded message: when it is sent (from the recording's start), its header's fields but the device's,
    its payload, and its capture time (its header's `t_ns`, from the recording's start)."""

    offset_ns: int
    sensor: str
    fields: dict
    payload: bytes
    capture_ns: int


def record(settings: CapacitySettings) -> list[list[Recorded]]:
    """`pool` wearables' first `loop_s` seconds (deterministic: the sender and the offline run record alike),
    audio and IMU chunks joined to `chunk_ms`."""
    out = []
    for i in range(settings.pool):
        wearable = SimulatedWearable(f"pool-{i}", settings.seed, 0, profile=PROFILES[settings.profile])
        common = ("v", "device", "sensor", "seq", "t_ns")
        messages = [
            Recorded(h["t_ns"], h["sensor"], {k: v for k, v in h.items() if k not in common}, payload, h["t_ns"])
            for h, payload in wearable.messages(settings.loop_s)
        ]
        out.append(join_chunks(messages, settings.chunk_ms * NS_PER_S // 1000))
    return out


def join_chunks(messages: list[Recorded], chunk_ns: int) -> list[Recorded]:
    """Each sensor's consecutive sample chunks (audio, IMU: those with a `rate`) joined into chunks of at least
    `chunk_ns` (the last one: what is left): the same samples in fewer messages. A joined chunk has its first
    part's capture time and is sent when its last part would have been."""

    def joined(group: list[Recorded]) -> Recorded:
        first, payload = group[0], b"".join(p.payload for p in group)
        return Recorded(group[-1].offset_ns, first.sensor, first.fields, payload, first.capture_ns)

    out: list[Recorded] = []
    parts: dict[str, list[Recorded]] = {}
    for m in messages:
        if "rate" not in m.fields or not chunk_ns:
            out.append(m)
            continue
        group = parts.setdefault(m.sensor, [])
        if group and m.capture_ns - group[0].capture_ns >= chunk_ns:
            out.append(joined(group))
            group.clear()
        group.append(m)
    out += [joined(group) for group in parts.values() if group]
    return sorted(out, key=lambda m: m.offset_ns)


def replay(
    recording: list[Recorded],
    device: str,
    start_ns: int,
    seconds: float,
    loop_s: int,
    sampling: dict[str, FrameSampling] | None = None,
    wall_offset_ns: int = 0,
) -> Iterator[tuple]:
    """(when it is sent, on the wall clock; header bytes; payload) of `device` replaying `recording` from `start_ns`
    on its clock for `seconds`, its clock reading the wall clock less `wall_offset_ns`: loop k is the recording
    `k * loop_s` later, each sensor's `seq` going on from the last loop. With `sampling`, the frames no window uses
    on that clock go omitted or are skipped (sensors/sampling.py)."""
    omitter = FrameOmitter(sampling)
    end = round(seconds * NS_PER_S)
    for loop in range(math.ceil(seconds / loop_s)):
        for m in recording:
            offset = loop * loop_s * NS_PER_S + m.offset_ns
            if offset >= end:
                break
            t_ns, payload = start_ns + loop * loop_s * NS_PER_S + m.capture_ns, m.payload
            if (numbered := omitter.next(m.sensor, t_ns)) is None:
                continue
            seq, omitted = numbered
            header = header_map(device, m.sensor, seq, t_ns, **m.fields)
            if omitted:
                header[OMITTED], payload = True, b""
            yield wall_offset_ns + start_ns + offset, msgpack.packb(header), payload


def phase_ns(j: int) -> int:
    return round((j * GOLDEN) % 1 * NS_PER_S)


def wall_offset_ns(j: int, settings: CapacitySettings) -> int:
    """The wall clock less wearable j's clock (0 with `aligned_clocks`)."""
    return 0 if settings.aligned_clocks else phase_ns(j)


def stream_fleet(
    recordings: list[list[Recorded]],
    settings: CapacitySettings,
    endpoint: str,
    devices: list[str],
    start_ns: int,
    seconds: float,
    sampling: dict[str, FrameSampling] | None = None,
) -> tuple[int, int]:
    """Send each device's replay for `seconds` from its own PUSH socket when its clock says, device j starting
    `phase_ns(j)` after `start_ns` on the wall clock; returns the messages sent, and how many of them a full socket
    refused (dropped)."""
    ctx = zmq.Context()
    sockets = []
    for _ in devices:
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, settings.sndhwm)
        sock.setsockopt(zmq.LINGER, round(settings.settle_s * 1000))
        sock.connect(endpoint)
        sockets.append(sock)
    streams = [
        (
            (t, j, header, payload)
            for t, header, payload in replay(
                recordings[j % len(recordings)],
                device,
                start_ns + phase_ns(j) - wall_offset_ns(j, settings),
                seconds,
                settings.loop_s,
                sampling,
                wall_offset_ns(j, settings),
            )
        )
        for j, device in enumerate(devices)
    ]
    sent = dropped = 0
    for t, j, header, payload in heapq.merge(*streams, key=lambda item: item[0]):
        wait = (t - time.time_ns()) / NS_PER_S
        if wait > 0:
            time.sleep(wait)
        sent += 1
        try:
            sockets[j].send_multipart([header, payload], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            dropped += 1
    for sock in sockets:
        sock.close()
    ctx.term()
    return sent, dropped


def sender(conn, settings: CapacitySettings, sampling: dict[str, FrameSampling]) -> None:
    """The sender process: records the pool, says it is ready, then streams each fleet it is sent
    (endpoint, devices, start_ns, seconds) and answers (messages sent, dropped), until it gets None. The
    wearables omit the frames no window uses by `sampling` (empty: none)."""
    recordings = record(settings)
    conn.send("ready")
    while (job := conn.recv()) is not None:
        endpoint, devices, start_ns, seconds = job
        conn.send(stream_fleet(recordings, settings, endpoint, devices, start_ns, seconds, sampling))


# ----- measuring a step -----


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads; NaN when it cannot be read (gone, or remote)."""
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.Error:
        return math.nan


def busy_share(before, after) -> float:
    """The share of the CPU time between two `psutil.cpu_times()` readings that was neither idle nor waiting for I/O
    (Linux counts a guest's time in `user` and `nice` too: left out once)."""

    def delta(name: str) -> float:
        return getattr(after, name, 0.0) - getattr(before, name, 0.0)

    total = sum(after) - sum(before) - delta("guest") - delta("guest_nice")
    return 1 - (delta("idle") + delta("iowait")) / total if total > 0 else math.nan


def raylet_pid(pid: int) -> int | None:
    """The raylet that started the actor process `pid` (where Ray's object store lives), if it is local."""
    try:
        parent = psutil.Process(pid).parent()
        return parent.pid if parent and "raylet" in parent.name() else None
    except psutil.Error:
        return None


def drops(stats: dict[str, list[dict]]) -> Counter:
    """Every dropped, rejected or refused count of the stages that carry windows, by "stage: reason"."""
    from .dashboard import drops_by_reason

    return Counter({what: n for what, n in drops_by_reason(stats).items() if what.split(":")[0] in WINDOW_STAGES})


def count(stats: dict[str, list[dict]], stage: str, event: str) -> int:
    from .stage import Counts

    return Counts.of(*stats[stage]).get(event)


def windows_published(stats: dict[str, list[dict]]) -> int:
    from .stage import Counts

    publish = Counts.of(*stats["publish"])
    return publish.get("out") - publish.get("out", FUSED)


def publish_latency(client: redis.Redis, wall_offsets: dict[str, int], quantile: float) -> dict[str, float]:
    """Per modality, the `quantile` of (entry id's ms - window end) in seconds over the windows of the devices in
    `wall_offsets` (device -> the wall clock less its clock, ns); an entry id starts with the Redis server's time of
    its XADD."""
    latency: dict[str, list[float]] = {}
    pipe = client.pipeline(transaction=False)
    keys = [(device, modality) for device in wall_offsets for modality in STREAMS]
    for device, modality in keys:
        pipe.xrange(stream_key(device, modality))
    for (device, modality), entries in zip(keys, pipe.execute()):
        for entry_id, f in entries:
            added_ms = int(entry_id.split(b"-")[0])
            ended_s = (int(f[b"t1"]) + wall_offsets[device]) / NS_PER_S
            latency.setdefault(modality, []).append(added_ms / 1000 - ended_s)
    return {m: float(np.quantile(v, quantile)) for m, v in latency.items()}


def behind(step: Step, windowing: WindowingConfig) -> str:
    """Why the step's fleet fell behind, or "" when it kept up."""
    reasons = []
    if step.dropped:
        reasons.append("dropped " + ", ".join(f"{n} {what}" for what, n in step.dropped.items()))
    if step.unpublished:
        reasons.append(f"{step.unpublished} windows cut but not published after the settle time")
    for modality, seconds in step.latency_s.items():
        hop = windowing.spec(modality).hop_ns / NS_PER_S
        if seconds > hop:
            reasons.append(f"{modality} latency {seconds:.2f} s > hop {hop:g} s")
    return "; ".join(reasons)


class CapacityRun:
    """A started pipeline and sender process, stepping fleets through them."""

    def __init__(self, settings: CapacitySettings, pipeline, redis_url: str, conn, sender_pid: int):
        self.settings = settings
        self.pipeline = pipeline
        self.conn = conn
        self.client = connect(redis_url)
        from .bench import actor_pids

        self.pids = actor_pids(pipeline)
        others = {"sender": sender_pid, "redis": int(self.client.info("server")["process_id"])}
        raylet = raylet_pid(self.pids["ingest-0"])
        self.others = others | ({"ray": raylet} if raylet else {})
        self.windowing = pipeline.config.windowing
        self.runs = 0

    def cpu(self) -> tuple[dict[str, float], dict[str, float]]:
        by_stage = {stage: 0.0 for stage in CPU_STAGES if stage in self.pipeline.stages}
        for name, pid in self.pids.items():
            by_stage[name.rsplit("-", 1)[0]] += cpu_seconds(pid)
        return by_stage, {name: cpu_seconds(pid) for name, pid in self.others.items()}

    def step(self, wearables: int, seconds: float | None = None) -> Step:
        """Stream `wearables` for `seconds` (default: the settings') and measure what the pipeline did with them."""
        self.runs += 1
        seconds = seconds or self.settings.seconds
        devices = [f"cap{self.runs}-{j:04d}" for j in range(wearables)]
        before, (stage_cpu, other_cpu) = self.pipeline.stats(), self.cpu()
        offsets = {device: wall_offset_ns(j, self.settings) for j, device in enumerate(devices)}
        machine_before = psutil.cpu_times()
        self.conn.send((self.pipeline.endpoints[0], devices, time.time_ns() + START_DELAY_NS, seconds))
        sent, sender_dropped = self.conn.recv()
        machine_busy = busy_share(machine_before, psutil.cpu_times())
        deadline = time.monotonic() + self.settings.settle_s
        while True:  # until every message sent is windowed and every window cut is published
            after = self.pipeline.stats()
            windowed = count(after, "window", "in") - count(before, "window", "in")
            cut = count(after, "window", "out") - count(before, "window", "out")
            published = windows_published(after) - windows_published(before)
            if (windowed >= sent - sender_dropped and published >= cut) or time.monotonic() >= deadline:
                break
            time.sleep(POLL_S)
        stage_after, other_after = self.cpu()
        forward = sum(e.get("forward_cpu_s", 0.0) for e in after["embed"])
        forward -= sum(e.get("forward_cpu_s", 0.0) for e in before["embed"])
        cpu = {stage: stage_after[stage] - stage_cpu[stage] for stage in stage_cpu}
        cpu["embed"] -= forward
        preprocess = sum(e.get("preprocess_cpu_s", 0.0) for e in after["embed"])
        preprocess -= sum(e.get("preprocess_cpu_s", 0.0) for e in before["embed"])
        dropped = dict(+(drops(after) - drops(before)))
        if sender_dropped:
            dropped["sender: full socket"] = sender_dropped
        step = Step(
            wearables,
            seconds,
            published,
            publish_latency(self.client, offsets, self.settings.quantile),
            dropped,
            max(cut - published, 0),
            cpu,
            forward,
            {name: other_after[name] - other_cpu[name] for name in other_cpu},
            cut=cut,
            gated=count(after, "window", "gated") - count(before, "window", "gated"),
            machine_busy=machine_busy,
            preprocess_cpu_s=preprocess,
        )
        step.behind = behind(step, self.windowing)
        return step


def add_queries(redis_url: str, encoder) -> None:
    """Standing text queries, so that the matcher scores what it reads as it would in a deployment."""
    from .alerts.prompts import ensemble
    from .alerts.queries import ensure_background, save_query
    from .alerts.records import Query

    client = connect(redis_url)
    for text, modality in QUERIES:
        ensure_background(client, encoder, modality)
        save_query(client, Query(text, modality, ensemble(encoder, [text], modality)[0], encoder.name))


def fleet_sizes(settings: CapacitySettings, run: Callable[[int], Step]) -> list[Step]:
    """Double the fleet from `first` until one falls behind (or `max_wearables`), then bisect `refine` times."""
    steps = []
    good, bad, n = 0, None, settings.first
    while True:
        step = run(n)
        steps.append(step)
        if step.behind:
            bad = n
            break
        good = n
        if n >= settings.max_wearables:
            break
        n = min(2 * n, settings.max_wearables)
    for _ in range(settings.refine):
        if bad is None or bad - good <= 1:
            break
        n = (good + bad) // 2
        step = run(n)
        steps.append(step)
        good, bad = (good, n) if step.behind else (n, bad)
    return steps


def bench_capacity(
    settings: CapacitySettings, config: PipelineConfig, on_step: Callable[[Step], None] = lambda step: None
) -> Capacity:
    """Start the sender and the pipeline (`config`), step fleets through them (`on_step` after each), and time
    the offline run on the recorded wearables."""
    import torch

    import encoders

    from .bench import offline_throughput
    from .pipeline import pipeline_session

    config.ingest = ["tcp://127.0.0.1:*"]
    config.model = config.model or "tiny"
    if config.torch_threads is None:
        config.torch_threads = 1  # one encoder thread: its forward's CPU is then all counted apart
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of this one's threads is inherited
    conn, child = ctx.Pipe()
    sampling = {} if settings.all_frames else config.windowing.frame_sampling()
    process = ctx.Process(target=sender, args=(child, settings, sampling), name="capacity-sender", daemon=True)
    process.start()
    try:
        if conn.recv() != "ready":
            raise RuntimeError("the capacity sender did not start")
        with pipeline_session(config) as (pipeline, redis_url, model):
            encoder = encoders.load(model, checkpoint=config.checkpoint)
            add_queries(redis_url, encoder)
            capacity_run = CapacityRun(settings, pipeline, redis_url, conn, process.pid or 0)
            if settings.warmup_s:
                capacity_run.step(1, settings.warmup_s)

            def run(n: int) -> Step:
                step = capacity_run.step(n)
                on_step(step)
                return step

            steps = fleet_sizes(settings, run)
        conn.send(None)
    finally:
        process.join(timeout=settings.settle_s + 5)
        if process.is_alive():
            process.kill()
    recordings = record(settings)
    frames = [
        [header, payload]
        for _, header, payload in heapq.merge(
            *(replay(r, f"pool-{i}", 0, settings.loop_s, settings.loop_s, sampling) for i, r in enumerate(recordings)),
            key=lambda item: item[0],
        )
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(config.torch_threads)  # as the embedder's (the windowing actors run one)
    try:
        offline = max(offline_throughput(frames, encoder, config.max_batch)[1] for _ in range(OFFLINE_ROUNDS))
    finally:
        torch.set_num_threads(threads)
    return Capacity(settings, model, steps, offline)
