"""Looking back over the stored windows: `bindstream search` ranks them by similarity to a text, `bindstream
timeline` draws each query's score over one device's windows."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import click

from streaming.alerts.prompts import ensemble
from streaming.alerts.queries import ensure_background
from streaming.alerts.search import duration_text, search
from streaming.alerts.timeline import timeline, timeline_html, timeline_png
from streaming.records import QUERY_MODALITIES
from streaming.redis_access import redact_url
from streaming.redis_layout import parse_key
from streaming.subscriber import stream_keys

from .options import (
    CHECKPOINT_OPTION,
    JSON_OPTION,
    MODEL_OPTION,
    Duration,
    connect,
    load_encoder,
    model_name,
    redis_option,
)
from .terminal import clock_time, console, table

MAX_TOP = 10_000
MAX_NAMED = 10  # devices named in an error message


@click.command("search")
@click.argument("text")
@click.option("--modality", type=click.Choice(QUERY_MODALITIES + ("all",)), default="all")
@click.option("--device", default="*", help="Device id or glob.")
@click.option("--since", type=Duration(), default=None, help="Only windows stored in this last while (e.g. 10m, 2h).")
@click.option("--top", type=click.IntRange(1, MAX_TOP), default=20)
@redis_option()
@MODEL_OPTION
@CHECKPOINT_OPTION
@JSON_OPTION
def search_command(text, modality, device, since, top, redis_url, model, checkpoint, as_json):
    """Rank stored windows by similarity to TEXT (brute force over the streams)."""
    if not text.strip():
        raise click.BadParameter("the search text is empty", param_hint="TEXT")
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
    encoder = load_encoder(model_name(model, checkpoint), checkpoint)
    vectors = {}
    for m in modalities:
        ensure_background(client, encoder, m)
        vectors[m] = ensemble(encoder, [text], m)[0]
    hits, skipped = search(client, vectors, encoder.name, device, since, top)
    note = f"{skipped} stored windows skipped (malformed, or embedded by another model)" if skipped else None
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
                    }
                    for rank, h in enumerate(hits, 1)
                ],
                indent=2,
            )
        )
        return
    columns = ("rank", "score", "cosine", "device", "modality", "t0 s", "t1 s", "stored", "stream id")
    out = table(f"search {text!r} ({encoder.name})", columns, right=columns[:3] + columns[5:7], whole=("stream id",))
    for rank, h in enumerate(hits, 1):
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
        )
    out.caption = note
    console.print(out)


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
