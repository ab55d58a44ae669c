"""The main job: ingest -> windowing -> embedders -> publisher, as Ray actors, with an ordered drain.

ingest (PULL socket, one per endpoint) --by device--> window stage (N) --> embedder (M, GPU if any)
    --> publisher --> Redis Streams
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import logging
import os
import socket
import tempfile
import threading
import time
import tomllib
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import redis
import zmq

from encoders.weights import default_model_name
from sensors.protocol import DEFAULT_ENDPOINT, Limits
from sensors.recorder import RecordingSettings

from .alerts.matcher import DEFAULT_GROUP, MatcherSettings, start_matchers
from .alerts.notify import NotifySettings, start_notifier
from .connections import ConnectionLimits
from .curve import CurveSettings
from .embedder import Embedder, EmbedderSettings
from .evidence import EvidenceSettings
from .gating import GatingSettings
from .index.indexer import start_indexers
from .index.shard import IndexSettings
from .ingest import Ingest, IngestSettings
from .publisher import Publisher, PublisherSettings
from .redis_access import RedisAccessError, check_redis, redact_url
from .redis_server import RedisPortInUse, RedisServer
from .stage import CALL_OPTIONS, Counts, NamedActor
from .windowing import LIVE, PREPROCESS_ON, REPLAY, WindowingConfig, WindowSpec, WindowStage, WindowStageSettings

log = logging.getLogger(__name__)
# Ingest, windowing and publisher actors run their calls one at a time (Ray's default), in the order they
# were sent: a device's messages must reach its windows in order. Their worker threads do the slow work
# beside. An embedder's push calls wait until their windows are published, so many run at once.
EMBEDDER_CONCURRENCY = 64
AUTH_HINT_LOGGER = "ray._private.authentication.authentication_token_setup"  # its WARNING says how to opt out
MATCH_CATCH_UP_S = 5.0  # at the drain, longest wait for the matchers to read what was published
RESTART = dict(max_restarts=-1)  # every stage comes back after a crash (Ray restarts the actor)


# PipelineConfig's scalar fields, by the type they are annotated with: checked by `validate`, flags of the CLI
SCALAR_TYPES = {"int": int, "float": float, "str": str, "int | None": int, "float | None": float, "str | None": str}
TYPE_WORDS = {int: "an integer", float: "a number", str: "a string"}
AT_LEAST_ONE = {
    "windowers",
    "embedders",
    "embedders_max",
    "max_batch",
    "embed_queue",
    "window_backlog",
    "publish_queue",
    "stream_maxlen",
}


class ConfigError(ValueError):
    """A pipeline configuration that cannot work: the message names the key and the problem."""


class StartupError(RuntimeError):
    """Why the pipeline cannot start, worded for the person who started it: the problem and the fix."""


class StartupCancelled(Exception):
    """The start was cancelled (the `cancel` event of `pipeline_session` was set, e.g. by Ctrl-C)."""


def check_keys(cls, table, where: str) -> dict:
    """`table`, once it is a dict whose keys are fields of the dataclass `cls`; else ConfigError naming the
    unknown keys, and the known key each may have meant."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table, got {table!r}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [key for key in table if key not in known]
    if unknown:
        close = {key: difflib.get_close_matches(key, known, n=1) for key in unknown}
        named = ", ".join(f"{key!r}" + (f" (did you mean {close[key][0]!r}?)" if close[key] else "") for key in unknown)
        hint = (
            ""
            if all(close.values())
            else (
                f"; known: {', '.join(known)}"
                if where
                else "; the keys are in deploy/bindstream.toml and `bindstream run --help`"
            )
        )
        raise ConfigError(f"unknown pipeline config keys{' in ' + where if where else ''}: {named}{hint}")
    return table


@dataclass
class PipelineConfig:
    """Everything `bindstream run` needs. A TOML file with these keys (and [windowing], [limits] tables)
    is read by `from_toml`; the common keys are also command-line flags (`bindstream run --help`)."""

    ingest: list[str] = field(default_factory=lambda: [DEFAULT_ENDPOINT])
    redis: str | None = None  # URL; None: an embedded redis-server for the run
    redis_port: int | None = None  # of the embedded redis-server (None: a free port)
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
    matcher_group: str = DEFAULT_GROUP
    notify: NotifySettings = field(default_factory=NotifySettings)  # [notify]: global sinks; with the matchers
    overload: str = LIVE  # "drop_oldest" for live input; REPLAY ("block") for replays (see WindowStageSettings)
    window_backlog: int = 256
    # where vision, depth, thermal and audio windows are preprocessed: "windowing", "embedder" (on its device,
    # batched), or "auto": "embedder" when the embedders have a GPU (WindowStageSettings, streaming/windowing.py)
    preprocess_on: str = "auto"
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
    evidence: EvidenceSettings = field(default_factory=EvidenceSettings)  # [evidence]: raw buffer, evidence writer
    gating: GatingSettings = field(default_factory=GatingSettings)  # [gating]: unchanged windows not embedded again
    record: str | None = None  # folder where ingest records what it accepts (MCAP, PROTOCOL.md section 8); None: off
    recording: RecordingSettings = field(default_factory=RecordingSettings)  # [recording]: file size, age, disk budget
    index_dir: str | None = None  # folder of the search index's snapshots (ALERTS.md "Search"); None: no index
    index: IndexSettings = field(default_factory=IndexSettings)  # [index]: the search index's bounds and tuning

    @classmethod
    def from_toml(cls, path: str | Path) -> PipelineConfig:
        """Read a TOML file; ConfigError (naming the file) for bad TOML, an unknown key or a bad value."""
        try:
            return cls.from_dict(tomllib.loads(Path(path).read_text()))
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path} is not valid TOML: {err}") from err
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from err

    @classmethod
    def from_dict(cls, data: dict) -> PipelineConfig:
        data = dict(data)
        check_keys(cls, data, "")
        if isinstance(data.get("ingest"), str):
            data["ingest"] = [data["ingest"]]
        if "windowing" in data:
            check_keys(WindowingConfig, data["windowing"], "[windowing]")
            windowing: dict[str, Any] = {
                k: WindowSpec(**check_keys(WindowSpec, v, f"[windowing.{k}]")) if isinstance(v, dict) else v
                for k, v in data["windowing"].items()
            }
            data["windowing"] = WindowingConfig(**windowing)
        for name, table in (
            ("limits", Limits),
            ("connections", ConnectionLimits),
            ("curve", CurveSettings),
            ("recording", RecordingSettings),
            ("gating", GatingSettings),
            ("index", IndexSettings),
        ):
            if name in data:
                values = check_keys(table, data[name], f"[{name}]")
                try:
                    data[name] = table(**values)
                except ValueError as err:  # a value the table's own checks refuse
                    raise ConfigError(f"[{name}]: {err}") from err
        if "notify" in data:
            notify = check_keys(NotifySettings, data["notify"], "[notify]")
            try:
                data["notify"] = NotifySettings(**notify)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"[notify]: {err}") from err
        if "evidence" in data:
            evidence = check_keys(EvidenceSettings, data["evidence"], "[evidence]")
            try:
                data["evidence"] = EvidenceSettings(**evidence)
            except ValueError as err:
                raise ConfigError(f"[evidence]: {err}") from err
        config = cls(**data)
        config.validate()
        return config

    def validate(self) -> None:
        """ConfigError naming the first key whose value has the wrong type or is out of range."""
        for f in dataclasses.fields(self):
            value: Any = getattr(self, f.name)
            if f.type in SCALAR_TYPES and not (value is None and "None" in f.type):
                wanted = SCALAR_TYPES[f.type]
                if isinstance(value, bool) or not isinstance(value, (int, float) if wanted is float else wanted):
                    raise ConfigError(f"{f.name} must be {TYPE_WORDS[wanted]}, got {value!r}")
                least = 1 if f.name in AT_LEAST_ONE else 0
                if isinstance(value, (int, float)) and value < least:
                    raise ConfigError(f"{f.name} must be at least {least}, got {value}")
        if not (isinstance(self.ingest, list) and self.ingest and all(isinstance(e, str) for e in self.ingest)):
            raise ConfigError(f"ingest must be a list of endpoints such as {DEFAULT_ENDPOINT!r}, got {self.ingest!r}")
        for name in ("ingest_resources", "embedder_resources"):
            resources = getattr(self, name)
            if not isinstance(resources, dict) or not all(isinstance(v, (int, float)) for v in resources.values()):
                raise ConfigError(f"{name} must be a table of resource = amount, got {resources!r}")
        if self.overload not in (LIVE, REPLAY):
            raise ConfigError(f"overload must be {LIVE!r} or {REPLAY!r}, got {self.overload!r}")
        if self.preprocess_on not in PREPROCESS_ON:
            raise ConfigError(f"preprocess_on must be one of {', '.join(PREPROCESS_ON)}, got {self.preprocess_on!r}")
        if self.redis_port is not None and not 0 < self.redis_port < 65536:
            raise ConfigError(f"redis_port must be a TCP port (1-65535), got {self.redis_port}")
        if self.redis and self.redis_port:
            raise ConfigError(
                "redis_port (--redis-port) is the embedded redis-server's; with redis (--redis) there is none"
            )


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


def connect_ray() -> bool:
    """Join the running Ray cluster if there is one, else start a local Ray; returns whether the Ray used is
    local (started here, now or earlier in this process: no autoscaler will add nodes to it). Quietly:
    without Ray's INFO lines, and without its hint on how to turn token authentication (on by default,
    SECURITY.md) off. StartupError if Ray does not start."""
    if ray.is_initialized():
        return running_cluster_address() is None
    address = running_cluster_address()
    logging.getLogger(AUTH_HINT_LOGGER).setLevel(logging.ERROR)
    try:
        ray.init(
            address=address,
            include_dashboard=None if address else False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    except Exception as err:  # Ray's many ways to fail: one line here, the traceback with --debug
        raise StartupError(
            f"Ray did not start{' at ' + address if address else ''}: {str(err).strip().splitlines()[0]}"
        ) from err
    if address:
        log.info("joined the Ray cluster at %s", address)
    else:
        log.info("started a local Ray instance")
    return address is None


def embedder_gpus(config: PipelineConfig) -> float:
    """GPUs per embedder: `embedder_gpus`, else 1 when the cluster has GPUs and no other device is asked for."""
    if config.embedder_gpus is not None:
        return config.embedder_gpus
    return 1 if ray.cluster_resources().get("GPU", 0) >= 1 and config.device in (None, "cuda") else 0


def check_placement(config: PipelineConfig, have: dict[str, float], gpus: float, local: bool) -> None:
    """Whether a Ray cluster with resources `have` can hold the actors (embedders with `gpus` each). If not:
    StartupError for a local Ray; on a cluster, whose autoscaler may add the nodes, a warning that the
    start waits for them."""
    asks = [
        ("ingest_resources", config.ingest_resources, len(config.ingest)),
        ("embedder_resources", config.embedder_resources, config.embedders),
        ("embedder_gpus", {"GPU": gpus}, config.embedders) if gpus else ("embedders", {"CPU": 1}, config.embedders),
    ]
    short = {
        key: [
            f"{name} {amount * count:g} (it has {have.get(name, 0):g})"
            for name, amount in resources.items()
            if amount * count > have.get(name, 0)
        ]
        for key, resources, count in asks
    }
    short = {key: phrases for key, phrases in short.items() if phrases}
    if not short:
        return
    problem = "; ".join(f"{key} asks for {', '.join(phrases)}" for key, phrases in short.items())
    if not local:
        log.warning("waiting for the Ray cluster to provide what %s (Ctrl-C to stop)", problem)
        return
    leave = [key for key in short if key.endswith("_resources")]
    fixes = (
        [f"leave {' and '.join(leave)} out of the config (they place actors on a cluster's nodes, deploy/README.md)"]
        if leave
        else []
    )
    fixes += ["pass --embedder-gpus 0"] if "embedder_gpus" in short else []
    fixes += [f"pass --embedders {int(have.get('CPU', 0))}"] if "embedders" in short else []
    raise StartupError(f"this machine's Ray cannot place the actors: {problem}\nfix: {'; '.join(fixes)}")


def endpoint_in_use(endpoint: str) -> str:
    return (
        f"ingest endpoint {endpoint} is in use (is `bindstream run` already running?): stop that, or pass "
        "--ingest with another port"
    )


def actor_failure(stage: str, endpoint: str, err: Exception) -> str:
    """One line on why a stage's actor did not start, with the fix where it is known."""
    lines = [line for line in str(getattr(err, "error_msg", err)).splitlines() if line.strip()]
    cause = lines[-1].strip() if lines else type(err).__name__
    if "Address already in use" in cause:
        return endpoint_in_use(endpoint)
    return f"the {stage} actor failed to start: {cause}"


class Pipeline:
    """Creates the actors; `start()` opens the ingest sockets, `drain()` stops them and flushes every
    accepted window through to Redis, stage by stage. Stages find the next one by its actor's name."""

    def __init__(self, config: PipelineConfig, redis_url: str, model: str):
        self.config = config
        prefix = f"bindstream-{uuid.uuid4().hex[:12]}"
        names = (f"{prefix}-{i}" for i in itertools.count())
        gpus = embedder_gpus(config)
        publisher_name = next(names)
        publisher = (
            ray.remote(Publisher)
            .options(name=publisher_name, num_cpus=0, max_task_retries=-1, **RESTART, **CALL_OPTIONS)
            .remote(
                PublisherSettings(
                    redis_url,
                    maxlen=config.stream_maxlen,
                    retention_s=config.stream_retention_s,
                    queue_capacity=config.publish_queue,
                    fused_wait_s=config.fused_wait_s,
                )
            )
        )
        embedder_settings = EmbedderSettings(
            model=model,
            checkpoint=config.checkpoint,
            device=config.device,
            dtype=config.dtype,
            max_batch=config.max_batch,
            max_wait_ms=config.max_wait_ms,
            queue_capacity=config.embed_queue,
            torch_threads=config.torch_threads,
            throttle_ms=config.embedder_throttle_ms,
        )
        self._new_embedder = lambda name=None: (
            ray.remote(Embedder)
            .options(
                name=name or next(names),
                num_cpus=0 if gpus else 1,
                num_gpus=gpus,
                resources=config.embedder_resources,
                scheduling_strategy="SPREAD",
                max_concurrency=EMBEDDER_CONCURRENCY,
                max_task_retries=-1,
                **CALL_OPTIONS,
                **RESTART,  # calls open when it died are run again on the new one
            )
            .remote(embedder_settings, [NamedActor(publisher_name)])
        )
        embedder_names = [next(names) for _ in range(config.embedders)]
        embedders = [self._new_embedder(name) for name in embedder_names]
        self._idle_since: float | None = None
        window_names = [next(names) for _ in range(config.windowers)]
        windowers = [
            ray.remote(WindowStage)
            .options(name=name, num_cpus=0, max_task_retries=-1, **RESTART, **CALL_OPTIONS)
            .remote(
                WindowStageSettings(
                    config.windowing,
                    overload=config.overload,
                    backlog=config.window_backlog,
                    max_windows_per_call=config.max_batch,
                    redis_url=redis_url,
                    evidence=config.evidence,
                    gating=config.gating,
                    preprocess_on=config.preprocess_on,
                    embedders_have_gpu=bool(gpus) and (config.device or "cuda").startswith("cuda"),
                ),
                [NamedActor(n) for n in embedder_names],
            )
            for name in window_names
        ]
        ingests = [
            ray.remote(Ingest)
            .options(num_cpus=0, resources=config.ingest_resources, **RESTART, **CALL_OPTIONS)
            .remote(
                IngestSettings(
                    endpoint,
                    config.limits,
                    windowing=config.windowing,
                    curve=config.curve,
                    connections=config.connections,
                    # absolute: the ingest actor's working folder is Ray's, not this one
                    record=str(Path(config.record).expanduser().absolute()) if config.record else None,
                    recording=config.recording,
                ),
                [NamedActor(n) for n in window_names],
            )
            for endpoint in config.ingest
        ]
        self.stages = {"ingest": ingests, "window": windowers, "embed": embedders, "publish": [publisher]}
        if config.matchers:
            self.stages["match"] = start_matchers(
                MatcherSettings(group=config.matcher_group), redis_url, config.matchers
            )
            self.stages["notify"] = [start_notifier(config.notify, redis_url)]
        if config.index_dir:  # absolute: the indexers' working folder is Ray's, not this one
            folder = Path(config.index_dir).expanduser().absolute()
            self.stages["index"] = start_indexers(config.index, redis_url, folder, model)
        self.endpoints: list[str] = []

    def start(self, cancel: threading.Event | None = None) -> list[str]:
        """Wait until every actor is up and the ingest sockets are bound; returns their endpoints. An actor
        that fails to start raises StartupError with its error (an ingest endpoint in use, a checkpoint
        that does not load); `cancel`, once set, StartupCancelled."""
        calls = {
            actor.stats.options(max_task_retries=0).remote(): (stage, i)  # retried, its failure is printed
            for stage, actors in self.stages.items()
            for i, actor in enumerate(actors)
        }
        waiting = list(calls)
        while waiting:
            if cancel is not None and cancel.is_set():
                raise StartupCancelled()
            ready, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=0.2)
            for ref in ready:
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as err:
                    stage, i = calls[ref]
                    raise StartupError(
                        actor_failure(stage, self.config.ingest[i] if stage == "ingest" else "", err)
                    ) from err
        self.endpoints = ray.get([a.bound_endpoint.remote() for a in self.stages["ingest"]])
        return self.endpoints

    def stats(self) -> dict[str, list[dict]]:
        refs = {stage: [a.stats.remote() for a in actors] for stage, actors in self.stages.items()}
        return {stage: ray.get(r) for stage, r in refs.items()}

    def drain(self) -> dict[str, list[dict]]:
        """Stop ingest, then let each stage finish what it accepted before the next one is drained, within
        `drain_timeout_s` in all. Past it, windowing, embedders and publisher drop what they hold and what still comes
        (counted per device as `dropped_drain_timeout`), and a stage silent `drain_report_s` later is
        reported with `unfinished` (its actors are killed with the session)."""
        deadline = time.monotonic() + self.config.drain_timeout_s
        report_by = deadline + self.config.drain_report_s
        stop = [a.stop.remote() for a in self.stages["ingest"]]
        wait_until(stop, deadline)
        flush = [a.flush.remote(remaining(deadline)) for a in self.stages["window"]]
        wait_until(flush, deadline)
        # a flush still running past the deadline drops what it holds; the embedders refuse what it pushes
        embed = [a.drain.remote(remaining(deadline)) for a in self.stages["embed"]]
        final = {"ingest": results("ingest", stop, report_by), "window": results("window", flush, report_by)}
        wait_until(embed, report_by)
        final["embed"] = results("embed", [a.stats.remote() for a in self.stages["embed"]], report_by)
        final["publish"] = results(
            "publish", [a.drain.remote(remaining(deadline)) for a in self.stages["publish"]], report_by
        )
        self._matchers_catch_up(
            Counts.of(*final["publish"]).get("out"), min(report_by, time.monotonic() + MATCH_CATCH_UP_S)
        )
        final["match"] = results("match", [a.stop.remote() for a in self.stages.get("match", [])], report_by)
        final["notify"] = results("notify", [a.stop.remote() for a in self.stages.get("notify", [])], report_by)
        final["index"] = results("index", [a.stop.remote() for a in self.stages.get("index", [])], report_by)
        return final

    def _matchers_catch_up(self, published: int, deadline: float) -> None:
        """Wait until the matchers have read `published` entries, or `deadline` (a stream that appeared last
        is found at their next discovery)."""
        matchers = self.stages.get("match", [])
        while matchers and time.monotonic() < deadline:
            read = Counts.of(*ray.get([m.stats.remote() for m in matchers])).get("in")
            if read >= published:
                return
            time.sleep(0.1)

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


def check_redis_url(url: str) -> None:
    """StartupError unless Redis answers at `url`, naming the problem and the fix (never the password)."""
    try:
        check_redis(url)
    except RedisAccessError as err:
        text = str(err).rstrip(".")
        if "refused access" in text or "refused the credentials" in text:
            text += "; put the right password in the URL: redis://:PASSWORD@HOST:PORT/0"
        elif text.startswith("cannot reach"):
            text += "; start it, or leave out --redis (and $BINDSTREAM_REDIS_URL) for an embedded redis-server"
        elif text.startswith("TLS"):
            text += "; check the certificate options of the URL (SECURITY.md, section 3)"
        raise StartupError(text) from err
    except redis.RedisError as err:
        raise StartupError(f"Redis at {redact_url(url)} answered with an error: {err}") from err


def check_endpoint(endpoint: str) -> None:
    """StartupError unless this machine can bind the ingest `endpoint` (it may be in use, or name no
    interface here)."""
    ctx = zmq.Context()
    try:
        ctx.socket(zmq.PULL).bind(endpoint)
    except zmq.ZMQError as err:
        if err.errno == zmq.EADDRINUSE:
            raise StartupError(endpoint_in_use(endpoint)) from err
        raise StartupError(f"cannot bind the ingest endpoint {endpoint}: {err}") from err
    finally:
        ctx.destroy(linger=0)


def start_redis_server(port: int | None) -> RedisServer:
    try:
        return RedisServer(port).start()
    except RedisPortInUse as err:
        raise StartupError(
            f"port {port} is in use, so the embedded redis-server cannot have it: use the Redis "
            f"there with --redis redis://127.0.0.1:{port}/0, or pick another --redis-port"
        ) from err


@contextmanager
def pipeline_session(config: PipelineConfig, cancel: threading.Event | None = None):
    """Check Redis and the ingest endpoints, start an embedded redis-server unless `config.redis` names one,
    connect Ray, check that the actors can be placed, create and start the pipeline; yields (pipeline,
    redis_url, model). What cannot start raises StartupError; `cancel`, once set, StartupCancelled at the
    next step (Ray is never interrupted while it starts: that leaves its agent processes behind). On exit
    the actors and the embedded server are stopped (drain first to keep what was accepted). The server
    starts before Ray's threads: its preexec_fn is not safe once other threads run."""

    def step() -> None:
        if cancel is not None and cancel.is_set():
            raise StartupCancelled()

    if config.redis:
        check_redis_url(config.redis)
    if not config.ingest_resources:  # the ingest actors run here
        for endpoint in config.ingest:
            check_endpoint(endpoint)
    if not ray.is_initialized() and not running_cluster_address():  # a local Ray has no custom resources:
        check_placement(config, {"CPU": config.embedders}, gpus=0, local=True)  # fail before starting it
    step()
    server = None if config.redis else start_redis_server(config.redis_port)
    redis_url = server.url if server else config.redis or ""
    pipeline: Pipeline | None = None
    try:
        step()
        local = connect_ray()
        step()
        check_placement(config, ray.cluster_resources(), embedder_gpus(config), local)
        model = default_model_name(config.model, config.checkpoint)
        pipeline = Pipeline(config, redis_url, model)
        pipeline.start(cancel)
        yield pipeline, redis_url, model
    finally:
        if pipeline:
            pipeline.kill()
        if server:
            server.stop()
