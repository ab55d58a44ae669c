"""`bindstream run` and `bindstream demo`, and what every command that starts the pipeline shares: one flag per
scalar key of PipelineConfig over the config file's value, and a mistake the user can fix (a bad config,
Redis or port; Ctrl-C) told in one line."""

from __future__ import annotations

import dataclasses
import re
import sys
import threading
import traceback
from contextlib import contextmanager, nullcontext

import click

from streaming.pipeline import (
    LIVE,
    PREPROCESS_ON,
    REPLAY,
    SCALAR_TYPES,
    ConfigError,
    PipelineConfig,
    StartupCancelled,
    StartupError,
    pipeline_session,
)
from streaming.redis_access import redact_url

from .options import CHECKPOINT_OPTION, DEVICE_OPTION, DTYPE_OPTION, MODEL_OPTION, redis_option
from .terminal import console, stop_on_signals
from .ui import console_beside, ui_options

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
    "preprocess_on": "Where windows are preprocessed; auto: on the embedders when they have a GPU.",
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
    "record": "Record what ingest accepts into rotating MCAP files in this folder (bounds: [recording] in the config).",
    "index_dir": "Keep a search index of the streams, its snapshots in this folder (bounds: [index] in the config).",
}
TEST_FLAGS = {"embedder_throttle_ms"}  # left out of --help


def pipeline_options(command):
    """Flags shared by `run`, `demo` and `bench pipeline`: one per scalar key of PipelineConfig, each
    overriding the config file's value (the nested tables, such as [windowing], come from the file)."""
    options = [
        click.option(
            "--config",
            "config_file",
            type=click.Path(exists=True, dir_okay=False),
            default=None,
            help="TOML file with PipelineConfig keys (see deploy/bindstream.toml).",
        ),
        redis_option(embedded=True),
        click.option(
            "--ingest", multiple=True, help="Endpoint to bind for devices (repeatable); default tcp://127.0.0.1:5555."
        ),
        MODEL_OPTION,
        CHECKPOINT_OPTION,
        DEVICE_OPTION,
        DTYPE_OPTION,
        click.option(
            "--gating/--no-gating",
            "gating_enabled",
            default=None,
            help="Activity gating: a window that did not change since its stream's last embedded one is not "
            "embedded, its embedding is published again (streaming/gating.py, [gating] in the config) [default: on]",
        ),
    ]
    covered = {"redis", "ingest", "model", "checkpoint", "device", "dtype"}
    types = {"overload": click.Choice([LIVE, REPLAY]), "preprocess_on": click.Choice(PREPROCESS_ON)}
    for f in dataclasses.fields(PipelineConfig):
        if f.name not in covered and f.type in SCALAR_TYPES:
            help_text = FLAG_HELP.get(f.name, f"PipelineConfig.{f.name}")
            options.append(
                click.option(
                    f"--{f.name.replace('_', '-')}",
                    f.name,
                    type=types.get(f.name, SCALAR_TYPES[f.type]),
                    default=None,
                    hidden=f.name in TEST_FLAGS,
                    help=f"{help_text} [config default: {f.default}]",
                )
            )
    for option in reversed(options):
        command = option(command)
    return command


def build_config(config_file: str | None, redis_url: str | None, **flags) -> PipelineConfig:
    """The config file's PipelineConfig (or the defaults) with the flags given (--redis: its `redis`); a bad
    file or value ends the command with one line."""
    with user_errors():
        config = PipelineConfig.from_toml(config_file) if config_file else PipelineConfig()
        if (gating := flags.pop("gating_enabled", None)) is not None:
            config.gating = dataclasses.replace(config.gating, enabled=gating)
        for key, value in {"redis": redis_url, **flags}.items():
            if value not in (None, ()):
                setattr(config, key, list(value) if key == "ingest" else value)
        config.validate()
    return config


@contextmanager
def user_errors():
    """End the command with one line, and exit status 1, for a mistake the user can fix (ConfigError,
    StartupError; with --debug, after the traceback), and with one line, status 130, on Ctrl-C."""
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


def say_model(model: str) -> None:
    if model == "tiny":
        from encoders.api import random_weights_warning

        console.print(
            f"[bold red]model: tiny — {random_weights_warning('tiny')}[/] "
            f"(put imagebind_huge.pth in $BINDSTREAM_HOME or pass --checkpoint for real embeddings)"
        )
    else:
        console.print(f"model: {model}")


def say_ingest(endpoints: list[str], config: PipelineConfig) -> None:
    """Where devices connect; a warning when others than this machine may, without CurveZMQ keys."""
    console.print(f"ingest: {', '.join(endpoints)}", soft_wrap=True)
    exposed = [e for e in endpoints if not re.match(r"tcp://(127\.|localhost|\[::1\])", e)]
    if exposed and config.curve is None:
        console.print(
            f"[yellow]warning: {', '.join(exposed)} accepts devices without keys, and their ids are "
            "only claims: give devices CurveZMQ keys ([curve], SECURITY.md section 2)[/]",
            soft_wrap=True,
        )


def say_redis(redis_url: str, config: PipelineConfig) -> None:
    """Where the embeddings go; for the embedded server, that it ends with the command."""
    if config.redis:
        console.print(f"redis: {redact_url(redis_url)}", soft_wrap=True)
    else:
        console.print(
            f"redis: embedded redis-server at {redis_url}, gone when this command ends"
            + ("" if config.redis_port else "; --redis-port to pin it"),
            soft_wrap=True,
        )


@click.command()
@pipeline_options
@click.option("--live/--no-live", default=True, help="Show the live table.")
@ui_options
def run(config_file, redis_url, live, ui, ui_port, **flags):
    """The main job: ingest devices over ZeroMQ, embed their windows, publish to Redis, until SIGINT/SIGTERM;
    then drain (windows already accepted are embedded and published) and exit."""
    from rich.live import Live

    from streaming.dashboard import stats_table, summary

    config = build_config(config_file, redis_url, **flags)
    stop = stop_on_signals(threading.Event())
    console.print("starting (Ctrl-C to cancel) ...")
    with (
        user_errors(),
        pipeline_session(config, cancel=stop) as (pipeline, url, model),
        console_beside(ui, ui_port, url, model, config.checkpoint),
    ):
        stop_on_signals(stop)  # again: ray.init set a SIGTERM handler that ends the process undrained
        say_model(model)
        say_ingest(pipeline.endpoints, config)
        say_redis(url, config)
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


@click.command()
@click.option(
    "--seconds",
    default=45.0,
    help="How long the simulated wearables stream (their mics play a chirp burst at 35 s, then every 90 s).",
)
@click.option("--devices", default=2, help="Simulated wearables.")
@click.option("--seed", default=0, help="Seed of the simulated scenes and sounds.")
@click.option(
    "--events/--no-events",
    default=True,
    help="Find the wearables' chirp bursts with an example query and send the notifications to a local endpoint.",
)
@pipeline_options
@ui_options
def demo(seconds, devices, seed, events, config_file, redis_url, ui, ui_port, **flags):
    """The whole pipeline on this machine with simulated wearables: a live table, the events an example query
    finds and their notifications, then a summary."""
    from rich.console import Group
    from rich.live import Live

    from sensors.simulator import ChirpBursts, simulate
    from streaming.dashboard import per_modality_table, stats_table, summary

    from .demo import DemoEvents, DemoEventSettings

    flags["ingest"] = flags["ingest"] or ("tcp://127.0.0.1:*",)
    config = build_config(config_file, redis_url, **flags)
    bursts = ChirpBursts()
    found = DemoEvents(bursts, seconds, devices, DemoEventSettings()) if events and config.matchers else None
    if found:
        config.notify = dataclasses.replace(config.notify, urls=(*config.notify.urls, found.webhook.url))
    elif events:
        console.print("--matchers 0: nothing matches queries, so the demo finds no events")
    stop = stop_on_signals(threading.Event())
    with (
        user_errors(),
        found or nullcontext(),
        pipeline_session(config, cancel=stop) as (pipeline, url, model),
        console_beside(ui, ui_port, url, model, config.checkpoint),
    ):
        stop_on_signals(stop)  # a Ctrl-C now ends the simulation early; the summary follows
        say_model(model)
        say_redis(url, config)
        if found:
            found.start(url, model, config.checkpoint)

        def wearables() -> None:
            try:
                simulate(
                    endpoint=pipeline.endpoints[0],
                    devices=devices,
                    seconds=seconds,
                    seed=seed,
                    start_ns=found.start_ns if found else None,
                    bursts=bursts,
                    sampling=config.windowing.frame_sampling(),  # they omit the frames no window uses
                )
            except Exception:
                if not stop.is_set():  # after a Ctrl-C its sends may fail as the process ends
                    raise

        sim = threading.Thread(target=wearables, daemon=True)
        sim.start()
        with Live(console=console, refresh_per_second=2) as view:
            while sim.is_alive() and not stop.is_set():
                pipeline.autoscale()
                stats = pipeline.stats()
                view.update(
                    Group(stats_table(stats, f"bindstream demo: {devices} wearables"), per_modality_table(stats))
                )
                if found:
                    found.show_new()
                sim.join(0.5)
        if not console.is_terminal:
            console.line()  # into a pipe, rich leaves the live table's last line open
        final = pipeline.drain()
        if found:
            found.finish(config.notify, stop)
    console.print(summary(final, "bindstream demo: summary"))
    if found:
        found.report()
    console.print(
        f"embeddings were in Redis at {redact_url(url)}"
        + ("" if config.redis else " (an embedded server, now stopped; use --redis URL to keep them)")
    )
