"""Standing text queries, the matchers that raise their alerts and the notifier that delivers them:
`bindstream alert` (add, list, rm, tune), `bindstream match` and `bindstream notify`."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import click
import numpy as np
import redis
from rich.table import Table

from streaming.alerts.matcher import DEFAULT_CONSUMER, DEFAULT_GROUP, Matcher, MatcherSettings, start_matchers
from streaming.alerts.notify import Notifier, NotifySettings
from streaming.alerts.prompts import check_modality, ensemble
from streaming.alerts.queries import (
    delete_query,
    ensure_background,
    find_query_id,
    load_background,
    load_queries,
    load_query,
    save_query,
    set_decision,
)
from streaming.alerts.records import Background, Decision, Query, QueryError
from streaming.alerts.scoring import ModalityIndex
from streaming.alerts.sinks import SinkError, parse_sink, sink_label
from streaming.alerts.tuning import HOLDOUT, MIN_PER_LABEL, fit, reviewed_scores
from streaming.records import MIN_DBFS, QUERY_MODALITIES
from streaming.redis_layout import now_id, outbox_key
from streaming.stage import Counts

from .options import (
    CHECKPOINT_OPTION,
    JSON_OPTION,
    MODEL_OPTION,
    SECONDS_OPTION,
    connect,
    embed_example,
    example_options,
    load_encoder,
    load_vector,
    model_name,
    redis_option,
)
from .terminal import console, show_live, table, until_stopped, watch_workers

EMBED_BATCH = 8  # clips per encoder call in `alert tune`
MIN_CLIPS_PER_CLASS = MIN_PER_LABEL  # `alert tune` needs a positive and a negative in each split
MAX_HOLDOUT = 0.9  # `alert tune` keeps at least a tenth of each folder to fit on

# `alert add` option of each checked query setting, named in the one-line error when a value is refused
DECISION_OPTIONS = {
    "threshold": "--threshold",
    "k": "--k",
    "n": "--n",
    "cooldown_s": "--cooldown",
    "hysteresis": "--hysteresis",
    "min_dbfs": "--min-dbfs",
}


@click.group()
def alert() -> None:
    """Standing text queries that raise alerts on the embedding streams."""


@alert.command("add")
@click.argument("text")
@click.option("--modality", type=click.Choice(QUERY_MODALITIES), required=True, help="Streams to watch.")
@click.option("--device", default="*", help="Device id or glob ('*': every device).")
@click.option(
    "--threshold",
    type=float,
    default=Decision.threshold,
    help="Calibrated score (softmax share against the background prompts) that fires.",
)
@click.option("--k", "k", type=int, default=Decision.k, help="Windows above threshold ...")
@click.option("--n", "n", type=int, default=Decision.n, help="... among the last n.")
@click.option(
    "--cooldown",
    type=float,
    default=Decision.cooldown_s,
    help="Seconds of device time between two alerts of this query on one device.",
)
@click.option(
    "--hysteresis",
    type=float,
    default=Decision.hysteresis,
    help="Re-arm only once the score falls below threshold - hysteresis.",
)
@example_options
@click.option(
    "--min-dbfs",
    type=float,
    default=None,
    help=f"Audio only: windows quieter than this RMS loudness ({MIN_DBFS:g} to 0 dBFS, e.g. -40) score 0.",
)
@click.option(
    "--notify",
    "notify_urls",
    multiple=True,
    help="Also send this query's alerts here (repeatable): an Apprise URL (ntfy://, pover://, tgram://, "
    "mailto://, json://...) or mqtt[s]://[user:password@]host[:port][/prefix] (Home Assistant).",
)
@redis_option()
@MODEL_OPTION
@CHECKPOINT_OPTION
def alert_add(
    text,
    modality,
    device,
    threshold,
    k,
    n,
    cooldown,
    hysteresis,
    example,
    vector,
    min_dbfs,
    notify_urls,
    redis_url,
    model,
    checkpoint,
):
    """Add a query: TEXT (also the label of an --example or --vector query) to watch for."""
    if not text.strip():
        raise click.BadParameter("the query text is empty", param_hint="TEXT")
    for url in notify_urls:
        try:
            parse_sink(url)
        except SinkError as err:
            raise click.BadParameter(str(err), param_hint="--notify") from err
    if example and vector:
        raise click.UsageError("give --example or --vector, not both")
    if example and modality == "fused":
        raise click.BadParameter("a fused query takes text or --vector, not a clip", param_hint="--example")
    try:
        decision = Decision(threshold, k, n, cooldown, hysteresis)
    except QueryError as err:
        raise click.BadParameter(str(err), param_hint=DECISION_OPTIONS.get(err.param)) from err
    name = model_name(model, checkpoint)
    client = connect(redis_url)
    encoder = None
    if vector:
        emb, source = load_vector(vector, name), f"vector:{vector}"
    else:
        encoder = load_encoder(name, checkpoint)
        try:
            check_modality(encoder, modality)
        except QueryError as err:
            raise click.BadParameter(str(err), param_hint="--modality") from err
        if example:
            emb, source = embed_example(encoder, example, modality), f"example:{example}"
        else:
            emb, source = ensemble(encoder, [text], modality)[0], "text"
    try:  # checked before a background is embedded: a refused query leaves nothing behind
        q = Query(
            text,
            modality,
            emb,
            name,
            device=device,
            decision=decision,
            min_dbfs=min_dbfs,
            source=source,
            notify=notify_urls,
        )
    except QueryError as err:
        if err.param in DECISION_OPTIONS:
            raise click.BadParameter(str(err), param_hint=DECISION_OPTIONS[err.param]) from err
        raise click.UsageError(str(err)) from err
    if load_background(client, name, modality) is None:
        ensure_background(client, encoder or load_encoder(name, checkpoint), modality)
    save_query(client, q)
    console.print(
        f"added query [bold]{q.id}[/]: {text!r} on {modality} of {device} ({name}, {source}), "
        f"threshold {decision.threshold}, {decision.k} of {decision.n}, cooldown {decision.cooldown_s} s, "
        f"hysteresis {decision.hysteresis}" + "".join(f", notify {sink_label(url)}" for url in q.notify)
    )
    if source != "text":
        console.print(
            f"scored by its cosine against the usual windows of each stream: it scores 0 on a stream's first "
            f"{q.calibration.warmup} windows, while their estimate forms (ALERTS.md, Query by example)"
        )


@alert.command("list")
@redis_option()
@JSON_OPTION
def alert_list(redis_url, as_json):
    """The active queries."""
    queries = load_queries(connect(redis_url))
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "id": q.id,
                        "text": q.text,
                        "modality": q.modality,
                        "device": q.device,
                        "model": q.model,
                        "source": q.source,
                        "threshold": q.decision.threshold,
                        "k": q.decision.k,
                        "n": q.decision.n,
                        "cooldown_s": q.decision.cooldown_s,
                        "hysteresis": q.decision.hysteresis,
                        "min_dbfs": q.min_dbfs,
                        "created": q.created,
                        "notify": [sink_label(url) for url in q.notify],
                    }
                    for q in queries
                ],
                indent=2,
            )
        )
        return
    out = table(
        "bindstream queries",
        (
            "id",
            "text",
            "modality",
            "device",
            "model",
            "source",
            "threshold",
            "k/n",
            "cooldown s",
            "hysteresis",
            "min dBFS",
            "created",
            "notify",
        ),
        whole=("id",),
    )
    for q in queries:
        d = q.decision
        out.add_row(
            q.id,
            q.text,
            q.modality,
            q.device,
            q.model,
            q.source,
            f"{d.threshold:.4g}",
            f"{d.k}/{d.n}",
            f"{d.cooldown_s:g}",
            f"{d.hysteresis:g}",
            "-" if q.min_dbfs is None else f"{q.min_dbfs:g}",
            datetime.fromtimestamp(q.created).strftime("%Y-%m-%d %H:%M:%S"),
            "\n".join(map(sink_label, q.notify)) or "-",
        )
    console.print(out)


def find_query(client: redis.Redis, ref: str) -> str:
    """The id of the query that `ref` names (find_query_id), or one line saying why none."""
    try:
        return find_query_id(client, ref)
    except QueryError as err:
        raise click.ClickException(str(err)) from None


@alert.command("rm")
@click.argument("queries", nargs=-1, required=True)
@redis_option()
def alert_rm(queries, redis_url):
    """Remove queries, each named by its id, the start of its id, or its text."""
    client = connect(redis_url)
    for query_id in dict.fromkeys([find_query(client, ref) for ref in queries]):  # all checked before any goes
        try:
            delete_query(client, query_id)
        except QueryError as err:
            raise click.ClickException(str(err)) from None
        console.print(f"removed query {query_id}")


def _labelled_clips(folder: str, modality: str) -> tuple[list, list[str]]:
    """(tensors, skipped file names) of every file under `folder` that loads as `modality`."""
    from encoders.transforms import load_file

    tensors, skipped = [], []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        try:
            tensors.append(load_file(path, modality)[1])
        except (ValueError, OSError):
            skipped.append(path.name)
    return tensors, skipped


def _embed_all(encoder, modality: str, tensors: list) -> np.ndarray:
    """Embeddings of `tensors`, EMBED_BATCH a call where their shapes agree (images and videos differ)."""
    import torch

    out = []
    for i in range(0, len(tensors), EMBED_BATCH):
        chunk = tensors[i : i + EMBED_BATCH]
        if all(t.shape == chunk[0].shape for t in chunk):
            out.append(encoder.embed(modality, torch.stack(chunk)))
        else:
            out += [encoder.embed(modality, t.unsqueeze(0)) for t in chunk]
    return np.concatenate(out)


def _clip_scores(
    q: Query, background: Background, positive: str | None, negative: str | None, checkpoint: str | None, least: int
) -> tuple[list[float], list[float]]:
    """The softmax shares of the clips under the `positive` and `negative` folders (None: no folder), each
    folder holding at least `least` clips of the query's modality."""
    loaded = []
    for folder in (positive, negative):
        clips, skipped = _labelled_clips(folder, q.modality) if folder else ([], [])
        if skipped:
            console.print(
                f"[yellow]{folder}: skipped {len(skipped)} file(s) that are not {q.modality}: "
                f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}[/]"
            )
        if folder and len(clips) < least:
            raise click.ClickException(f"{folder}: {len(clips)} {q.modality} clip(s); at least {least} are needed")
        loaded.append(clips)
    pos, neg = loaded
    if not pos + neg:
        return [], []
    scores = ModalityIndex([q], background).shares(_embed_all(load_encoder(q.model, checkpoint), q.modality, pos + neg))
    return [float(x) for x in scores[: len(pos), 0]], [float(x) for x in scores[len(pos) :, 0]]


def _review_scores(
    client: redis.Redis, q: Query, background: Background, clips: tuple[int, int]
) -> tuple[list[float], list[float]]:
    """The scores of q's confirmed and false-positive events (tuning.reviewed_scores), said in one line; one
    line saying how many reviews are missing when, with the `clips` (positive, negative), a label has fewer than
    MIN_CLIPS_PER_CLASS."""
    r = reviewed_scores(client, q, background)
    console.print(
        f"query {q.id}'s reviewed events: {len(r.positives)} confirmed, {len(r.negatives)} false positive"
        f"; skipped {r.trimmed} whose peak window was trimmed from its stream, {r.unusable} unusable"
    )
    labels = (("confirmed", "ack", r.positives), ("false positive", "false-positive", r.negatives))
    missing = [
        f"{more} more as {label} (bindstream event {command} ID)"
        for have, (label, command, got) in zip(clips, labels)
        if (more := MIN_CLIPS_PER_CLASS - have - len(got)) > 0
    ]
    if missing:
        raise click.ClickException(
            f"query {q.id}: at least {MIN_CLIPS_PER_CLASS} positives and {MIN_CLIPS_PER_CLASS} negatives are "
            f"needed; review {' and '.join(missing)}"
        )
    return r.positives, r.negatives


@alert.command("tune")
@click.argument("query")
@click.option(
    "--positive",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Folder of clips where the query should fire.",
)
@click.option(
    "--negative",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Folder of clips where it should not.",
)
@click.option(
    "--from-reviews",
    is_flag=True,
    help="Also fit on the query's reviewed events, each by its peak window: confirmed ones (event ack) should "
    "fire, false positives (event false-positive) should not.",
)
@click.option(
    "--holdout",
    type=click.FloatRange(0.0, MAX_HOLDOUT),
    default=HOLDOUT,
    help="Share of each label kept out of the fit to report precision and recall on.",
)
@click.option("--seed", type=int, default=0, help="Of the train / held-out split.")
@click.option("--dry-run", is_flag=True, help="Report only; keep the stored threshold.")
@redis_option()
@CHECKPOINT_OPTION
def alert_tune(query, positive, negative, from_reviews, holdout, seed, dry_run, redis_url, checkpoint):
    """Fit QUERY's threshold (its id, the start of its id, or its text) on labelled clips (--positive and
    --negative folders) and/or its reviewed events (--from-reviews): best F1 on the training split; report
    precision and recall on the held-out part."""
    if not 0.0 <= holdout <= MAX_HOLDOUT:  # click's FloatRange lets NaN through
        raise click.BadParameter(f"{holdout} is not in the range 0<=x<={MAX_HOLDOUT}", param_hint="--holdout")
    if not from_reviews and not (positive and negative):
        raise click.UsageError("give --positive and --negative folders, or --from-reviews (or both)")
    client = connect(redis_url)
    try:
        q = load_query(client, find_query(client, query))
    except QueryError as err:
        raise click.ClickException(str(err)) from None
    if (positive or negative) and q.modality == "fused":
        raise click.ClickException("a fused query cannot be tuned from clips: no single clip makes a fused window")
    if (positive or negative) and from_reviews and q.by_example:
        raise click.ClickException(
            f"query {q.id} is scored against its stream (an example or vector query), which a clip has not: "
            "tune it --from-reviews alone"
        )
    background = load_background(client, q.model, q.modality)
    if background is None:
        raise click.ClickException(f"no background stored for {q.model}/{q.modality}")
    least = 0 if from_reviews else MIN_CLIPS_PER_CLASS  # with reviews, the count per label is checked in all
    pos, neg = _clip_scores(q, background, positive, negative, checkpoint, least)
    if from_reviews:
        confirmed, false_positives = _review_scores(client, q, background, (len(pos), len(neg)))
        pos, neg = pos + confirmed, neg + false_positives
    fitted = fit(pos, neg, q.decision, holdout, seed)
    old, threshold, hysteresis = q.decision.threshold, fitted.threshold, fitted.hysteresis
    columns = ("split", "threshold", "positives", "negatives", "precision", "recall", "F1")
    out = table(f"tune {q.id}: {q.text!r} ({q.modality}, {q.model})", columns, right=columns[1:])
    for split, t, c in fitted.rows:
        out.add_row(
            split,
            f"{t:.4g}",
            str(c.tp + c.fn),
            str(c.fp + c.tn),
            f"{c.precision:.3f}",
            f"{c.recall:.3f}",
            f"{c.f1:.3f}",
        )
    console.print(out)
    if not fitted.separates:
        used = " and ".join(
            w for w, given in (("clips", positive or negative), ("reviewed events", from_reviews)) if given
        )
        raise click.ClickException(
            f"no threshold separates these {used} for query {q.id} (F1 0 on them): "
            "threshold not changed; check the labels, or add examples"
        )
    verb = "would set" if dry_run else "set"
    if hysteresis != q.decision.hysteresis:
        console.print(f"hysteresis {q.decision.hysteresis} is not below the new threshold: {verb} to {hysteresis:.4g}")
    if dry_run:
        console.print(f"dry run: {verb} query {q.id}'s threshold {old} -> {threshold:.4g}; nothing stored")
        return
    set_decision(client, q.id, replace(q.decision, threshold=threshold, hysteresis=hysteresis))
    console.print(f"query {q.id}: threshold {old} -> {threshold:.4g}")


def matcher_table(stats: list[dict], title: str = "bindstream matchers") -> Table:
    """One row per matcher: streams, queries, entries in, scored, alerts, skipped, alert latency."""
    columns = ("matcher", "streams", "queries", "in", "scored", "alerts", "duplicates", "rejected", "p50 ms", "p99 ms")
    out = table(title, columns, right=columns[1:])
    for i, s in enumerate(stats):
        counts = Counts.of(s)
        out.add_row(
            str(i),
            str(s["streams"]),
            str(s["queries"]),
            *(str(counts.get(e)) for e in ("in", "scored", "alert", "duplicate_alert", "rejected_")),
            f"{s['latency_p50_ms']:.0f}" if "latency_p50_ms" in s else "-",
            f"{s['latency_p99_ms']:.0f}" if "latency_p99_ms" in s else "-",
        )
    return out


@click.command("match")
@redis_option()
@click.option("--group", default=DEFAULT_GROUP, help="Consumer group on the embedding streams.")
@click.option("--devices", default="*", help="Glob of the devices to match.")
@click.option("--matchers", type=click.IntRange(1), default=1, help="Matcher actors; the devices are split among them.")
@click.option(
    "--name",
    default=DEFAULT_CONSUMER,
    help="This command's matchers are NAME-0, NAME-1, ... in the group (NAME with --in-process): the other "
    "matchers of the group (on other machines) need other names; keep it across restarts.",
)
@click.option("--from-start", is_flag=True, help="Also match windows stored before now (streams new to the group).")
@click.option("--in-process", is_flag=True, help="One matcher in this process instead of Ray actors.")
@SECONDS_OPTION
def match(redis_url, group, devices, matchers, name, from_start, in_process, seconds):
    """Match the embedding streams against the queries and publish alerts, until Ctrl-C."""
    connect(redis_url)
    settings = MatcherSettings(group=group, consumer=name, devices=devices, start_id="0" if from_start else now_id())
    stop = until_stopped(seconds)
    if in_process:
        workers = [Matcher(replace(settings, autostart=True), redis_url)]
    else:
        from streaming.pipeline import connect_ray

        connect_ray()
        workers = start_matchers(settings, redis_url, matchers)
    watch_workers(workers, not in_process, matcher_table, stop, "bindstream matchers: final")


def notifier_table(stats: dict, client: redis.Redis, title: str = "bindstream notifier") -> Table:
    """One row per sink: its URL without secrets, notifications sent, failed tries, dropped, still queued."""
    columns = ("sink", "url", "sent", "send errors", "dropped", "queued", "state")
    out = table(title, columns, right=columns[2:6], whole=("sink",))
    counts = Counts.of(stats)
    pipe = client.pipeline(transaction=False)
    for sid in stats["sinks"]:
        pipe.xlen(outbox_key(sid))
    for (sid, label), queued in zip(stats["sinks"].items(), pipe.execute()):
        out.add_row(
            sid,
            label,
            *(str(counts.get(event, sid)) for event in ("sent", "send_error", "dropped_")),
            str(queued),
            "failing" if sid in stats["failing"] else "ok",
        )
    error = stats["last_error"]
    out.caption = f"alerts read {counts.get('in')}" + (f"; last error: {error}" if error else "")
    return out


@click.command("notify")
@redis_option()
@click.option(
    "--url",
    "urls",
    multiple=True,
    help="A sink for every alert and health event (repeatable): an Apprise URL or "
    "mqtt[s]://[user:password@]host[:port][/prefix]; each query's own sinks (alert add --notify) get its alerts "
    "anyway.",
)
@click.option("--from-start", is_flag=True, help="Also deliver the alerts stored before now (when the group is new).")
@SECONDS_OPTION
def notify_command(redis_url, urls, from_start, seconds):
    """Deliver the alerts to phones and home automation until Ctrl-C: the notifier that `run` starts with its
    matchers, without the pipeline. Run one per Redis."""
    try:
        settings = NotifySettings(urls=urls, start_id="0" if from_start else now_id(), autostart=True)
    except SinkError as err:
        raise click.BadParameter(str(err), param_hint="--url") from err
    client = connect(redis_url)
    notifier = Notifier(settings, redis_url)
    stop = until_stopped(seconds)
    show_live(lambda: notifier_table(notifier.stats(), client), stop)
    console.print(notifier_table(notifier.stop(), client, "bindstream notifier: final"))
