"""Soak test: N simulated wearables in real time through the whole pipeline (ingest -> windowing -> embedder
-> publisher -> an embedded redis-server), for a fixed time. Samples the resident memory of every Ray actor
process, the driver and the redis-server, and the publisher's end-to-end latency, then prints tables.

    python bench/soak.py --devices 20 --seconds 120

The devices' payloads are generated once per `--bases` simulated wearables for `--cycle-s` seconds and then
replayed in a loop (each device keeps its own id, seq and clock): generating 20 wearables live would need
more CPU than the pipeline itself. Devices send non-blocking, as real sensors do; a full queue is a drop.

`--throttle-ms` makes the embedders slower than the input (an overload soak: windows are dropped, oldest
first, and counted, while memory and latency must stay bounded).
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field

import psutil
import ray
from rich.console import Console
from rich.table import Table

from sensors.protocol import NS_PER_S, SENSORS
from sensors.publisher import DevicePublisher
from sensors.simulator import COMMON_KEYS, SimulatedWearable
from streaming.bench import actor_pids, private_rss_mb
from streaming.pipeline import PipelineConfig, pipeline_session
from streaming.stage import Counts

SENSOR_ORDER = {s: i for i, s in enumerate(SENSORS)}
DROP_STAGES = ("window", "embed", "publish")  # whose drops, per reason and device, the report lists


@dataclass
class Sample:
    t_s: float
    rss_mb: dict[str, float]
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    published: int
    ingested: int
    queues: dict[str, int] = field(default_factory=dict)


class Fleet:
    """Simulated devices replaying cached payload cycles in real time, each on its own PUSH socket."""

    def __init__(self, endpoint: str, devices: int, bases: int, cycle_s: float, seed: int):
        self.names = [f"soak-{i:03d}" for i in range(devices)]
        self.cycles = []  # per base wearable: {sensor: (per_second, fields, [payload, ...])}
        for b in range(min(bases, devices)):
            grouped: dict[str, list] = {}
            for header, payload in SimulatedWearable(f"soak-base-{b}", seed + b, start_ns=0).messages(cycle_s):
                grouped.setdefault(header["sensor"], []).append((header, payload))
            per_sensor = {}
            for sensor, messages in grouped.items():
                fields = {key: value for key, value in messages[0][0].items() if key not in COMMON_KEYS}
                per_sensor[sensor] = (round(len(messages) / cycle_s), fields, [p for _, p in messages])
            self.cycles.append(per_sensor)
        self.publishers = {name: DevicePublisher(endpoint, name, linger_ms=0) for name in self.names}
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def _schedule(self, start_ns: int, end_ns: int):
        """(t_ns, device, sensor order, sensor, k) of every message in device-time order."""

        def stream(d: int, sensor: str, per_second: int):
            first = start_ns + d * 7_919_000  # devices do not all capture at the same instant
            k = 0
            while True:
                yield first + k * NS_PER_S // per_second, d, SENSOR_ORDER[sensor], sensor, k
                k += 1

        streams = [
            stream(d, sensor, per_second)
            for d in range(len(self.names))
            for sensor, (per_second, _, _) in self.cycles[d % len(self.cycles)].items()
        ]
        for item in heapq.merge(*streams):
            if item[0] >= end_ns or self.stop.is_set():
                return
            yield item

    def run(self, seconds: float) -> None:
        try:
            start = time.monotonic_ns()
            for t_ns, d, _, sensor, k in self._schedule(start, start + round(seconds * NS_PER_S)):
                delay = t_ns - time.monotonic_ns()
                if delay > 0:
                    time.sleep(delay / NS_PER_S)
                _, fields, payloads = self.cycles[d % len(self.cycles)][sensor]
                self.publishers[self.names[d]].send(sensor, t_ns, payloads[k % len(payloads)], **fields)
        except BaseException as err:  # reported by the main thread
            self.error = err

    def totals(self) -> tuple[int, int]:
        sent = sum(sum(p.sent.values()) for p in self.publishers.values())
        dropped = sum(sum(p.dropped.values()) for p in self.publishers.values())
        return sent, dropped

    def close(self) -> None:
        for p in self.publishers.values():
            p.close(linger_ms=0)


def sample(pipeline, pids: dict[str, int], began: float) -> Sample:
    stats = pipeline.stats()
    publish = stats["publish"][0]
    ingested = Counts.of(*stats["ingest"]).get("in")
    queues = {
        f"{stage}-{i}": s.get("queue", 0)
        for stage in ("embed", "publish")
        for i, s in enumerate(stats[stage])
        if "queue" in s
    }
    return Sample(
        time.monotonic() - began,
        private_rss_mb(pids),
        publish.get("latency_p50_ms"),
        publish.get("latency_p99_ms"),
        Counts.of(publish).get("out"),
        ingested,
        queues,
    )


def fmt(value, digits=0) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:,.{digits}f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between memory/latency samples")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--embedders", type=int, default=1)
    parser.add_argument("--windowers", type=int, default=1)
    parser.add_argument("--throttle-ms", type=float, default=0.0, help="extra time per embedder batch (overload)")
    parser.add_argument("--bases", type=int, default=4, help="distinct simulated wearables whose payloads are cycled")
    parser.add_argument("--cycle-s", type=float, default=2.0, help="seconds of payloads cached per base wearable")
    parser.add_argument("--settle-s", type=float, default=60.0, help="longest wait for the pipeline to drain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ray-address", default=None, help="join this Ray cluster (default: a new local one)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 120)

    if args.ray_address:
        ray.init(address=args.ray_address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)
    config = PipelineConfig(
        ingest=["tcp://127.0.0.1:*"],
        model=args.model,
        embedders=args.embedders,
        windowers=args.windowers,
        embedder_throttle_ms=args.throttle_ms,
    )
    with pipeline_session(config) as (pipeline, redis_url, model):
        endpoint = pipeline.endpoints[0]
        pids = {"driver": os.getpid(), **actor_pids(pipeline)}
        redis_procs = [p for p in psutil.Process().children(recursive=True) if "redis" in p.name()]
        if redis_procs:
            pids["redis-server"] = redis_procs[0].pid
        console.print(f"[bold]soak[/]: {args.devices} devices x {args.seconds:.0f} s -> {endpoint}, model {model}")
        t = time.monotonic()
        fleet = Fleet(endpoint, args.devices, args.bases, args.cycle_s, args.seed)
        console.print(f"payload cycles ready in {time.monotonic() - t:.1f} s; sending")
        began = time.monotonic()
        samples = [sample(pipeline, pids, began)]
        sender = threading.Thread(target=fleet.run, args=(args.seconds,), name="fleet", daemon=True)
        sender.start()
        try:
            while sender.is_alive():
                sender.join(timeout=args.sample_s)
                samples.append(sample(pipeline, pids, began))
                s = samples[-1]
                console.print(
                    f"  {s.t_s:6.0f} s  ingested {s.ingested:>9,}  published {s.published:>7,}  "
                    f"p50 {fmt(s.latency_p50_ms)} ms  p99 {fmt(s.latency_p99_ms)} ms  "
                    f"driver {fmt(s.rss_mb['driver'])} MB"
                )
        except KeyboardInterrupt:
            fleet.stop.set()
            sender.join()
        if fleet.error:
            raise fleet.error
        sent, dropped = fleet.totals()
        fleet.close()
        # let what is queued reach Redis (bounded), then the final figures
        deadline = time.monotonic() + args.settle_s
        while time.monotonic() < deadline:
            stats = pipeline.stats()
            ingest = Counts.of(*stats["ingest"])
            ingested = ingest.get("in") + ingest.get("rejected_")
            if ingested >= sent and all(s.get("queue", 0) == 0 for s in stats["embed"] + stats["publish"]):
                break
            time.sleep(1.0)
        end = sample(pipeline, pids, began)
        final = pipeline.drain()

    report = build_report(args, samples, end, final, sent, dropped)
    print_report(console, report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    return 0


def build_report(args, samples: list[Sample], end: Sample, final: dict, sent: int, dropped: int) -> dict:
    first = samples[0]
    memory = {}
    for name in first.rss_mb:
        series = [s.rss_mb.get(name, float("nan")) for s in samples + [end]]
        memory[name] = {
            "start": first.rss_mb[name],
            "peak": max(series),
            "end": end.rss_mb[name],
            "delta": end.rss_mb[name] - first.rss_mb[name],
        }
    counts = {stage: Counts.of(*actors) for stage, actors in final.items()}
    publish = final["publish"][0]
    return {
        "devices": args.devices,
        "seconds": args.seconds,
        "model": args.model,
        "messages_sent": sent,
        "messages_dropped_at_devices": dropped,
        "ingested": counts["ingest"].get("in"),
        "rejected": counts["ingest"].get("rejected_"),
        "windows": counts["window"].get("out"),
        **{
            f"{stage}_drops": {event: counts[stage].labels(event) for event in counts[stage].events("dropped_")}
            for stage in DROP_STAGES
        },
        "published": counts["publish"].labels("out"),
        "latency_p50_ms": publish.get("latency_p50_ms"),
        "latency_p99_ms": publish.get("latency_p99_ms"),
        "latency_timeline": [(round(s.t_s), s.latency_p50_ms, s.latency_p99_ms, s.published) for s in samples + [end]],
        "rss_mb": memory,
    }


def print_report(console: Console, r: dict) -> None:
    mem = Table(
        title=f"Private resident memory (MB: RSS less shared pages), {r['devices']} devices, {r['seconds']:.0f} s"
    )
    for col in ("process", "start", "peak", "end", "end - start"):
        mem.add_column(col, justify="left" if col == "process" else "right")
    for name, m in r["rss_mb"].items():
        mem.add_row(name, fmt(m["start"]), fmt(m["peak"]), fmt(m["end"]), f"{m['delta']:+,.0f}")
    console.print(mem)

    flow = Table(title="Flow")
    flow.add_column("figure")
    flow.add_column("value", justify="right")
    rows = [
        ("messages sent by devices", r["messages_sent"]),
        ("dropped at devices (queue full)", r["messages_dropped_at_devices"]),
        ("ingested", r["ingested"]),
        ("rejected at ingest", r["rejected"]),
        ("windows cut", r["windows"]),
    ]
    rows += [(f"published {m}", n) for m, n in sorted(r["published"].items())]
    rows += [
        (f"{stage} {event} {label}".rstrip(), n)
        for stage in DROP_STAGES
        for event, labels in sorted(r[f"{stage}_drops"].items())
        for label, n in sorted(labels.items())
    ]
    for name, value in rows:
        flow.add_row(name, f"{value:,}")
    flow.add_row("latency p50 (ms, last 4096 embeddings)", fmt(r["latency_p50_ms"], 1))
    flow.add_row("latency p99 (ms, last 4096 embeddings)", fmt(r["latency_p99_ms"], 1))
    console.print(flow)

    timeline = Table(title="Publisher latency over time (arrival at ingest -> written to Redis)")
    for col in ("t (s)", "p50 ms", "p99 ms", "published"):
        timeline.add_column(col, justify="right")
    for t, p50, p99, published in r["latency_timeline"]:
        timeline.add_row(str(t), fmt(p50, 1), fmt(p99, 1), f"{published:,}")
    console.print(timeline)


if __name__ == "__main__":
    sys.exit(main())
