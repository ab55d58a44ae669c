"""The main job: ingest -> windowing -> embedders -> publisher, as Ray actors, with an ordered drain.

    ingest (PULL socket, one per endpoint) --by device--> window stage (N) --> embedder (M, GPU if any)
        --> publisher --> Redis Streams
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import tempfile
import time
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import ray

from encoders.weights import default_model_name
from sensors.protocol import DEFAULT_ENDPOINT, Limits

from .connections import ConnectionLimits
from .embedder import Embedder, EmbedderSettings
from .ingest import Ingest, IngestSettings
from .matcher import MatcherSettings, start_matchers
from .publisher import Publisher, PublisherSettings
from .redis_server import RedisServer
from .security import CurveSettings
from .windowing import WindowingConfig, WindowSpec, WindowStage, WindowStageSettings

log = logging.getLogger(__name__)
# Ingest, windowing and publisher actors run their calls one at a time (Ray's default), in the order they
# were sent: a device's messages must reach its windows in order. Their worker threads do the slow work
# beside. An embedder's push calls wait until their windows are published, so many run at once.
EMBEDDER_CONCURRENCY = 64
RESTART = dict(max_restarts=-1)  # every stage comes back after a crash (Ray restarts the actor)


@dataclass
class PipelineConfig:
    """Everything `bindstream run` needs. A TOML file with these keys (and [windowing], [limits] tables)
    is read by `from_toml`; the common keys are also command-line flags (`bindstream run --help`)."""

    ingest: list[str] = field(default_factory=lambda: [DEFAULT_ENDPOINT])
    redis: str | None = None  # URL; None: an embedded redis-server for the run
    model: str | None = None  # None: imagebind_huge when its checkpoint is on disk, else tiny
    checkpoint: str | None = None
    device: str | None = None
    dtype: str | None = None
    windowers: int = 1
    embedders: int = 1  # replicas; with `embedders_max`, the fewest
    embedders_max: int | None = None  # scale embedders with the windowing backlog up to this many
    scale_down_after_s: float = 30.0  # idle time before an extra embedder is removed
    max_batch: int = 32
    max_wait_ms: float = 50.0
    embed_queue: int = 256
    matchers: int = 1  # text-query alert matchers started with the pipeline (0: none); see ALERTS.md
    matcher_group: str = "bindstream-matchers"
    overload: str = "drop_oldest"  # live input; "block" for replays (see WindowStageSettings)
    window_backlog: int = 256
    embedder_throttle_ms: float = 0.0  # tests only: make embedders slower than the input
    publish_queue: int = 4096
    drain_timeout_s: float = 30.0  # the whole drain at exit; then what is left is dropped (dropped_drain_timeout)
    drain_report_s: float = 10.0  # past drain_timeout_s, wait this long for stages to stop (a batch in flight)
    stream_maxlen: int = 100_000
    stream_retention_s: float = 30 * 86_400  # a device's stream expires after this long without entries (0: never)
    fused_wait_s: float = 5.0
    torch_threads: int | None = None
    # placement: custom Ray resources each actor asks for (e.g. {"ingest": 0.01} on nodes whose ports
    # devices can reach); embedders ask for `embedder_gpus` GPUs (None: 1 when the cluster has GPUs)
    # and are spread over the nodes
    ingest_resources: dict[str, float] = field(default_factory=dict)
    embedder_resources: dict[str, float] = field(default_factory=dict)
    embedder_gpus: float | None = None
    windowing: WindowingConfig = field(default_factory=WindowingConfig)
    limits: Limits = field(default_factory=Limits)
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)  # per ingest socket, and devices
    curve: CurveSettings | None = None  # CurveZMQ for devices, [curve] table in TOML (SECURITY.md)

    @classmethod
    def from_toml(cls, path: str | Path) -> "PipelineConfig":
        data = tomllib.loads(Path(path).read_text())
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict) -> "PipelineConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown pipeline config keys: {sorted(unknown)}")
        data = dict(data)
        if "windowing" in data:
            windowing = {k: WindowSpec(**v) if isinstance(v, dict) else v for k, v in data["windowing"].items()}
            data["windowing"] = WindowingConfig(**windowing)
        if "limits" in data:
            data["limits"] = Limits(**data["limits"])
        if "connections" in data:
            data["connections"] = ConnectionLimits(**data["connections"])
        if "curve" in data:
            data["curve"] = CurveSettings(**data["curve"])
        if isinstance(data.get("ingest"), str):
            data["ingest"] = [data["ingest"]]
        return cls(**data)


def running_cluster_address() -> str | None:
    """The address of a Ray cluster to join: `$RAY_ADDRESS`, else the cluster `ray start` recorded on this
    machine if its GCS answers (a stale record from a stopped cluster is ignored)."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    record = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    try:
        address = record.read_text().strip()
        host, port = address.rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=1).close()
        return address
    except (OSError, ValueError):
        return None


def connect_ray() -> None:
    """Join the running Ray cluster if there is one, else start a local Ray."""
    if ray.is_initialized():
        return
    address = running_cluster_address()
    if address:
        ray.init(address=address, log_to_driver=False)
        log.info("joined the Ray cluster at %s", address)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)
        log.info("started a local Ray instance")


class Pipeline:
    """Creates the actors; `start()` opens the ingest sockets, `drain()` stops them and flushes every
    accepted window through to Redis, stage by stage."""

    def __init__(self, config: PipelineConfig, redis_url: str, model: str):
        self.config = config
        gpus = config.embedder_gpus
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 and config.device in (None, "cuda") else 0
        publisher = ray.remote(Publisher).options(num_cpus=0, max_task_retries=-1, **RESTART).remote(
            PublisherSettings(redis_url, maxlen=config.stream_maxlen, retention_s=config.stream_retention_s,
                              queue_capacity=config.publish_queue,
                              fused_wait_s=config.fused_wait_s)
        )
        embedder_settings = EmbedderSettings(
            model=model, checkpoint=config.checkpoint, device=config.device, dtype=config.dtype,
            max_batch=config.max_batch, max_wait_ms=config.max_wait_ms, queue_capacity=config.embed_queue,
            torch_threads=config.torch_threads, throttle_ms=config.embedder_throttle_ms,
        )
        self._new_embedder = lambda: ray.remote(Embedder).options(
            num_cpus=0 if gpus else 1, num_gpus=gpus, resources=config.embedder_resources,
            scheduling_strategy="SPREAD", max_concurrency=EMBEDDER_CONCURRENCY,
            max_task_retries=-1, **RESTART,  # calls open when it died are run again on the new one
        ).remote(embedder_settings, [publisher])
        embedders = [self._new_embedder() for _ in range(config.embedders)]
        self._idle_since: float | None = None
        windowers = [
            ray.remote(WindowStage).options(num_cpus=0, max_task_retries=-1, **RESTART).remote(
                WindowStageSettings(config.windowing, overload=config.overload, backlog=config.window_backlog,
                                    max_windows_per_call=config.max_batch),
                embedders,
            )
            for _ in range(config.windowers)
        ]
        ingests = [
            ray.remote(Ingest).options(num_cpus=0, resources=config.ingest_resources, **RESTART).remote(
                IngestSettings(endpoint, config.limits, windowing=config.windowing, curve=config.curve,
                               connections=config.connections), windowers
            )
            for endpoint in config.ingest
        ]
        self.stages = {"ingest": ingests, "window": windowers, "embed": embedders, "publish": [publisher]}
        if config.matchers:
            self.stages["match"] = start_matchers(MatcherSettings(group=config.matcher_group), redis_url,
                                                  config.matchers)
        self.endpoints: list[str] = []

    def start(self) -> list[str]:
        """Wait until the ingest sockets are bound; returns their endpoints."""
        self.endpoints = ray.get([a.bound_endpoint.remote() for a in self.stages["ingest"]])
        return self.endpoints

    def stats(self) -> dict[str, list[dict]]:
        refs = {stage: [a.stats.remote() for a in actors] for stage, actors in self.stages.items()}
        return {stage: ray.get(r) for stage, r in refs.items()}

    def drain(self) -> dict[str, list[dict]]:
        """Stop ingest, then let each stage finish what it accepted before the next one is drained, within
        `drain_timeout_s` in all. Past it, embedders and publisher drop what they hold and what still comes
        (counted per device as `dropped_drain_timeout`), and a stage silent `drain_report_s` later is
        reported with `unfinished` (its actors are killed with the session)."""
        deadline = time.monotonic() + self.config.drain_timeout_s
        report_by = deadline + self.config.drain_report_s
        stop = [a.stop.remote() for a in self.stages["ingest"]]
        wait_until(stop, deadline)
        flush = [a.flush.remote() for a in self.stages["window"]]
        wait_until(flush, deadline)
        # a flush still running past the deadline ends too: the embedders now refuse what it pushes
        embed = [a.drain.remote(remaining(deadline)) for a in self.stages["embed"]]
        final = {"ingest": results("ingest", stop, report_by), "window": results("window", flush, report_by)}
        wait_until(embed, report_by)
        final["embed"] = results("embed", [a.stats.remote() for a in self.stages["embed"]], report_by)
        final["publish"] = results("publish", [a.drain.remote(remaining(deadline)) for a in self.stages["publish"]],
                                   report_by)
        final["match"] = results("match", [a.stop.remote() for a in self.stages.get("match", [])], report_by)
        return final

    def autoscale(self) -> int:
        """Between `embedders` and `embedders_max` replicas: add one while the windowing backlog is over
        half full, remove one after `scale_down_after_s` with nothing waiting. Call it now and then (the
        `run` loop does); returns the number of embedders."""
        embedders = self.stages["embed"]
        maximum = self.config.embedders_max or self.config.embedders
        backlog = max(s.get("queue", 0) for s in ray.get([w.stats.remote() for w in self.stages["window"]]))
        if backlog > self.config.window_backlog // 2 and len(embedders) < maximum:
            self._set_embedders(embedders + [self._new_embedder()])
            log.info("backlog %d: added an embedder (%d now)", backlog, len(self.stages["embed"]))
        elif backlog == 0 and len(embedders) > self.config.embedders:
            self._idle_since = self._idle_since or time.monotonic()
            if time.monotonic() - self._idle_since >= self.config.scale_down_after_s:
                removed = embedders[-1]
                self._set_embedders(embedders[:-1])  # the windowers finish their calls to it first
                ray.get(removed.drain.remote())
                ray.kill(removed)
                self._idle_since = None
                log.info("idle: removed an embedder (%d now)", len(self.stages["embed"]))
        if backlog:
            self._idle_since = None
        return len(self.stages["embed"])

    def _set_embedders(self, embedders: list) -> None:
        ray.get([w.set_embedders.remote(embedders) for w in self.stages["window"]])
        self.stages["embed"] = embedders

    def kill(self) -> None:
        for actors in self.stages.values():
            for actor in actors:
                ray.kill(actor)


def remaining(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)


def wait_until(refs: list, deadline: float) -> None:
    """Wait for every call in `refs`, up to `deadline` (time.monotonic())."""
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=remaining(deadline))


def results(stage: str, refs: list, deadline: float) -> list[dict]:
    """The stats each call returns by `deadline`; for one that does not, or fails, a stub saying so."""
    wait_until(refs, deadline)
    out = []
    for i, ref in enumerate(refs):
        try:
            out.append(ray.get(ref, timeout=0))
        except ray.exceptions.RayError as err:
            log.warning("%s actor %d did not finish draining: %s", stage, i, type(err).__name__)
            out.append({"stage": stage, "counts": {}, "unfinished": type(err).__name__})
    return out


@contextmanager
def pipeline_session(config: PipelineConfig):
    """Connect Ray, start an embedded redis-server unless `config.redis` names one, create and start the
    pipeline; yields (pipeline, redis_url, model). On exit the actors and the embedded server are stopped
    (drain first to keep what was accepted). The server starts before Ray's threads: its preexec_fn is not
    safe once other threads run."""
    server = None if config.redis else RedisServer().start()
    pipeline = None
    try:
        connect_ray()
        redis_url = config.redis or server.url
        model = default_model_name(config.model, config.checkpoint)
        pipeline = Pipeline(config, redis_url, model)
        pipeline.start()
        yield pipeline, redis_url, model
    finally:
        if pipeline:
            pipeline.kill()
        if server:
            server.stop()
