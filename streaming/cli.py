"""The `bindstream` command line."""

from __future__ import annotations

import dataclasses
import logging

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from sensors.cli import main as device_commands
from streaming.alerts_cli import alert, bench_alerts, match, search_command, timeline_command, watch
from streaming.options import CHECKPOINT_OPTION, DEVICE_OPTION, DTYPE_OPTION, MODEL_OPTION
from streaming.security import redact_url

console = Console()



def parse_list(text: str, kind=int) -> tuple:
    return tuple(kind(part) for part in text.split(",") if part.strip())


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
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
    import encoders
    from encoders.transforms import load_file
    from encoders.weights import default_model_name

    enc = encoders.load(default_model_name(model, checkpoint), checkpoint=checkpoint, device=device, dtype=dtype)
    rows = []
    for path in files:
        try:
            file_modality, tensor = load_file(path, modality)
            rows.append((path, file_modality, enc.embed(file_modality, tensor.unsqueeze(0))[0]))
        except (ValueError, OSError) as err:
            raise click.ClickException(f"{path}: {err}") from err
    embeddings = np.stack([emb for _, _, emb in rows])
    text_embeddings = enc.embed_text(list(texts)) if texts else np.zeros((0, enc.embed_dim), np.float32)

    table = Table(title=f"embeddings ({enc.name}, {enc.dtype} on {enc.device})")
    table.add_column("file")
    table.add_column("modality")
    table.add_column("first values")
    for text in texts:
        table.add_column(f"cos({text!r})", justify="right")
    for (path, file_modality, emb), sims in zip(rows, embeddings @ text_embeddings.T if texts else [[]] * len(rows)):
        table.add_row(path, file_modality, np.array2string(emb[:4], precision=3), *[f"{s:.3f}" for s in sims])
    console.print(table)
    if enc.random_weights:
        console.print(f"[bold red]{encoders.api.random_weights_warning(enc.name)}[/]")
    if output:
        np.save(output, embeddings)
        console.print(f"wrote {embeddings.shape} float32 to {output}")


@main.group()
def bench() -> None:
    """Benchmarks that print figures (nothing here asserts a speed)."""


@bench.command("encoders")
@click.option("--model", type=click.Choice(["imagebind_huge", "tiny"]), default="tiny")
@CHECKPOINT_OPTION
@DEVICE_OPTION
@click.option("--dtype", "dtypes", default="float32", help="Comma-separated dtypes, timed side by side.")
@click.option("--batch", "batches", default="1,8,32", help="Comma-separated batch sizes.")
@click.option("--modalities", default="vision,text,audio,depth,thermal,imu")
@click.option("--min-seconds", default=1.0, help="Time each point for at least this long.")
def bench_encoders_command(model, checkpoint, device, dtypes, batches, modalities, min_seconds):
    """Clips per second per modality, batch size and dtype."""
    from encoders.bench import bench_encoders

    dtypes = parse_list(dtypes, str)
    rows = bench_encoders(model, device, dtypes, parse_list(batches), parse_list(modalities, str), checkpoint,
                          min_seconds)
    table = Table(title=f"{model} encoders, clips/s (device {device or 'auto'})")
    table.add_column("modality")
    table.add_column("batch", justify="right")
    for dtype in dtypes:
        table.add_column(dtype, justify="right")
        table.add_column("ms/batch", justify="right")
    if len(dtypes) > 1:
        table.add_column(f"{dtypes[1]} / {dtypes[0]}", justify="right")
    by_point = {(r.modality, r.batch, r.dtype): r for r in rows}
    for modality in parse_list(modalities, str):
        for batch in parse_list(batches):
            cells = []
            for dtype in dtypes:
                r = by_point[modality, batch, dtype]
                cells += [f"{r.clips_per_s:.1f}", f"{1000 * r.seconds_per_batch:.1f}"]
            if len(dtypes) > 1:
                ratio = by_point[modality, batch, dtypes[1]].clips_per_s / by_point[modality, batch, dtypes[0]].clips_per_s
                cells.append(f"{ratio:.2f}x")
            table.add_row(modality, str(batch), *cells)
    console.print(table)


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
}
FLAG_TYPES = {"int": int, "float": float, "str": str, "int | None": int, "float | None": float, "str | None": str}


def pipeline_options(command):
    """Flags shared by `run`, `demo` and `bench pipeline`: one per scalar key of PipelineConfig, each
    overriding the config file's value (the nested tables, such as [windowing], come from the file)."""
    from streaming.pipeline import PipelineConfig

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
    for f in dataclasses.fields(PipelineConfig):
        if f.name not in covered and f.type in FLAG_TYPES:
            help_text = FLAG_HELP.get(f.name, f"PipelineConfig.{f.name}")
            options.append(click.option(f"--{f.name.replace('_', '-')}", f.name, type=FLAG_TYPES[f.type],
                                        default=None, help=f"{help_text} [config default: {f.default}]"))
    for option in reversed(options):
        command = option(command)
    return command


def build_config(config_file, **flags):
    from streaming.pipeline import PipelineConfig

    config = PipelineConfig.from_toml(config_file) if config_file else PipelineConfig()
    for key, value in flags.items():
        if value not in (None, ()):
            setattr(config, key, list(value) if key == "ingest" else value)
    return config


def say_model(model: str) -> None:
    if model == "tiny":
        from encoders.api import random_weights_warning

        console.print(f"[bold red]model: tiny — {random_weights_warning('tiny')}[/] "
                      f"(put imagebind_huge.pth in $BINDSTREAM_HOME or pass --checkpoint for real embeddings)")
    else:
        console.print(f"model: {model}")


@main.command()
@pipeline_options
@click.option("--live/--no-live", default=True, help="Show the live table.")
def run(config_file, live, **flags):
    """The main job: ingest devices over ZeroMQ, embed their windows, publish to Redis, until SIGINT/SIGTERM;
    then drain (windows already accepted are embedded and published) and exit."""
    import signal
    import threading

    from rich.live import Live

    from streaming.dashboard import stats_table
    from streaming.pipeline import pipeline_session

    config = build_config(config_file, **flags)
    stop = threading.Event()
    with pipeline_session(config) as (pipeline, redis_url, model):
        # set after ray.init, which installs a SIGTERM handler of its own that ends the process undrained
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        say_model(model)
        console.print(f"ingest: {', '.join(pipeline.endpoints)}   redis: {redact_url(redis_url)}")
        if live:
            with Live(stats_table(pipeline.stats()), console=console, refresh_per_second=2) as view:
                while not stop.wait(0.5):
                    pipeline.autoscale()
                    view.update(stats_table(pipeline.stats()))
        else:
            while not stop.wait(0.5):
                pipeline.autoscale()
        console.print("draining ...")
        console.print(stats_table(pipeline.drain(), title="bindstream: final"))


@main.command()
@click.option("--seconds", default=20.0, help="How long the simulated wearables stream.")
@click.option("--devices", default=2, help="Simulated wearables.")
@click.option("--seed", default=0)
@pipeline_options
def demo(seconds, devices, seed, config_file, **flags):
    """The whole pipeline on this machine with simulated wearables: a live table, then a summary."""
    import threading

    from rich.console import Group
    from rich.live import Live

    from sensors.simulator import simulate
    from streaming.dashboard import per_modality_table, stats_table
    from streaming.pipeline import pipeline_session

    flags["ingest"] = flags["ingest"] or ("tcp://127.0.0.1:*",)
    config = build_config(config_file, **flags)
    with pipeline_session(config) as (pipeline, redis_url, model):
        say_model(model)
        sim = threading.Thread(target=simulate, kwargs=dict(endpoint=pipeline.endpoints[0], devices=devices,
                                                            seconds=seconds, seed=seed), daemon=True)
        sim.start()
        with Live(console=console, refresh_per_second=2) as view:
            while sim.is_alive():
                pipeline.autoscale()
                stats = pipeline.stats()
                view.update(Group(stats_table(stats, f"bindstream demo: {devices} wearables"),
                                  per_modality_table(stats)))
                sim.join(0.5)
        final = pipeline.drain()
    console.print(stats_table(final, "bindstream demo: summary"))
    console.print(per_modality_table(final))
    console.print(f"embeddings were in Redis at {redact_url(redis_url)}"
                  + ("" if config.redis else " (an embedded server, now stopped; use --redis URL to keep them)"))


@main.command()
@click.option("--redis", "redis_url", default="redis://127.0.0.1:6379/0")
@click.option("--device", default="*", help="Device id or glob.")
@click.option("--modality", default="*", help="vision, audio, depth, thermal, imu, fused, or a glob.")
@click.option("--count", type=int, default=None, help="Stop after this many records.")
def tail(redis_url, device, modality, count):
    """Print embedding records as they are published."""
    import time

    import redis

    from streaming.subscriber import decode_record, stream_keys

    client = redis.Redis.from_url(redis_url)
    last: dict[str, bytes] = {}  # per stream, the id after which to read
    seen = 0
    while count is None or seen < count:
        for key in stream_keys(client, device, modality):
            if key not in last:  # a stream found now: start after its newest entry
                newest = client.xrevrange(key, count=1)
                last[key] = newest[0][0] if newest else b"0-0"
        if not last:
            time.sleep(0.5)
            continue
        for key, entries in client.xread(last, block=1000, count=100) or []:
            key = key.decode()
            for entry_id, fields in entries:
                last[key] = entry_id
                r = decode_record(key, entry_id, fields)
                console.print(f"{r.device} {r.modality:8s} t0={r.t0} t1={r.t1} {r.model} "
                              f"emb[:4]={np.array2string(r.emb[:4], precision=3)}"
                              + (f" ({','.join(r.modalities)})" if r.modalities else ""))
                seen += 1


@bench.command("pipeline")
@click.option("--devices", default=2, help="Simulated wearables.")
@click.option("--seconds", default=10.0, help="Device time each wearable streams (sent as fast as possible).")
@pipeline_options
def bench_pipeline_command(devices, seconds, config_file, **flags):
    """End-to-end windows/s and publish latency, against the same windows done offline in one process."""
    from streaming.bench import bench_pipeline

    config = build_config(config_file, **flags)
    config.model = config.model or "tiny"
    f = bench_pipeline(devices, seconds, config)
    table = Table(title=f"pipeline, {devices} devices x {seconds:g} s, model {config.model}, CPU cores: "
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
