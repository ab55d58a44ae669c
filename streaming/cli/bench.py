"""`bindstream bench`: benchmarks that print figures (nothing here asserts a speed): the encoders, the
pipeline end to end (streaming/bench.py), and the alert matcher and search (streaming/alerts/bench.py)."""

from __future__ import annotations

import os

import click
import numpy as np

from encoders.modalities import MODALITIES
from sensors.simulator import DEFAULT_PROFILE, PROFILES
from streaming.alerts.bench import TARGET_P99_MS, TARGET_SCORE_RATE, AlertBench, mqtt_sink, run_bench
from streaming.alerts.matcher_bench import MatcherBench
from streaming.alerts.sinks import SinkError
from streaming.capacity import CapacitySettings

from .options import CHECKPOINT_OPTION, DEVICE_OPTION, DTYPES, JSON_OPTION, connect
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
@click.option(
    "--cosine-inputs",
    type=click.Path(dir_okay=False),
    default=None,
    help="A parity fixture (a torch file with an 'inputs' table, e.g. ../shared/fixtures/imagebind_parity_tiny.pt) "
    "whose inputs each dtype's embeddings are compared with fp32's on; default: 4 seeded random inputs per modality.",
)
@click.option(
    "--preprocessing",
    is_flag=True,
    help="Also time the preprocessing of windows: one at a time on the CPU (the windowing stage) and batched on "
    "--device (the embedder, preprocess_on = embedder).",
)
@JSON_OPTION
def bench_encoders_command(
    model, checkpoint, device, dtypes, batches, modalities, min_seconds, cosine_inputs, preprocessing, as_json
):
    """Clips per second per modality, batch size and dtype, each point timed after a warm-up, and each dtype's
    least cosine similarity to fp32's embeddings."""
    import dataclasses
    import json

    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from encoders.api import random_weights_warning
    from encoders.bench import COSINE_ITEMS, bench_encoders

    if not checkpoint:
        say = Console(stderr=True) if as_json else console
        say.print(f"[bold red]{random_weights_warning(model)} (speed does not depend on the values)[/]")
    inputs = None
    if cosine_inputs:
        try:
            inputs = torch.load(cosine_inputs, weights_only=True)["inputs"]
        except Exception as err:  # not a torch file, or no inputs table: one line
            raise click.ClickException(f"--cosine-inputs {cosine_inputs}: not a parity fixture ({err})") from None
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
            rows = bench_encoders(
                model, device, dtypes, batches, modalities, checkpoint, min_seconds, on_point, cosine_inputs=inputs
            )
        except (FileNotFoundError, ValueError, RuntimeError) as err:
            raise click.ClickException(f"bench encoders: {err}") from None
    compared = f"the inputs of {cosine_inputs}" if cosine_inputs else f"{COSINE_ITEMS} seeded random inputs"
    if as_json:
        figures = {
            "model": model,
            "random_weights": not checkpoint,
            "device": device or ("cuda" if torch.cuda.is_available() else "cpu"),
            "cosine_inputs": compared,
            "encoders": [dataclasses.asdict(r) for r in rows],
        }
        if preprocessing:
            figures["preprocessing"] = [dataclasses.asdict(r) for r in preprocessing_rows(device, batches, min_seconds)]
        click.echo(json.dumps(figures, indent=2))
        return
    columns = (
        "modality",
        "batch",
        *[c for d in dtypes for c in (d, f"{d} ms/batch", f"{d} cos")],
        *([f"{dtypes[1]} / {dtypes[0]}"] if len(dtypes) > 1 else []),
    )
    title = (
        f"{model} encoders, clips/s (device {device or 'auto'}); cos: least cosine similarity to fp32's "
        f"embeddings (on the CPU) over {compared} per modality"
    )
    out = table(title, columns, right=columns[1:])
    by_point = {(r.modality, r.batch, r.dtype): r for r in rows}
    for modality in modalities:
        for batch in batches:
            point = [by_point[modality, batch, dtype] for dtype in dtypes]
            cells = [
                cell
                for r in point
                for cell in (f"{r.clips_per_s:.1f}", f"{1000 * r.seconds_per_batch:.1f}", f"{r.cosine:.4f}")
            ]
            if len(dtypes) > 1:
                cells.append(f"{point[1].clips_per_s / point[0].clips_per_s:.2f}x")
            out.add_row(modality, str(batch), *cells)
    console.print(out)
    if preprocessing:
        print_preprocessing(device, batches, min_seconds)


def preprocessing_rows(device: str | None, batches: tuple[int, ...], min_seconds: float) -> list:
    """`encoders.bench.bench_preprocessing`, its errors in one line."""
    from encoders.bench import bench_preprocessing

    try:
        return bench_preprocessing(device, batches, min_seconds=min_seconds)
    except (ValueError, RuntimeError) as err:
        raise click.ClickException(f"bench encoders --preprocessing: {err}") from None


def print_preprocessing(device: str | None, batches: tuple[int, ...], min_seconds: float) -> None:
    """The table of `encoders.bench.bench_preprocessing`."""
    rows = preprocessing_rows(device, batches, min_seconds)
    where = device or "auto"
    columns = ("modality", "batch", "CPU, one window at a time", f"{where}, batched", "speed-up")
    out = table(f"preprocessing, windows/s from their media (device {where})", columns, right=columns[1:])
    for r in rows:
        speedup = f"{r.device_windows_per_s / r.cpu_windows_per_s:.2f}x"
        out.add_row(r.modality, str(r.batch), f"{r.cpu_windows_per_s:.1f}", f"{r.device_windows_per_s:.1f}", speedup)
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


@bench.command("capacity")
@click.option(
    "--seconds", type=click.FloatRange(min=1), default=CapacitySettings.seconds, help="Wall seconds each fleet streams."
)
@click.option(
    "--profile",
    type=click.Choice(list(PROFILES)),
    default=DEFAULT_PROFILE,
    help="What the simulated wearables do (sensors/simulator.py PROFILES).",
)
@click.option(
    "--max-wearables", type=click.IntRange(1), default=CapacitySettings.max_wearables, help="The largest fleet tried."
)
@click.option(
    "--all-frames",
    is_flag=True,
    help="Wearables send every frame's pixels (ingest drops those no window uses) instead of omitting them.",
)
@click.option(
    "--chunk-ms",
    type=click.IntRange(0, 1000),
    default=CapacitySettings.chunk_ms,
    show_default=True,
    help="Wearables send audio and IMU samples in chunks of at least this many ms (0: the simulator's own 20 ms "
    "audio and 50 ms IMU chunks).",
)
@click.option(
    "--aligned-clocks",
    is_flag=True,
    help="Every wearable's clock is the wall clock, so all their windows end at the same moments (the worst case) "
    "instead of each clock reading it less the wearable's own phase.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON (the progress lines go to stderr).")
@pipeline_options
def bench_capacity_command(
    seconds, profile, max_wearables, all_frames, chunk_ms, aligned_clocks, as_json, config_file, redis_url, **flags
):
    """The largest fleet of simulated wearables streaming at real pace that the pipeline keeps up with, its
    windows/s, and the CPU a window costs per stage (process CPU time; the encoder's forward apart)."""
    import json

    import ray
    from rich.console import Console

    from streaming.capacity import bench_capacity

    config = build_config(config_file, redis_url, **flags)
    config.model = config.model or "tiny"
    settings = CapacitySettings(
        seconds=seconds,
        profile=profile,
        max_wearables=min(max_wearables, 2**16),
        all_frames=all_frames,
        chunk_ms=chunk_ms,
        aligned_clocks=aligned_clocks,
    )
    progress = Console(stderr=True, soft_wrap=True)  # one line per step, also into a file

    def on_step(s) -> None:
        verdict = f"[red]behind: {s.behind}[/]" if s.behind else "[green]keeps up[/]"
        latency = max(s.latency_s.values(), default=float("nan"))
        progress.print(
            f"{s.wearables:4d} wearables: {s.windows_per_s:6.1f} windows/s, {s.cpu_ms_per_window:5.2f} core-ms/window "
            f"(+ forward {s.per_window_ms(s.forward_cpu_s):.2f}), slowest p{100 * settings.quantile:g} latency "
            f"{latency:.2f} s, machine {s.machine_busy:.0%} busy: {verdict}"
        )

    progress.print(
        f"bench capacity: model {config.model}"
        + (" ([bold red]random weights[/]: speed does not depend on the values)" if config.model == "tiny" else "")
        + f", profile {profile}, {seconds:g} s per fleet, fleets doubling until one falls behind, wearables "
        + ("sending every frame" if all_frames else "omitting the frames no window uses")
        + (f", audio and IMU in chunks of {chunk_ms} ms or more" if chunk_ms else "")
        + (", every clock the wall clock (windows ending together)" if aligned_clocks else "")
    )
    with user_errors():
        try:
            result = bench_capacity(settings, config, on_step)
        except ray.exceptions.RayError as err:  # an actor killed on the way (out of memory, say): no figures
            reason = str(err).strip().splitlines()[0][:300]
            raise click.ClickException(f"bench capacity: a pipeline actor failed, no figures: {reason}") from None
    figures = result.as_json()
    if as_json:
        click.echo(json.dumps(figures, indent=2))
        return
    best = result.best
    out = table(
        f"capacity: model {result.model}, profile {profile}, {result.cores} CPU cores",
        ("figure", "value", "target"),
        right=("value", "target"),
    )
    out.add_row("largest real-time fleet (wearables)", str(figures["wearables"]), "")
    out.add_row("windows/s (fused records not counted)", f"{figures['windows_per_s']:.1f}", "")
    out.add_row("core-ms per window, all stages, forward excluded", f"{figures['cpu_ms_per_window']:.2f}", "<= 3")
    preprocessed = figures["preprocess_cpu_ms_per_window"] > 0  # --preprocess-on embedder
    for stage, ms in figures["per_stage_cpu_ms"].items():
        out.add_row(f"  {stage}", f"{ms:.2f}", "")
        if stage == "embed" and preprocessed:
            out.add_row(
                "    of which preprocessing media (a GPU's work on a GPU node)",
                f"{figures['preprocess_cpu_ms_per_window']:.2f}",
                "",
            )
    if preprocessed:  # a lower bound of a GPU node's CPU side: launching the GPU's work stays on the CPU
        out.add_row(
            "core-ms per window, all stages, forward and preprocessing media excluded",
            f"{figures['cpu_ms_per_window'] - figures['preprocess_cpu_ms_per_window']:.2f}",
            "",
        )
    out.add_row("core-ms per window, encoder forward", f"{figures['forward_cpu_ms_per_window']:.2f}", "")
    for name, ms in figures["other_cpu_ms_per_window"].items():
        out.add_row(f"core-ms per window outside the stages: {name}", f"{ms:.2f}", "")
    out.add_row("offline: windowing + encoder, 1 process (windows/s)", f"{figures['offline_windows_per_s']:.1f}", "")
    out.add_row("efficiency (real-time windows/s / offline)", f"{figures['efficiency']:.2f}", ">= 0.9")
    out.add_row("machine CPU busy while that fleet streamed (all processes)", f"{figures['machine_busy']:.0%}", "")
    out.add_row("model forwards saved (windows gated as unchanged)", f"{figures['forwards_saved']:.0%}", "")
    if best is None:
        out.add_row("no fleet kept up", result.steps[0].behind if result.steps else "", "")
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


@bench.command("search")
@click.option("--windows", type=click.IntRange(1), default=100_000, help="Windows indexed (1000000: a million).")
@click.option("--dim", type=click.IntRange(2), default=1024, help="1024: imagebind_huge's joint space.")
@click.option("--queries", type=click.IntRange(1), default=300)
@click.option("--dtype", type=click.Choice(["f16", "i8"]), default="f16", help="How the index stores a vector.")
@click.option("--connectivity", type=click.IntRange(2), default=16, help="HNSW edges per vector (M).")
@click.option("--expansion-add", type=click.IntRange(2), default=128, help="Candidates per insertion.")
@click.option(
    "--expansion-search", default="32,64,128,256,512", callback=comma_list(), help="Comma-separated, each measured."
)
@click.option("--segment-vectors", type=click.IntRange(1), default=250_000, help="Vectors per segment of the index.")
@click.option("--devices", type=click.IntRange(1), default=100, help="Devices the windows come from.")
@click.option("--seed", type=int, default=0)
def bench_search(windows, dim, queries, dtype, connectivity, expansion_add, expansion_search, segment_vectors, **rest):
    """The search index on synthetic clustered unit vectors: ingest rate, memory, top-10 latency p50/p99 and
    recall@10 against exact search (numpy), with and without filters, and its snapshot (streaming/index/bench.py)."""
    from streaming.index.bench import SearchBench, figure_rows, run_search_bench
    from streaming.index.shard import IndexSettings

    settings = IndexSettings(
        dtype=dtype,
        connectivity=connectivity,
        expansion_add=expansion_add,
        max_vectors=max(windows, segment_vectors),
        segment_vectors=segment_vectors,
    )
    b = SearchBench(windows, dim, queries, settings=settings, expansion_search=expansion_search, **rest)
    with console.status("indexing") as status:
        f = run_search_bench(b, lambda phase, done, total: status.update(f"{phase} {done:,} / {total:,}"))
    out = table(
        f"bench search: {windows:,} windows of {dim} dimensions, {queries} queries",
        ("figure", "measured", "target"),
        right=("measured",),
    )
    for row in figure_rows(b, f):
        out.add_row(*row)
    console.print(out)


@bench.command("matchers")
@click.option("--streams", type=click.IntRange(1), default=MatcherBench.streams, help="Device streams (audio).")
@click.option("--rate", type=click.FloatRange(min=0.01), default=MatcherBench.rate, help="Windows/s per stream.")
@click.option("--matchers", type=click.IntRange(1), default=MatcherBench.matchers, help="Matcher processes.")
@click.option("--seconds", type=click.FloatRange(min=1), default=MatcherBench.seconds, help="Measured, after warm-up.")
@click.option("--warmup", "warmup_s", type=click.FloatRange(min=0), default=MatcherBench.warmup_s)
@click.option("--dim", type=click.IntRange(2), default=MatcherBench.dim, help="1024: imagebind_huge.")
@click.option(
    "--match-every",
    type=click.IntRange(2),
    default=MatcherBench.match_every,
    help="One window in this many matches the standing vector query (each gives one alert).",
)
@click.option("--cluster", type=click.IntRange(0), default=0, help="Run on an embedded Redis Cluster of N masters.")
@click.option(
    "--redis",
    "scratch_url",
    default=None,
    help="A scratch Redis or Redis Cluster (rediscluster://) for the run's keys, left there (never "
    "$BINDSTREAM_REDIS_URL); default: an embedded redis-server.",
)
def bench_matchers(scratch_url, cluster, **settings):
    """Matchers sharing many device streams (streaming/alerts/matcher_bench.py): alert latency, Redis CPU and
    matcher CPU per 1,000 windows, with synthetic windows written straight to Redis."""
    from streaming.alerts.matcher_bench import run_matcher_bench

    if scratch_url:
        connect(scratch_url)  # a bad --redis fails at once
    b = MatcherBench(**settings)
    f = run_matcher_bench(b, scratch_url, cluster)
    out = table(
        f"bench matchers: {b.streams:,} streams at {b.rate:g} window/s, {b.matchers} matchers, {b.dim}-d, "
        f"{f.seconds:.0f} s measured, {f.where}",
        ("figure", "measured"),
        right=("measured",),
    )
    for row in f.rows():
        out.add_row(*row)
    console.print(out)
