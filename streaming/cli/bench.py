"""`bindstream bench`: benchmarks that print figures (nothing here asserts a speed): the encoders, the
pipeline end to end (streaming/bench.py), and the alert matcher and search (streaming/alerts/bench.py)."""

from __future__ import annotations

import os

import click
import numpy as np

from encoders.modalities import MODALITIES
from streaming.alerts.bench import TARGET_P99_MS, TARGET_SCORE_RATE, AlertBench, mqtt_sink, run_bench
from streaming.alerts.sinks import SinkError

from .options import CHECKPOINT_OPTION, DEVICE_OPTION, DTYPES, connect
from .pipeline import build_config, pipeline_options, user_errors
from .terminal import console, table


@click.group()
def bench() -> None:
    """Benchmarks that print figures (nothing here asserts a speed)."""


def comma_list(kind=int, choices: tuple[str, ...] | None = None):
    """A click callback reading 'a,b,c' as a tuple of `kind`, each one of `choices` when given."""

    def parse(ctx, param, value: str) -> tuple:
        try:
            items = tuple(kind(part) for part in value.split(",") if part.strip())
        except ValueError:
            items = ()
        if choices is not None and (unknown := [item for item in items if item not in choices]):
            raise click.BadParameter(f"unknown {', '.join(map(repr, unknown))}; choose from {', '.join(choices)}")
        if not items or (kind is int and min(items) < 1):
            what = "positive integers" if kind is int else "names"
            raise click.BadParameter(f"{value!r}: give comma-separated {what}")
        return items

    return parse


@bench.command("encoders")
@click.option("--model", type=click.Choice(["imagebind_huge", "tiny"]), default="tiny")
@CHECKPOINT_OPTION
@DEVICE_OPTION
@click.option(
    "--dtype",
    "dtypes",
    default="float32",
    callback=comma_list(str, DTYPES),
    help="Comma-separated dtypes, timed side by side.",
)
@click.option("--batch", "batches", default="1,8,32", callback=comma_list(), help="Comma-separated batch sizes.")
@click.option(
    "--modalities",
    default=",".join(MODALITIES),
    callback=comma_list(str, MODALITIES),
    help="Comma-separated modalities.",
)
@click.option(
    "--min-seconds",
    type=click.FloatRange(min=0),
    default=1.0,
    help="Time each point for at least this long (after its warm-up).",
)
def bench_encoders_command(model, checkpoint, device, dtypes, batches, modalities, min_seconds):
    """Clips per second per modality, batch size and dtype, each point timed after a warm-up."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from encoders.api import random_weights_warning
    from encoders.bench import bench_encoders

    if not checkpoint:
        console.print(f"[bold red]{random_weights_warning(model)} (speed does not depend on the values)[/]")
    points = len(dtypes) * len(batches) * len(modalities)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task(f"loading {model}", total=points)

        def on_point(done: int, modality: str, dtype: str, batch: int) -> None:
            progress.update(task, completed=done, description=f"timing {modality} {dtype} batch {batch}")

        try:
            rows = bench_encoders(model, device, dtypes, batches, modalities, checkpoint, min_seconds, on_point)
        except (FileNotFoundError, ValueError, RuntimeError) as err:
            raise click.ClickException(f"bench encoders: {err}") from None
    columns = (
        "modality",
        "batch",
        *[c for d in dtypes for c in (d, f"{d} ms/batch")],
        *([f"{dtypes[1]} / {dtypes[0]}"] if len(dtypes) > 1 else []),
    )
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


@bench.command("pipeline")
@click.option("--devices", default=2, help="Simulated wearables.")
@click.option("--seconds", default=10.0, help="Device time each wearable streams (sent as fast as possible).")
@pipeline_options
def bench_pipeline_command(devices, seconds, config_file, redis_url, **flags):
    """End-to-end windows/s and publish latency, against the same windows done offline in one process."""
    from streaming.bench import bench_pipeline

    config = build_config(config_file, redis_url, **flags)
    config.model = config.model or "tiny"
    with user_errors():
        f = bench_pipeline(devices, seconds, config)
    out = table(
        f"pipeline, {devices} device{'s' * (devices != 1)} x {seconds:g} s, model {config.model}, "
        f"CPU cores: {os.cpu_count()}",
        ("figure", "value", "target"),
        right=("value", "target"),
    )
    rows = [
        ("messages / payload", f"{f.messages} / {f.payload_mb:.0f} MB", ""),
        ("windows", str(f.windows), ""),
        ("ingest alone (recv + validate, 1 thread)", f"{f.ingest_mb_per_s:.0f} MB/s", ">= 300 MB/s"),
        ("encoder alone (same windows, in process)", f"{f.encoder_windows_per_s:.1f} windows/s", ""),
        ("offline: windowing + encoder, 1 process", f"{f.offline_windows_per_s:.1f} windows/s", ""),
        ("pipeline end to end (ZeroMQ, Ray, Redis)", f"{f.pipeline_windows_per_s:.1f} windows/s", ""),
        ("pipeline efficiency (pipeline / offline)", f"{f.efficiency:.2f}", ">= 0.9"),
        (
            "publish latency p50 / p99 (burst: queueing included)",
            f"{f.latency_p50_ms:.0f} / {f.latency_p99_ms:.0f} ms",
            "",
        ),
        (
            "stage busy s (ingest / window / embed / publish)",
            " / ".join(f"{f.busy_s[s]:.1f}" for s in ("ingest", "window", "embed", "publish"))
            + f" of {f.elapsed_s:.1f}",
            "",
        ),
    ]
    for row in rows:
        out.add_row(*row)
    console.print(out)


def checked_mqtt(ctx, param, url: str | None) -> str | None:
    """`--mqtt`: None, or a URL naming an MQTT sink (else a one-line usage error)."""
    if url is not None:
        try:
            mqtt_sink(url)
        except SinkError as err:
            raise click.BadParameter(str(err)) from None
    return url


@bench.command("alerts")
@click.option("--queries", type=click.IntRange(1), default=AlertBench.queries)
@click.option("--rate", type=click.FloatRange(min=1), default=AlertBench.rate, help="Embeddings/s written.")
@click.option("--seconds", type=click.FloatRange(min=1), default=AlertBench.seconds)
@click.option("--dim", type=click.IntRange(2), default=AlertBench.dim, help="1024: imagebind_huge.")
@click.option("--devices", type=click.IntRange(1), default=AlertBench.devices)
@click.option(
    "--events-per-s",
    type=click.FloatRange(min=0.01),
    default=AlertBench.events_per_s,
    help="Matching events started per second (one alert each).",
)
@click.option(
    "--score-rows",
    type=click.IntRange(1),
    default=AlertBench.score_rows,
    help="Embeddings scored for the throughput figure.",
)
@click.option(
    "--search-records",
    type=click.IntRange(0),
    default=AlertBench.search_records,
    help="Stored windows for the search cost figure (0: skip).",
)
@click.option(
    "--mqtt",
    default=None,
    callback=checked_mqtt,
    help="Notify through this MQTT broker (mqtt[s]://[user:password@]host[:port][/prefix]; a scratch one: the "
    "sink leaves retained messages there); default: apprise's json:// to a local HTTP receiver.",
)
@click.option(
    "--delivery-timeout",
    "delivery_timeout_s",
    type=click.FloatRange(min=0),
    default=AlertBench.delivery_timeout_s,
    help="Once the matcher drained, seconds to wait for the last notifications.",
)
@click.option("--seed", type=int, default=AlertBench.seed)
@click.option(
    "--redis",
    "scratch_url",
    default=None,
    help="A scratch Redis for the benchmark's streams and queries, deleted after (never "
    "$BINDSTREAM_REDIS_URL); default: an embedded redis-server.",
)
def bench_alerts(scratch_url, **settings):
    """Matcher throughput, alert latency and event latency to a notification against a real redis-server (the
    matcher and the notifier in processes of their own with one BLAS thread, this process writing the
    embeddings and receiving the notifications)."""
    if scratch_url:
        connect(scratch_url)  # a bad --redis fails at once, not after the scoring run
    b = AlertBench(**settings)
    try:
        f = run_bench(b, scratch_url)
    except OSError as err:  # a process that did not start (TimeoutError), an MQTT broker out of reach
        raise click.ClickException(str(err)) from None
    out = table(
        f"bench alerts: {b.queries} queries, {b.dim}-d, {f.sent} embeddings at {f.sent / f.write_s:.0f}/s "
        f"from {b.devices} devices, notifications to {f.sink}",
        ("figure", "measured", "target"),
        right=("measured", "target"),
    )
    out.add_row(
        f"embeddings scored/s, one core (matrix product + shares, batches of {f.score_batch})",
        f"{f.score_per_s:,.0f}",
        f">= {TARGET_SCORE_RATE:,} (100 queries)",
    )
    out.add_row("events written / alerts", f"{f.events} / {len(f.latency_ms)}", "equal")
    if len(f.latency_ms):
        out.add_row(
            "alert latency p50, XADD embedding -> XADD alert (ms)", f"{np.percentile(f.latency_ms, 50):.1f}", ""
        )
        out.add_row(
            "alert latency p99 (ms)", f"{np.percentile(f.latency_ms, 99):.1f}", f"<= {TARGET_P99_MS:.0f} at 1,000/s"
        )
    out.add_row("start notifications received / events fired", f"{len(f.start_ms)} / {f.events}", "equal")
    out.add_row("end notifications received / events ended", f"{len(f.end_ms)} / {f.ended}", "equal")
    for state, ms, since in (("start", f.start_ms, "firing"), ("end", f.end_ms, "ending")):
        if len(ms):
            out.add_row(
                f"{state} latency p50 / p99, {since} window sent -> notification received (ms)",
                f"{np.percentile(ms, 50):.1f} / {np.percentile(ms, 99):.1f}",
                "",
            )
    out.add_row(
        "notifications sent (updates too) / send errors / received without a key",
        f"{f.notifier.get('sent')} / {f.notifier.get('send_error')} / {f.malformed}",
        "- / 0 / 0",
    )
    out.add_row(
        "rejected entries / duplicate alerts",
        f"{f.matcher.get('rejected_')} / {f.matcher.get('duplicate_alert')}",
        "0 / 0",
    )
    if f.search_s:
        per_million = {k: v * 1e6 / b.search_records for k, v in f.search_s.items()}
        out.add_row(
            f"search: XRANGE / decode / score of {b.search_records:,} windows (s)",
            " / ".join(f"{v:.2f}" for v in f.search_s.values()),
            "",
        )
        out.add_row(
            "search: per million windows, extrapolated (s)",
            f"{sum(per_million.values()):.1f} ({' / '.join(f'{v:.1f}' for v in per_million.values())})",
            "",
        )
    console.print(out)
