"""Looking back over the stored windows: `bindstream search` ranks them by similarity to a text, a clip or a vector,
`bindstream index` keeps the search index that speeds it up, `bindstream timeline` draws each query's score over
one device's windows."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import click
from rich.table import Table

from streaming.alerts.prompts import ensemble
from streaming.alerts.queries import ensure_background, load_background
from streaming.alerts.search import duration_text, mark_events, search
from streaming.alerts.timeline import timeline, timeline_html, timeline_png
from streaming.index.indexer import Indexer, start_indexers
from streaming.index.shard import IndexSettings
from streaming.records import QUERY_MODALITIES, STREAM_MODALITIES
from streaming.redis_access import redact_url
from streaming.redis_layout import parse_key
from streaming.stage import Counts
from streaming.subscriber import stream_keys

from .options import (
    CHECKPOINT_OPTION,
    JSON_OPTION,
    MODEL_OPTION,
    SECONDS_OPTION,
    Duration,
    connect,
    embed_example,
    example_options,
    load_encoder,
    load_vector,
    model_name,
    redis_option,
)
from .terminal import clock_time, console, table, until_stopped, watch_workers

MAX_TOP = 10_000
MAX_NAMED = 10  # devices named in an error message
EVENT_ID_SHOWN = 8  # characters of an event id shown in a table (enough for `bindstream event show`)


@click.command("search")
@click.argument("text", required=False)
@example_options
@click.option("--modality", type=click.Choice(QUERY_MODALITIES + ("all",)), default="all")
@click.option("--device", default="*", help="Device id or glob.")
@click.option("--since", type=Duration(), default=None, help="Only windows stored in this last while (e.g. 10m, 2h).")
@click.option("--top", type=click.IntRange(1, MAX_TOP), default=20)
@click.option(
    "--no-index", is_flag=True, help="Read every stored window (brute force) even where a search index is kept."
)
@redis_option()
@MODEL_OPTION
@CHECKPOINT_OPTION
@JSON_OPTION
def search_command(
    text, example, vector, modality, device, since, top, no_index, redis_url, model, checkpoint, as_json
):
    """Rank stored windows by similarity to TEXT, a clip (--example) or a vector (--vector): through the search
    index where one is kept (`bindstream index`), else by brute force over the streams."""
    if sum(x is not None for x in (text, example, vector)) != 1:
        raise click.UsageError("give what to search for: TEXT, --example FILE or --vector FILE.npy (one of them)")
    if text is not None and not text.strip():
        raise click.BadParameter("the search text is empty", param_hint="TEXT")
    if example and modality in ("all", "fused"):
        raise click.BadParameter(
            f"--example needs the clip's modality: one of {', '.join(STREAM_MODALITIES)}", param_hint="--modality"
        )
    client = connect(redis_url)
    present = {parse_key(k)[1] for k in stream_keys(client, device)} & set(QUERY_MODALITIES)
    modalities = sorted(present) if modality == "all" else [m for m in (modality,) if m in present]
    if not modalities:
        click.echo(
            f"no {'' if modality == 'all' else modality + ' '}embedding streams for device {device!r}", err=as_json
        )
        if as_json:
            click.echo("[]")
        return
    name = model_name(model, checkpoint)
    encoder = None
    if vector is None or any(load_background(client, name, m) is None for m in modalities):
        encoder = load_encoder(name, checkpoint)  # to embed the query, or a missing background
        for m in modalities:
            ensure_background(client, encoder, m)
    if vector is not None:
        v = load_vector(vector, name)
        vectors, what = {m: v for m in modalities}, f"vector {vector}"
    elif example is not None:
        vectors, what = {modality: embed_example(encoder, example, modality)}, f"example {example}"
    else:
        vectors, what = {m: ensemble(encoder, [text], m)[0] for m in modalities}, repr(text)
    found = search(client, vectors, name, device, since, top, use_index=not no_index)
    mark_events(client, found.hits, device, since)
    if found.indexed:
        click.echo(f"through the search index: {', '.join(found.indexed)}", err=True)
    if found.notes:
        click.echo(f"brute force over the streams: {'; '.join(found.notes)}", err=True)
    note = (
        f"{found.skipped} stored windows skipped (malformed, or embedded by another model)" if found.skipped else None
    )
    if as_json:
        if note:
            click.echo(note, err=True)
        click.echo(
            json.dumps(
                [
                    {
                        "rank": rank,
                        "score": h.score,
                        "cosine": h.cosine,
                        "device": h.record.device,
                        "modality": h.record.modality,
                        "t0_ns": h.record.t0,
                        "t1_ns": h.record.t1,
                        "model": h.record.model,
                        "stream": h.record.stream,
                        "id": h.record.id,
                        "event": h.event or None,
                        "evidence": h.evidence,
                    }
                    for rank, h in enumerate(found.hits, 1)
                ],
                indent=2,
            )
        )
        return
    columns = ("rank", "score", "cosine", "device", "modality", "t0 s", "t1 s", "stored", "stream id", "event")
    out = table(f"search {what} ({name})", columns, right=columns[:3] + columns[5:7], whole=("stream id", "event"))
    for rank, h in enumerate(found.hits, 1):
        r = h.record
        out.add_row(
            str(rank),
            f"{h.score:.3f}",
            f"{h.cosine:.3f}",
            r.device,
            r.modality,
            f"{r.t0 / 1e9:.1f}",
            f"{r.t1 / 1e9:.1f}",
            clock_time(r.id),
            r.id,
            (h.event[:EVENT_ID_SHOWN] + (" (evidence)" if h.evidence else "")) if h.event else "",
        )
    played = next((h.event for h in found.hits if h.evidence), "")
    lines = [note] if note else []
    if played:
        lines.append(
            f"an event's evidence: bindstream event show {played[:EVENT_ID_SHOWN]} --save DIR (audio.wav, frames), "
            f"or /events/{played} in the console (bindstream ui)"
        )
    out.caption = "\n".join(lines) or None
    console.print(out)


def indexer_table(stats: list[dict], title: str = "bindstream indexers") -> Table:
    """One row per indexer: its shard, streams, entries indexed, vectors held, evicted, rejected, snapshots."""
    columns = ("model", "modality", "streams", "indexed", "vectors", "evicted", "rejected", "snapshots", "state")
    out = table(title, columns, right=columns[2:8])
    for s in stats:
        counts = Counts.of(s)
        out.add_row(
            s["model"],
            s["modality"],
            str(s["streams"]),
            *(str(counts.get(e)) for e in ("indexed",)),
            str(s["vectors"]),
            *(str(counts.get(e)) for e in ("evicted", "rejected_", "saved")),
            ("holds the lease" if s["holding"] else "no lease (stopped, or another indexer holds it)")
            + (f"; last error: {s['last_error']}" if s["last_error"] else ""),
        )
    return out


@click.command("index")
@redis_option()
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False),
    default=None,
    help="Directory of the snapshots [default: $BINDSTREAM_HOME/index].",
)
@click.option(
    "--modality",
    "modalities",
    type=click.Choice(QUERY_MODALITIES),
    multiple=True,
    help="A modality to index (repeatable); default: all of them.",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="A pipeline config (TOML) whose [index] table sets the index's bounds and tuning.",
)
@MODEL_OPTION
@CHECKPOINT_OPTION
@click.option("--in-process", is_flag=True, help="Indexers in this process instead of Ray actors.")
@SECONDS_OPTION
def index_command(redis_url, directory, modalities, config_file, model, checkpoint, in_process, seconds):
    """Keep the search index of the embedding streams of MODEL current, one indexer per modality, until Ctrl-C:
    what `run --index-dir DIR` starts with the pipeline, without it."""
    from encoders.weights import bindstream_home
    from streaming.pipeline import PipelineConfig

    from .pipeline import user_errors

    connect(redis_url)
    with user_errors():
        settings = PipelineConfig.from_toml(config_file).index if config_file else IndexSettings()
    name = model_name(model, checkpoint)
    folder = Path(directory) if directory else bindstream_home() / "index"
    stop = until_stopped(seconds)
    if in_process:
        workers = [
            Indexer(settings, redis_url, folder, name, m, autostart=True) for m in modalities or QUERY_MODALITIES
        ]
    else:
        from streaming.pipeline import connect_ray

        connect_ray()
        workers = start_indexers(settings, redis_url, folder, name, modalities or QUERY_MODALITIES)
    watch_workers(workers, not in_process, indexer_table, stop, f"bindstream indexers: final (snapshots in {folder})")


@click.command("timeline")
@click.option("--device", required=True, help="Device id.")
@click.option("--since", type=Duration(), default="10m", help="Windows stored in this last while.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="FILE.html or FILE.png.")
@redis_option()
def timeline_command(device, since, output, redis_url):
    """Each query's calibrated score over DEVICE's windows, with its threshold and alerts."""
    suffix = Path(output).suffix.lower()
    if suffix not in (".html", ".htm", ".png"):
        raise click.BadParameter(f"{output}: write .html (or .png with matplotlib)", param_hint="--output")
    if suffix == ".png" and importlib.util.find_spec("matplotlib") is None:
        raise click.ClickException(
            f"PNG output needs matplotlib, which is not installed; write HTML instead: "
            f"-o {Path(output).with_suffix('.html')}"
        )
    client = connect(redis_url)
    if not stream_keys(client, device):
        devices = sorted({parse_key(k)[0] for k in stream_keys(client)})
        listed = ", ".join(devices[:MAX_NAMED]) + (" ..." if len(devices) > MAX_NAMED else "")
        raise click.ClickException(
            f"no device {device!r} at {redact_url(redis_url)}: it has no embedding streams "
            f"there ({'devices: ' + listed if devices else 'no device has'})"
        )
    series = timeline(client, device, since)
    if not series:
        raise click.ClickException(f"no query watches device {device!r} (see `alert list`)")
    if not any(len(s.scores) for s in series):
        raise click.ClickException(
            f"device {device!r} has no window stored in the last {duration_text(since)} of a "
            f"modality that a query watches; try a longer --since"
        )
    if suffix == ".png":
        timeline_png(series, device, output)
    else:
        Path(output).write_text(timeline_html(series, device))
    console.print(
        f"wrote {output}: {len(series)} queries, {sum(len(s.scores) for s in series)} scores, "
        f"{sum(len(s.alerts) for s in series)} alerts"
    )
