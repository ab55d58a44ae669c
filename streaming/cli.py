"""The `bindstream` command line."""

from __future__ import annotations

import signal
import sys

signal.signal(signal.SIGINT, lambda *_: sys.exit(130))  # a Ctrl-C while the imports below load: no traceback

import dataclasses
import logging
import re
import traceback
from contextlib import contextmanager

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from encoders.config import MODALITIES
from sensors.cli import main as device_commands
from streaming.alerts_cli import alert, bench_alerts, match, search_command, timeline_command, watch
from streaming.options import (CHECKPOINT_OPTION, DEVICE_OPTION, DTYPE_OPTION, DTYPES, MODEL_OPTION, REDIS_OPTION,
                               wide_console)
from streaming.security import redact_url

signal.signal(signal.SIGINT, signal.default_int_handler)
console = wide_console()



def parse_list(text: str, kind=int) -> tuple:
    return tuple(kind(part) for part in text.split(",") if part.strip())


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.option("--debug", is_flag=True, help="Show the traceback of an error, not only its one-line message.")
def main(verbose: bool, debug: bool) -> None:
    """bindstream: wearable sensor streams -> ImageBind joint embeddings -> Redis."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--modality", type=click.Choice(["vision", "audio", "depth", "thermal", "imu"]), default=None,
              help="Modality of every file (default: from each file's extension).")
@click.option("--text", "texts", multiple=True, help="Also embed this text and print its similarity to each file.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write the (files, D) float32 embeddings to this .npy file.")
@MODEL_OPTION
@CHECKPOINT_OPTION
@DEVICE_OPTION
@DTYPE_OPTION
def embed(files, modality, texts, output, model, checkpoint, device, dtype):
    """Embed media files of any modality (images, video, audio, depth/thermal .npy, IMU .csv)."""
    from encoders.transforms import load_file
    from encoders.weights import default_model_name
    from streaming.alerts_cli import load_encoder
    from streaming.options import table

    loaded = []  # every file is read before the model loads, so that one it cannot use fails at once
    for path in files:
        try:
            loaded.append((path, *load_file(path, modality)))
        except (ValueError, OSError) as err:
            raise click.ClickException(f"{path}: {err}") from None
    enc = load_encoder(default_model_name(model, checkpoint), checkpoint, device, dtype)
    embeddings = np.stack([enc.embed(m, tensor.unsqueeze(0))[0] for _, m, tensor in loaded])
    text_embeddings = enc.embed_text(list(texts)) if texts else np.zeros((0, enc.embed_dim), np.float32)

    similarity = [f"cos({text!r})" for text in texts]
    out = table(f"embeddings ({enc.name}, {enc.dtype} on {enc.device})", ("file", "modality", "first values",
                                                                          *similarity), right=tuple(similarity))
    for (path, file_modality, _), emb, sims in zip(loaded, embeddings, embeddings @ text_embeddings.T):
        out.add_row(path, file_modality, np.array2string(emb[:4], precision=3), *[f"{s:.3f}" for s in sims])
    console.print(out)
    if output:
        np.save(output, embeddings)
        console.print(f"wrote {embeddings.shape} float32 to {output}")


@main.group()
def bench() -> None:
    """Benchmarks that print figures (nothing here asserts a speed)."""


def comma_list(kind=int, choices: tuple[str, ...] | None = None):
    """A click callback reading 'a,b,c' as a tuple of `kind`, each one of `choices` when given."""

    def parse(ctx, param, value: str) -> tuple:
        try:
            items = parse_list(value, kind)
        except ValueError:
            items = ()
        if choices is not None and (unknown := [item for item in items if item not in choices]):
            raise click.BadParameter(f"unknown {', '.join(map(repr, unknown))}; choose from {', '.join(choices)}")
        if not items or (kind is int and min(items) < 1):
            raise click.BadParameter(f"{value!r}: give comma-separated {'positive integers' if kind is int else 'names'}")
        return items

    return parse


@bench.command("encoders")
@click.option("--model", type=click.Choice(["imagebind_huge", "tiny"]), default="tiny", show_default=True)
@CHECKPOINT_OPTION
@DEVICE_OPTION
@click.option("--dtype", "dtypes", default="float32", show_default=True, callback=comma_list(str, DTYPES),
              help="Comma-separated dtypes, timed side by side.")
@click.option("--batch", "batches", default="1,8,32", show_default=True, callback=comma_list(),
              help="Comma-separated batch sizes.")
@click.option("--modalities", default=",".join(MODALITIES), show_default=True, callback=comma_list(str, MODALITIES),
              help="Comma-separated modalities.")
@click.option("--min-seconds", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Time each point for at least this long (after its warm-up).")
def bench_encoders_command(model, checkpoint, device, dtypes, batches, modalities, min_seconds):
    """Clips per second per modality, batch size and dtype, each point timed after a warm-up."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from encoders.api import random_weights_warning
    from encoders.bench import bench_encoders
    from streaming.options import table

    if not checkpoint:
        console.print(f"[bold red]{random_weights_warning(model)} (speed does not depend on the values)[/]")
    points = len(dtypes) * len(batches) * len(modalities)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(f"loading {model}", total=points)

        def on_point(done: int, modality: str, dtype: str, batch: int) -> None:
            progress.update(task, completed=done, description=f"timing {modality} {dtype} batch {batch}")

        try:
            rows = bench_encoders(model, device, dtypes, batches, modalities, checkpoint, min_seconds, on_point)
        except (FileNotFoundError, ValueError, RuntimeError) as err:
            raise click.ClickException(f"bench encoders: {err}") from None
    columns = ("modality", "batch", *[c for d in dtypes for c in (d, f"{d} ms/batch")],
               *([f"{dtypes[1]} / {dtypes[0]}"] if len(dtypes) > 1 else []))
    out = table(f"{model} encoders, clips/s (device {device or 'auto'})", columns, right=columns[1:])
    by_point = {(r.modality, r.batch, r.dtype): r for r in rows}
    for modality in modalities:
        for batch in batches:
            point = [by_point[modality, batch, dtype] for dtype in dtypes]
            cells = [f"{x:.1f}" for r in point for x in (r.clips_per_s, 1000 * r.seconds_per_batch)]
            if len(dtypes) > 1:
                cells.append(f"{point[1].clips_per_s / point[0].clips_per_s:.2f}x")
            out.add_row(modality, str(batch), *cells)
    console.print(out)


# --------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------

FLAG_HELP = {
    "embedders": "Embedder actors (one GPU each when present); the fewest with --embedders-max.",
    "embedders_max": "Add embedders while the windowing backlog is over half full, up to this many.",
    "scale_down_after_s": "Idle seconds before an added embedder is removed.",
    "windowers": "Windowing actors (devices are split among them).",
    "max_batch": "Windows per encoder call.",
    "max_wait_ms": "Longest a partial batch waits.",
    "matchers": "Alert matchers started with the pipeline (0: none).",
    "overload": "drop_oldest (live input) or block (replays).",
    "embed_queue": "Windows waiting per embedder; when full the oldest is dropped.",
    "window_backlog": "Windows waiting in a windowing actor when embedders fall behind (drop_oldest).",
    "publish_queue": "Embeddings waiting for Redis (rides out outages); when full the oldest is dropped.",
    "drain_timeout_s": "Longest drain at exit; what is left then is dropped, counted (dropped_drain_timeout).",
    "drain_report_s": "After --drain-timeout-s, how long stages may take to stop and report.",
    "stream_maxlen": "Entries kept per Redis stream (XADD MAXLEN ~).",
    "stream_retention_s": "A stream with no new entry this long expires (0: never): idle devices' keys go.",
    "fused_wait_s": "Longest a window waits for its modalities before it is fused.",
    "torch_threads": "torch threads per embedder.",
    "embedder_gpus": "GPUs per embedder (default: 1 when the cluster has GPUs).",
    "embedder_throttle_ms": "Tests only: extra time per embedder batch.",
    "matcher_group": "Consumer group of the alert matchers.",
    "redis_port": "Port of the embedded redis-server (pin it for other commands' default URL, e.g. 6379).",
}
TEST_FLAGS = {"embedder_throttle_ms"}  # left out of --help


def pipeline_options(command):
    """Flags shared by `run`, `demo` and `bench pipeline`: one per scalar key of PipelineConfig, each
    overriding the config file's value (the nested tables, such as [windowing], come from the file)."""
    from streaming.pipeline import LIVE, REPLAY, SCALAR_TYPES, PipelineConfig

    options = [
        click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="TOML file with PipelineConfig keys (see deploy/bindstream.toml)."),
        click.option("--redis", default=None, envvar="BINDSTREAM_REDIS_URL",
                     help="Redis URL (redis://, rediss://; env BINDSTREAM_REDIS_URL); default: an embedded server."),
        click.option("--ingest", multiple=True, help="Endpoint to bind for devices (repeatable); "
                                                     "default tcp://127.0.0.1:5555."),
        MODEL_OPTION, CHECKPOINT_OPTION, DEVICE_OPTION, DTYPE_OPTION,
    ]
    covered = {"redis", "ingest", "model", "checkpoint", "device", "dtype"}
    types = {"overload": click.Choice([LIVE, REPLAY])}
    for f in dataclasses.fields(PipelineConfig):
        if f.name not in covered and f.type in SCALAR_TYPES:
            help_text = FLAG_HELP.get(f.name, f"PipelineConfig.{f.name}")
            options.append(click.option(f"--{f.name.replace('_', '-')}", f.name,
                                        type=types.get(f.name, SCALAR_TYPES[f.type]), default=None,
                                        hidden=f.name in TEST_FLAGS, help=f"{help_text} [config default: {f.default}]"))
    for option in reversed(options):
        command = option(command)
    return command


def build_config(config_file, **flags):
    """The config file's PipelineConfig (or the defaults) with the flags given; a bad file or value ends the
    command with one line."""
    from streaming.pipeline import PipelineConfig

    with user_errors():
        config = PipelineConfig.from_toml(config_file) if config_file else PipelineConfig()
        for key, value in flags.items():
            if value not in (None, ()):
                setattr(config, key, list(value) if key == "ingest" else value)
        config.validate()
    return config


@contextmanager
def user_errors():
    """End the command with one line, and exit status 1, for a mistake the user can fix (ConfigError,
    StartupError; with --debug, after the traceback), and with one line, status 130, on Ctrl-C."""
    from streaming.pipeline import ConfigError, StartupCancelled, StartupError

    try:
        yield
    except (ConfigError, StartupError) as err:
        if click.get_current_context().find_root().params.get("debug"):
            traceback.print_exc()
        raise click.ClickException(str(err)) from None
    except StartupCancelled:
        click.echo("stopped (Ctrl-C) before the pipeline was up", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("stopped (Ctrl-C)", err=True)
        sys.exit(130)


def stop_on_signals(stop) -> None:
    """Make SIGINT (Ctrl-C) and SIGTERM set the event `stop` instead of ending the process."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())


def say_model(model: str) -> None:
    if model == "tiny":
        from encoders.api import random_weights_warning

        console.print(f"[bold red]model: tiny — {random_weights_warning('tiny')}[/] "
                      f"(put imagebind_huge.pth in $BINDSTREAM_HOME or pass --checkpoint for real embeddings)")
    else:
        console.print(f"model: {model}")


def say_ingest(endpoints: list[str], config) -> None:
    """Where devices connect; a warning when others than this machine may, without CurveZMQ keys."""
    console.print(f"ingest: {', '.join(endpoints)}", soft_wrap=True)
    exposed = [e for e in endpoints if not re.match(r"tcp://(127\.|localhost|\[::1\])", e)]
    if exposed and config.curve is None:
        console.print(f"[yellow]warning: {', '.join(exposed)} accepts devices without keys, and their ids are "
                      "only claims: give devices CurveZMQ keys ([curve], SECURITY.md section 2)[/]", soft_wrap=True)


def say_redis(redis_url: str, config) -> None:
    """Where the embeddings go; for the embedded server, that it ends with the command."""
    if config.redis:
        console.print(f"redis: {redact_url(redis_url)}", soft_wrap=True)
    else:
        console.print(f"redis: embedded redis-server at {redis_url}, gone when this command ends"
                      + ("" if config.redis_port else "; --redis-port to pin it"), soft_wrap=True)


@main.command()
@pipeline_options
@click.option("--live/--no-live", default=True, help="Show the live table.")
def run(config_file, live, **flags):
    """The main job: ingest devices over ZeroMQ, embed their windows, publish to Redis, until SIGINT/SIGTERM;
    then drain (windows already accepted are embedded and published) and exit."""
    import threading

    from rich.live import Live

    from streaming.dashboard import stats_table, summary
    from streaming.pipeline import pipeline_session

    config = build_config(config_file, **flags)
    stop = threading.Event()
    stop_on_signals(stop)
    console.print("starting (Ctrl-C to cancel) ...")
    with user_errors(), pipeline_session(config, cancel=stop) as (pipeline, redis_url, model):
        stop_on_signals(stop)  # again: ray.init set a SIGTERM handler that ends the process undrained
        say_model(model)
        say_ingest(pipeline.endpoints, config)
        say_redis(redis_url, config)
        if live:
            with Live(stats_table(pipeline.stats()), console=console, refresh_per_second=2) as view:
                while not stop.wait(0.5):
                    pipeline.autoscale()
                    view.update(stats_table(pipeline.stats()))
        else:
            while not stop.wait(0.5):
                pipeline.autoscale()
        console.print("draining: what was accepted is embedded and published ...")
        console.print(summary(pipeline.drain(), "bindstream: final"))


@main.command()
@click.option("--seconds", default=20.0, show_default=True, help="How long the simulated wearables stream.")
@click.option("--devices", default=2, show_default=True, help="Simulated wearables.")
@click.option("--seed", default=0, show_default=True, help="Seed of the simulated scenes and sounds.")
@pipeline_options
def demo(seconds, devices, seed, config_file, **flags):
    """The whole pipeline on this machine with simulated wearables: a live table, then a summary."""
    import threading

    from rich.console import Group
    from rich.live import Live

    from sensors.simulator import simulate
    from streaming.dashboard import per_modality_table, stats_table, summary
    from streaming.pipeline import pipeline_session

    flags["ingest"] = flags["ingest"] or ("tcp://127.0.0.1:*",)
    config = build_config(config_file, **flags)
    stop = threading.Event()
    stop_on_signals(stop)
    with user_errors(), pipeline_session(config, cancel=stop) as (pipeline, redis_url, model):
        stop_on_signals(stop)  # a Ctrl-C now ends the simulation early; the summary follows
        say_model(model)
        say_redis(redis_url, config)

        def wearables() -> None:
            try:
                simulate(endpoint=pipeline.endpoints[0], devices=devices, seconds=seconds, seed=seed)
            except Exception:
                if not stop.is_set():  # after a Ctrl-C its sends may fail as the process ends
                    raise

        sim = threading.Thread(target=wearables, daemon=True)
        sim.start()
        with Live(console=console, refresh_per_second=2) as view:
            while sim.is_alive() and not stop.is_set():
                pipeline.autoscale()
                stats = pipeline.stats()
                view.update(Group(stats_table(stats, f"bindstream demo: {devices} wearables"),
                                  per_modality_table(stats)))
                sim.join(0.5)
        final = pipeline.drain()
    console.print(summary(final, "bindstream demo: summary"))
    console.print(f"embeddings were in Redis at {redact_url(redis_url)}"
                  + ("" if config.redis else " (an embedded server, now stopped; use --redis URL to keep them)"))


@main.command()
@REDIS_OPTION
@click.option("--device", default="*", show_default=True,
              help="Device id or glob; devices that appear later are included from their first window.")
@click.option("--modality", default="*", show_default=True,
              help="vision, audio, depth, thermal, imu, fused, or a glob.")
@click.option("--since", default=None,
              help="First print the records stored in this last while (30s, 10m, 2h, 1d), or all of them (start); "
                   "default: only new ones.")
@click.option("--count", type=click.IntRange(min=1), default=None,
              help="Exit after this many records (default: run until Ctrl-C).")
def tail(redis_url, device, modality, since, count):
    """Print embedding records as they are published (with --since, the stored ones first), until Ctrl-C."""
    import redis

    from streaming.alerts_cli import connect
    from streaming.search import parse_duration_ms, since_id
    from streaming.subscriber import Tail

    try:
        since_ms = 0 if since is None else None if since.strip() == "start" else parse_duration_ms(since)
    except ValueError as err:
        raise click.BadParameter(f"{err}, or start", param_hint="--since") from None
    try:
        client = connect(redis_url)
        where = redact_url(redis_url)
        follow = Tail(client, device, modality, start="0" if since_ms is None else since_id(client, since_ms))
        printed, said_waiting = 0, False
        for r in follow.records():
            if r is None:
                if not printed and not said_waiting:
                    click.echo(f"waiting for records of {device}/{modality} at {where} (Ctrl-C to stop)", err=True)
                    said_waiting = True
                continue
            printed += 1
            click.echo(f"{r.device} {r.modality:8s} t0={r.t0} t1={r.t1} {r.model} "
                       f"emb[:4]={np.array2string(r.emb[:4], precision=3)}"
                       + (f" ({','.join(r.modalities)})" if r.modalities else ""))
            if printed == count:
                break
        if follow.skipped:
            click.echo(f"skipped {follow.skipped} malformed entries", err=True)
    except redis.RedisError as err:
        raise click.ClickException(f"Redis at {where}: {err}") from None
    except KeyboardInterrupt:
        pass  # Ctrl-C: the user is done


@bench.command("pipeline")
@click.option("--devices", default=2, help="Simulated wearables.")
@click.option("--seconds", default=10.0, help="Device time each wearable streams (sent as fast as possible).")
@pipeline_options
def bench_pipeline_command(devices, seconds, config_file, **flags):
    """End-to-end windows/s and publish latency, against the same windows done offline in one process."""
    from streaming.bench import bench_pipeline

    config = build_config(config_file, **flags)
    config.model = config.model or "tiny"
    with user_errors():
        f = bench_pipeline(devices, seconds, config)
    table = Table(title=f"pipeline, {devices} device{'s' * (devices != 1)} x {seconds:g} s, model {config.model}, CPU cores: "
                        f"{__import__('os').cpu_count()}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    rows = [
        ("messages / payload", f"{f.messages} / {f.payload_mb:.0f} MB", ""),
        ("windows", str(f.windows), ""),
        ("ingest alone (recv + validate, 1 thread)", f"{f.ingest_mb_per_s:.0f} MB/s", ">= 300 MB/s"),
        ("encoder alone (same windows, in process)", f"{f.encoder_windows_per_s:.1f} windows/s", ""),
        ("offline: windowing + encoder, 1 process", f"{f.offline_windows_per_s:.1f} windows/s", ""),
        ("pipeline end to end (ZeroMQ, Ray, Redis)", f"{f.pipeline_windows_per_s:.1f} windows/s", ""),
        ("pipeline efficiency (pipeline / offline)", f"{f.efficiency:.2f}", ">= 0.9"),
        ("publish latency p50 / p99 (burst: queueing included)",
         f"{f.latency_p50_ms:.0f} / {f.latency_p99_ms:.0f} ms", ""),
        ("stage busy s (ingest / window / embed / publish)",
         " / ".join(f"{f.busy_s[s]:.1f}" for s in ("ingest", "window", "embed", "publish")) + f" of {f.elapsed_s:.1f}",
         ""),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)


# device-side commands (camera, mic, frames, imu-csv, record, replay, simulate) live with the sensors
main.add_command(device_commands, name="device")
main.add_command(device_commands.commands["simulate"], name="simulate")
# text-query alerts and search over the embedding streams
for _command in (alert, match, watch, search_command, timeline_command):
    main.add_command(_command)
bench.add_command(bench_alerts, name="alerts")
