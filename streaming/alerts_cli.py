"""Command line for text-query alerts: the `alert` group (add, list, rm, tune) and the `match`, `watch`,
`search`, `timeline` and `bench alerts` commands, registered on `bindstream` by streaming/cli.py."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from multiprocessing import get_context
from pathlib import Path

import click
import numpy as np
import redis
from rich.live import Live
from rich.table import Table

from .alerts.records import Background, Decision, Query, QueryError, unit
from .matcher import DEFAULT_GROUP, ONE_BLAS_THREAD, Matcher, MatcherSettings, ModalityIndex, start_matchers
from .options import CHECKPOINT_OPTION, JSON_OPTION, MODEL_OPTION, REDIS_OPTION, table, wide_console
from .queries import (check_modality, confusion, delete_query, ensemble, ensure_background, find_query_id, fit_threshold,
                      load_background, load_queries, load_query, save_background, save_query, set_decision)
from .records import QUERY_MODALITIES, Embedding
from .redis_layout import (ALERTS_STREAM, Alert, background_key, decode_embedding, encode_embedding, id_tuple, now_id,
                           parse_key, state_key, stream_key)
from .search import parse_duration_ms, search, since_id, timeline, timeline_html, timeline_png
from .security import RedisAccessError, check_redis, redact_url
from .subscriber import stream_keys

console = wide_console()

EMBED_BATCH = 8  # clips per encoder call in `alert tune`
MIN_CLIPS_PER_CLASS = 2  # `alert tune` needs a positive and a negative in each split
MAX_HOLDOUT = 0.9  # `alert tune` keeps at least a tenth of each folder to fit on
MAX_TOP = 10_000
REFRESH_S = 0.5  # live tables
MAX_NAMED = 10  # devices named in an error message
WATCH_BLOCK_MS = 500

# `alert add` option of each Decision field, named in the one-line error when Decision refuses a value
DECISION_OPTIONS = {"threshold": "--threshold", "k": "--k", "n": "--n", "cooldown_s": "--cooldown",
                    "hysteresis": "--hysteresis"}


def connect(url: str) -> redis.Redis:
    """A client of the Redis at `url` once it answers; one line naming the cause (a URL it cannot use,
    unreachable, refused credentials; never the password) when it does not."""
    try:
        check_redis(url)
        return redis.Redis.from_url(url)
    except ValueError as err:  # the URL itself, which is not echoed: it may hold a password
        raise click.ClickException(f"cannot use the Redis URL: {err} (write redis://[:PASSWORD@]HOST:PORT/DB)") \
            from None
    except (RedisAccessError, redis.RedisError) as err:
        raise click.ClickException(str(err)) from None


def load_encoder(model: str, checkpoint: str | None, device: str | None = None, dtype: str | None = None):
    """encoders.load, with one line for a missing checkpoint or an unusable device or dtype."""
    import encoders

    try:
        return encoders.load(model, checkpoint=checkpoint, device=device, dtype=dtype)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        raise click.ClickException(f"cannot load model {model}: {err}") from None


def model_name(model: str | None, checkpoint: str | None) -> str:
    from encoders.weights import default_model_name

    return default_model_name(model, checkpoint)


def until_stopped(seconds: float | None) -> threading.Event:
    """An event set by SIGINT/SIGTERM, or after `seconds`."""
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    if seconds is not None:
        timer = threading.Timer(seconds, stop.set)
        timer.daemon = True
        timer.start()
    return stop


def count_event(stats: dict, event: str) -> int:
    """A StageMetrics snapshot's count of `event` (or, ending in `_`, of every event it begins), over all labels."""
    return sum(n for key, n in stats["counts"].items()
               if (name := key.split(":", 1)[0]) == event or (event.endswith("_") and name.startswith(event)))


def clock_time(entry_id: str) -> str:
    """The local time of day at which the server stored a stream entry."""
    return datetime.fromtimestamp(id_tuple(entry_id)[0] / 1000).strftime("%H:%M:%S")


# ----- alert add / list / rm / tune ---------------------------------------------------------------------


@click.group()
def alert() -> None:
    """Standing text queries that raise alerts on the embedding streams."""


@alert.command("add")
@click.argument("text")
@click.option("--modality", type=click.Choice(QUERY_MODALITIES), required=True, help="Streams to watch.")
@click.option("--device", default="*", show_default=True, help="Device id or glob ('*': every device).")
@click.option("--threshold", type=float, default=Decision.threshold, show_default=True,
              help="Calibrated score (softmax share against the background prompts) that fires.")
@click.option("--k", "k", type=int, default=Decision.k, show_default=True, help="Windows above threshold ...")
@click.option("--n", "n", type=int, default=Decision.n, show_default=True, help="... among the last n.")
@click.option("--cooldown", type=float, default=Decision.cooldown_s, show_default=True,
              help="Seconds of device time between two alerts of this query on one device.")
@click.option("--hysteresis", type=float, default=Decision.hysteresis, show_default=True,
              help="Re-arm only once the score falls below threshold - hysteresis.")
@click.option("--example", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Use this clip or image's embedding (same encoder) instead of the text's.")
@click.option("--vector", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Use this .npy vector (normalised) instead of the text's.")
@REDIS_OPTION
@MODEL_OPTION
@CHECKPOINT_OPTION
def alert_add(text, modality, device, threshold, k, n, cooldown, hysteresis, example, vector, redis_url, model,
              checkpoint):
    """Add a query: TEXT (also the label of an --example or --vector query) to watch for."""
    if not text.strip():
        raise click.BadParameter("the query text is empty", param_hint="TEXT")
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
        emb, source = _load_vector(vector, name), f"vector:{vector}"
    else:
        encoder = load_encoder(name, checkpoint)
        try:
            check_modality(encoder, modality)
        except QueryError as err:
            raise click.BadParameter(str(err), param_hint="--modality") from err
        if example:
            emb, source = _embed_example(encoder, example, modality), f"example:{example}"
        else:
            emb, source = ensemble(encoder, [text], modality)[0], "text"
    if load_background(client, name, modality) is None:
        ensure_background(client, encoder or load_encoder(name, checkpoint), modality)
    try:
        q = save_query(client, Query(text, modality, emb, name, device=device, decision=decision, source=source))
    except QueryError as err:
        raise click.UsageError(str(err)) from err
    console.print(f"added query [bold]{q.id}[/]: {text!r} on {modality} of {device} ({name}, {source}), "
                  f"threshold {decision.threshold}, {decision.k} of {decision.n}, cooldown {decision.cooldown_s} s, "
                  f"hysteresis {decision.hysteresis}")
    if source != "text":
        console.print("[yellow]note: the score is calibrated against text prompts, and a clip's embedding is closer "
                      "to clips of its modality than any text is, so this query's scores run high: fit its "
                      "threshold with `alert tune` (ALERTS.md)[/]")


def _load_vector(path: str, name: str) -> np.ndarray:
    from encoders.config import resolve_config

    try:
        v = unit(np.load(path, allow_pickle=False), f"--vector {path}")
    except (ValueError, OSError) as err:
        raise click.BadParameter(str(err), param_hint="--vector") from err
    dim = resolve_config(name).out_embed_dim
    if v.shape[0] != dim:
        raise click.BadParameter(f"{path} has {v.shape[0]} dimensions; model {name} embeds in {dim}",
                                 param_hint="--vector")
    return v


def _embed_example(encoder, path: str, modality: str) -> np.ndarray:
    from encoders.transforms import load_file

    try:
        _, tensor = load_file(path, modality)
    except (ValueError, OSError) as err:
        raise click.BadParameter(f"{path} does not load as {modality}: {err}", param_hint="--example") from err
    return encoder.embed(modality, tensor.unsqueeze(0))[0]


@alert.command("list")
@REDIS_OPTION
@JSON_OPTION
def alert_list(redis_url, as_json):
    """The active queries."""
    queries = load_queries(connect(redis_url))
    if as_json:
        click.echo(json.dumps([{"id": q.id, "text": q.text, "modality": q.modality, "device": q.device,
                                "model": q.model, "source": q.source, "threshold": q.decision.threshold,
                                "k": q.decision.k, "n": q.decision.n, "cooldown_s": q.decision.cooldown_s,
                                "hysteresis": q.decision.hysteresis, "created": q.created} for q in queries],
                              indent=2))
        return
    out = table("bindstream queries", ("id", "text", "modality", "device", "model", "source", "threshold", "k/n",
                                       "cooldown s", "hysteresis", "created"), whole=("id",))
    for q in queries:
        d = q.decision
        out.add_row(q.id, q.text, q.modality, q.device, q.model, q.source, f"{d.threshold:.4g}", f"{d.k}/{d.n}",
                    f"{d.cooldown_s:g}", f"{d.hysteresis:g}",
                    datetime.fromtimestamp(q.created).strftime("%Y-%m-%d %H:%M:%S"))
    console.print(out)


def find_query(client: redis.Redis, ref: str) -> str:
    """The id of the query that `ref` names (find_query_id), or one line saying why none."""
    try:
        return find_query_id(client, ref)
    except QueryError as err:
        raise click.ClickException(str(err)) from None


@alert.command("rm")
@click.argument("queries", nargs=-1, required=True)
@REDIS_OPTION
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


def _split(n: int, holdout: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(n)
    held = min(max(int(round(holdout * n)), 1), n - 1) if holdout > 0 else 0
    return order[held:], order[:held]


@alert.command("tune")
@click.argument("query")
@click.option("--positive", type=click.Path(exists=True, file_okay=False), required=True,
              help="Folder of clips where the query should fire.")
@click.option("--negative", type=click.Path(exists=True, file_okay=False), required=True,
              help="Folder of clips where it should not.")
@click.option("--holdout", type=click.FloatRange(0.0, MAX_HOLDOUT), default=0.3, show_default=True,
              help="Share of each folder kept out of the fit to report precision and recall on.")
@click.option("--seed", type=int, default=0, show_default=True, help="Of the train / held-out split.")
@click.option("--dry-run", is_flag=True, help="Report only; keep the stored threshold.")
@REDIS_OPTION
@CHECKPOINT_OPTION
def alert_tune(query, positive, negative, holdout, seed, dry_run, redis_url, checkpoint):
    """Fit QUERY's threshold (its id, the start of its id, or its text) on labelled clips (best F1 on the
    training split) and report precision and recall on the held-out clips."""
    if not 0.0 <= holdout <= MAX_HOLDOUT:  # click's FloatRange lets NaN through
        raise click.BadParameter(f"{holdout} is not in the range 0<=x<={MAX_HOLDOUT}", param_hint="--holdout")
    client = connect(redis_url)
    try:
        q = load_query(client, find_query(client, query))
    except QueryError as err:
        raise click.ClickException(str(err)) from None
    if q.modality == "fused":
        raise click.ClickException("a fused query cannot be tuned from clips: no single clip makes a fused window")
    background = load_background(client, q.model, q.modality)
    if background is None:
        raise click.ClickException(f"no background stored for {q.model}/{q.modality}")
    pos, pos_skipped = _labelled_clips(positive, q.modality)
    neg, neg_skipped = _labelled_clips(negative, q.modality)
    for folder, clips, skipped in ((positive, pos, pos_skipped), (negative, neg, neg_skipped)):
        if skipped:
            console.print(f"[yellow]{folder}: skipped {len(skipped)} file(s) that are not {q.modality}: "
                          f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}[/]")
        if len(clips) < MIN_CLIPS_PER_CLASS:
            raise click.ClickException(f"{folder}: {len(clips)} {q.modality} clip(s); at least "
                                       f"{MIN_CLIPS_PER_CLASS} are needed")
    emb = _embed_all(load_encoder(q.model, checkpoint), q.modality, pos + neg)
    scores = ModalityIndex([q], background).shares(emb)[:, 0]
    labels = np.array([1] * len(pos) + [0] * len(neg))
    rng = np.random.default_rng(seed)
    (pos_train, pos_held), (neg_train, neg_held) = _split(len(pos), holdout, rng), _split(len(neg), holdout, rng)
    train = np.concatenate([pos_train, len(pos) + neg_train])
    held = np.concatenate([pos_held, len(pos) + neg_held])
    threshold = fit_threshold(scores[train], labels[train])
    old = q.decision.threshold
    columns = ("split", "threshold", "positives", "negatives", "precision", "recall", "F1")
    out = table(f"tune {q.id}: {q.text!r} ({q.modality}, {q.model})", columns, right=columns[1:])
    rows = [("train", train, threshold)]
    rows += [("held out", held, threshold), ("held out, old threshold", held, old)] if len(held) else []
    for split, idx, t in rows:
        c = confusion(scores[idx], labels[idx], t)
        out.add_row(split, f"{t:.4g}", str(int(labels[idx].sum())), str(int((1 - labels[idx]).sum())),
                    f"{c.precision:.3f}", f"{c.recall:.3f}", f"{c.f1:.3f}")
    console.print(out)
    if confusion(scores[train], labels[train], threshold).f1 == 0:
        raise click.ClickException(f"no threshold separates these clips for query {q.id} (F1 0 on them): "
                                   "threshold not changed; check the folders, or add clips")
    verb = "would set" if dry_run else "set"
    hysteresis = q.decision.hysteresis if q.decision.hysteresis < threshold else threshold / 2
    if hysteresis != q.decision.hysteresis:
        console.print(f"hysteresis {q.decision.hysteresis} is not below the new threshold: {verb} to {hysteresis:.4g}")
    if dry_run:
        console.print(f"dry run: {verb} query {q.id}'s threshold {old} -> {threshold:.4g}; nothing stored")
        return
    set_decision(client, q.id, replace(q.decision, threshold=threshold, hysteresis=hysteresis))
    console.print(f"query {q.id}: threshold {old} -> {threshold:.4g}")


# ----- match / watch -----------------------------------------------------------------------------------


def matcher_table(stats: list[dict], title: str = "bindstream matchers") -> Table:
    """One row per matcher: streams, queries, entries in, scored, alerts, skipped, alert latency."""
    columns = ("matcher", "streams", "queries", "in", "scored", "alerts", "duplicates", "rejected", "p50 ms", "p99 ms")
    out = table(title, columns, right=columns[1:])
    for i, s in enumerate(stats):
        out.add_row(str(i), str(s["streams"]), str(s["queries"]), *(str(count_event(s, e)) for e in (
            "in", "scored", "alert", "duplicate_alert", "rejected_")),
            f"{s['latency_p50_ms']:.0f}" if "latency_p50_ms" in s else "-",
            f"{s['latency_p99_ms']:.0f}" if "latency_p99_ms" in s else "-")
    return out


@click.command("match")
@REDIS_OPTION
@click.option("--group", default=DEFAULT_GROUP, show_default=True, help="Consumer group on the embedding streams.")
@click.option("--devices", default="*", show_default=True, help="Glob of the devices to match.")
@click.option("--matchers", type=click.IntRange(1), default=1, show_default=True,
              help="Matcher actors; the streams are split among them.")
@click.option("--from-start", is_flag=True, help="Also match windows stored before now (streams new to the group).")
@click.option("--in-process", is_flag=True, help="One matcher in this process instead of Ray actors.")
@click.option("--seconds", type=float, default=None, help="Stop after this long (default: until Ctrl-C).")
def match(redis_url, group, devices, matchers, from_start, in_process, seconds):
    """Match the embedding streams against the queries and publish alerts, until Ctrl-C."""
    import ray

    connect(redis_url)
    settings = MatcherSettings(group=group, devices=devices, start_id="0" if from_start else now_id())
    stop = until_stopped(seconds)
    if in_process:
        local = [Matcher(replace(settings, autostart=True), redis_url)]
    else:
        from .pipeline import connect_ray

        connect_ray()
        actors = start_matchers(settings, redis_url, matchers)

    def call(method: str) -> list[dict]:
        if in_process:
            return [getattr(m, method)() for m in local]
        return ray.get([getattr(a, method).remote() for a in actors])

    with Live(matcher_table(call("stats")), console=console, refresh_per_second=2) as view:
        while not stop.wait(REFRESH_S):
            view.update(matcher_table(call("stats")))
    console.print(matcher_table(call("stop"), "bindstream matchers: final"))
    if not in_process:
        for a in actors:
            ray.kill(a)


def alerts_table(alerts, title: str = "bindstream alerts") -> Table:
    columns = ("time", "device", "query", "query id", "modality", "score", "threshold", "window t0 s", "latency ms")
    out = table(title, columns, right=columns[5:], whole=("query id",))
    for a in alerts:
        latency = id_tuple(a.id)[0] - id_tuple(a.source_id)[0]
        out.add_row(clock_time(a.id), a.device, a.query_text, a.query, a.modality, f"{a.score:.3f}",
                    f"{a.threshold:.3g}", f"{a.t0 / 1e9:.1f}", str(latency))
    return out


@click.command("watch")
@REDIS_OPTION
@click.option("--device", default="*", show_default=True, help="Device id or glob.")
@click.option("--since", default="10m", show_default=True, help="First show the alerts of this last while (0: none).")
@click.option("--rows", type=click.IntRange(1), default=20, show_default=True, help="Alerts shown.")
@click.option("--seconds", type=float, default=None, help="Stop after this long (default: until Ctrl-C).")
def watch(redis_url, device, since, rows, seconds):
    """Show alerts live, newest last."""
    from fnmatch import fnmatchcase

    client = connect(redis_url)
    try:
        since_ms = parse_duration_ms(since) if since.strip() != "0" else None
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--since") from err
    shown: deque = deque(maxlen=rows)
    last = "$" if since_ms is None else since_id(client, since_ms)
    if since_ms is not None:
        for entry_id, f in client.xrange(ALERTS_STREAM, min=last):
            a = Alert.from_entry(entry_id, f)
            last = a.id
            if fnmatchcase(a.device, device):
                shown.append(a)
    stop = until_stopped(seconds)
    with Live(alerts_table(shown), console=console, refresh_per_second=2) as view:
        while not stop.is_set():
            for _, entries in client.xread({ALERTS_STREAM: last}, block=WATCH_BLOCK_MS) or []:
                for entry_id, f in entries:
                    a = Alert.from_entry(entry_id, f)
                    last = a.id
                    if fnmatchcase(a.device, device):
                        shown.append(a)
            view.update(alerts_table(shown))


# ----- search / timeline -------------------------------------------------------------------------------


@click.command("search")
@click.argument("text")
@click.option("--modality", type=click.Choice(QUERY_MODALITIES + ("all",)), default="all", show_default=True)
@click.option("--device", default="*", show_default=True, help="Device id or glob.")
@click.option("--since", default=None, help="Only windows stored in this last while (e.g. 10m, 2h).")
@click.option("--top", type=click.IntRange(1, MAX_TOP), default=20, show_default=True)
@REDIS_OPTION
@MODEL_OPTION
@CHECKPOINT_OPTION
@JSON_OPTION
def search_command(text, modality, device, since, top, redis_url, model, checkpoint, as_json):
    """Rank stored windows by similarity to TEXT (brute force over the streams)."""
    if not text.strip():
        raise click.BadParameter("the search text is empty", param_hint="TEXT")
    try:
        since_ms = parse_duration_ms(since) if since else None
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--since") from err
    client = connect(redis_url)
    present = {parse_key(k)[1] for k in stream_keys(client, device)} & set(QUERY_MODALITIES)
    modalities = sorted(present) if modality == "all" else [m for m in (modality,) if m in present]
    if not modalities:
        click.echo(f"no {'' if modality == 'all' else modality + ' '}embedding streams for device {device!r}",
                   err=as_json)
        if as_json:
            click.echo("[]")
        return
    encoder = load_encoder(model_name(model, checkpoint), checkpoint)
    vectors = {}
    for m in modalities:
        ensure_background(client, encoder, m)
        vectors[m] = ensemble(encoder, [text], m)[0]
    hits, skipped = search(client, vectors, encoder.name, device, since_ms, top)
    note = f"{skipped} stored windows skipped (malformed, or embedded by another model)" if skipped else None
    if as_json:
        if note:
            click.echo(note, err=True)
        click.echo(json.dumps([{"rank": rank, "score": h.score, "cosine": h.cosine, "device": h.record.device,
                                "modality": h.record.modality, "t0_ns": h.record.t0, "t1_ns": h.record.t1,
                                "model": h.record.model, "stream": h.record.stream, "id": h.record.id}
                               for rank, h in enumerate(hits, 1)], indent=2))
        return
    columns = ("rank", "score", "cosine", "device", "modality", "t0 s", "t1 s", "stored", "stream id")
    out = table(f"search {text!r} ({encoder.name})", columns, right=columns[:3] + columns[5:7], whole=("stream id",))
    for rank, h in enumerate(hits, 1):
        r = h.record
        out.add_row(str(rank), f"{h.score:.3f}", f"{h.cosine:.3f}", r.device, r.modality, f"{r.t0 / 1e9:.1f}",
                    f"{r.t1 / 1e9:.1f}", clock_time(r.id), r.id)
    out.caption = note
    console.print(out)


@click.command("timeline")
@click.option("--device", required=True, help="Device id.")
@click.option("--since", default="10m", show_default=True, help="Windows stored in this last while.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="FILE.html or FILE.png.")
@REDIS_OPTION
def timeline_command(device, since, output, redis_url):
    """Each query's calibrated score over DEVICE's windows, with its threshold and alerts."""
    suffix = Path(output).suffix.lower()
    if suffix not in (".html", ".htm", ".png"):
        raise click.BadParameter(f"{output}: write .html (or .png with matplotlib)", param_hint="--output")
    if suffix == ".png" and importlib.util.find_spec("matplotlib") is None:
        raise click.ClickException(f"PNG output needs matplotlib, which is not installed; write HTML instead: "
                                   f"-o {Path(output).with_suffix('.html')}")
    try:
        since_ms = parse_duration_ms(since)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--since") from err
    client = connect(redis_url)
    if not stream_keys(client, device):
        devices = sorted({parse_key(k)[0] for k in stream_keys(client)})
        listed = ", ".join(devices[:MAX_NAMED]) + (" ..." if len(devices) > MAX_NAMED else "")
        raise click.ClickException(f"no device {device!r} at {redact_url(redis_url)}: it has no embedding streams "
                                   f"there ({'devices: ' + listed if devices else 'no device has'})")
    series = timeline(client, device, since_ms)
    if not series:
        raise click.ClickException(f"no query watches device {device!r} (see `alert list`)")
    if not any(len(s.scores) for s in series):
        raise click.ClickException(f"device {device!r} has no window stored in the last {since} of a modality that a "
                                   f"query watches; try a longer --since")
    if suffix == ".png":
        timeline_png(series, device, output)
    else:
        Path(output).write_text(timeline_html(series, device))
    console.print(f"wrote {output}: {len(series)} queries, {sum(len(s.scores) for s in series)} scores, "
                  f"{sum(len(s.alerts) for s in series)} alerts")


# ----- bench alerts ------------------------------------------------------------------------------------

BENCH_MODEL = "bench"
BENCH_MODALITY = "audio"
BENCH_BACKGROUND = 16  # background vectors
BENCH_DECISION = Decision(threshold=0.5, k=2, n=3, cooldown_s=0.0, hysteresis=0.2)
EVENT_WINDOWS = 3  # windows equal to a query's vector: one alert each, at the 2nd (k)
WINDOW_NS = 2_000_000_000
WRITER_TICK_S = 0.005
WRITE_BATCH = 1000  # XADDs per pipeline when filling the search stream
DRAIN_IDLE_STEPS = 3  # matcher steps reading nothing before the run counts as drained
READY_TIMEOUT_S = 120.0  # for the matcher process to start
TARGET_SCORE_RATE = 50_000  # embeddings/s against 100 queries on one core
TARGET_P99_MS = 50.0  # at 1,000 embeddings/s


def random_units(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench_background(rng: np.random.Generator, dim: int) -> Background:
    return Background(BENCH_MODEL, BENCH_MODALITY, tuple(f"b{i}" for i in range(BENCH_BACKGROUND)),
                      random_units(rng, BENCH_BACKGROUND, dim))


def scoring_rate(queries: int, dim: int, batch: int, rows: int, seed: int) -> float:
    """Embeddings scored per second (matrix product and shares) against `queries` queries, `batch` rows a call."""
    rng = np.random.default_rng(seed)
    qs = [Query(f"q{i}", BENCH_MODALITY, v, BENCH_MODEL) for i, v in enumerate(random_units(rng, queries, dim))]
    index, x = ModalityIndex(qs, bench_background(rng, dim)), random_units(rng, rows, dim)
    index.shares(x[:batch])
    start = time.perf_counter()
    for i in range(0, rows, batch):
        index.shares(x[i : i + batch])
    return rows / (time.perf_counter() - start)


@contextmanager
def one_thread_pool():
    """A one-process pool whose BLAS runs one thread (the matcher's one core; Ray actors get the same)."""
    saved = {k: os.environ.get(k) for k in ONE_BLAS_THREAD}
    os.environ.update(ONE_BLAS_THREAD)
    try:
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            yield pool
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def match_until_done(settings: MatcherSettings, url: str, ready_key: str, done_key: str) -> dict:
    """Run a matcher: set `ready_key` once it has its queries and streams, stop when `done_key` exists and
    nothing is left to read."""
    matcher = Matcher(settings, url)
    matcher.step()
    matcher.client.set(ready_key, 1)
    idle = 0
    while not matcher.client.exists(done_key) or idle < DRAIN_IDLE_STEPS:
        idle = 0 if matcher.step() else idle + 1
    return matcher.stop()


def write_stream(client: redis.Redis, devices: list[str], query_vectors: np.ndarray, background: np.ndarray,
                 rate: float, seconds: float, events_per_s: float, seed: int) -> dict:
    """XADD embeddings round robin over `devices` at `rate`/s for `seconds`: background windows (a random
    background vector plus as much random noise), and every 1/`events_per_s` s, on the next device,
    EVENT_WINDOWS windows equal to a query's vector. Returns {sent, events (those whose k-th window was
    written: each must give one alert), seconds}."""
    rng = np.random.default_rng(seed)
    dim = query_vectors.shape[1]
    t_dev, event_left, event_query = [0] * len(devices), [0] * len(devices), [0] * len(devices)
    sent = started = events = 0
    start = time.monotonic()
    next_event = start
    while (elapsed := time.monotonic() - start) < seconds:
        due = int(rate * elapsed) - sent
        if due <= 0:
            time.sleep(WRITER_TICK_S)
            continue
        noise = random_units(rng, due, dim) + background[rng.integers(len(background), size=due)]
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        pipe = client.pipeline(transaction=False)
        for i in range(due):
            d = sent % len(devices)
            if event_left[d] == 0 and time.monotonic() >= next_event:
                event_left[d], event_query[d] = EVENT_WINDOWS, started % len(query_vectors)
                started += 1
                next_event += 1 / events_per_s
            v = query_vectors[event_query[d]] if event_left[d] else noise[i]
            events += event_left[d] == EVENT_WINDOWS - BENCH_DECISION.k + 1
            event_left[d] = max(event_left[d] - 1, 0)
            e = Embedding(devices[d], BENCH_MODALITY, t_dev[d], t_dev[d] + WINDOW_NS, v, BENCH_MODEL, 0, 0)
            pipe.xadd(stream_key(devices[d], BENCH_MODALITY), encode_embedding(e))
            t_dev[d] += WINDOW_NS
            sent += 1
        pipe.execute()
    return {"sent": sent, "events": events, "seconds": time.monotonic() - start}


def alert_run(client: redis.Redis, url: str, queries: int, rate: float, seconds: float, dim: int, devices: int,
              events_per_s: float, seed: int) -> tuple[dict, list[Alert], dict]:
    """Queries (orthonormal, so that an event matches one query), a matcher in a one-thread process, and
    this process writing; returns (written, the run's alerts, the matcher's stats). Cleans up after."""
    rng = np.random.default_rng(seed)
    tag = f"bench-{rng.integers(1 << 30):08x}"
    names = [f"{tag}-{i}" for i in range(devices)]
    basis = np.linalg.qr(rng.standard_normal((dim, queries + BENCH_BACKGROUND)))[0].T.astype(np.float32)
    query_vectors, background = basis[:queries], basis[queries:]
    settings = MatcherSettings(group=tag, devices=f"{tag}-*", start_id="0")
    ready, done = f"{tag}:ready", f"{tag}:done"
    save_background(client, Background(BENCH_MODEL, BENCH_MODALITY, tuple(f"b{i}" for i in range(len(background))),
                                       background))
    for n in names:  # the streams exist before the run: stream discovery is not part of the latency
        client.xgroup_create(stream_key(n, BENCH_MODALITY), settings.group, id="0", mkstream=True)
    added = [save_query(client, Query(f"q{i}", BENCH_MODALITY, v, BENCH_MODEL, device=f"{tag}-*",
                                      decision=BENCH_DECISION)) for i, v in enumerate(query_vectors)]
    try:
        with one_thread_pool() as pool:
            matcher = pool.submit(match_until_done, settings, url, ready, done)
            try:
                deadline = time.monotonic() + READY_TIMEOUT_S
                while not client.exists(ready):
                    if matcher.done():
                        matcher.result()  # raises the matcher's error
                    if time.monotonic() > deadline:
                        raise click.ClickException(f"the matcher process did not start in {READY_TIMEOUT_S} s")
                    time.sleep(WRITER_TICK_S)
                written = write_stream(client, names, query_vectors, background, rate, seconds, events_per_s, seed)
            finally:
                client.set(done, 1)  # the matcher drains and returns
            stats = matcher.result()
        alerts = [a for a in (Alert.from_entry(i, f) for i, f in client.xrange(ALERTS_STREAM))
                  if a.device.startswith(tag)]
    finally:
        for q in added:
            delete_query(client, q.id)
        client.delete(background_key(BENCH_MODEL, BENCH_MODALITY), ready, done,
                      *[k for n in names for k in (stream_key(n, BENCH_MODALITY),
                                                   state_key(settings.group, stream_key(n, BENCH_MODALITY)))])
    return written, alerts, stats


def search_cost(client: redis.Redis, records: int, dim: int, seed: int) -> dict[str, float]:
    """Seconds to XRANGE, decode and score `records` stored windows of `dim` dimensions (chunks of 10k)."""
    from .search import XRANGE_CHUNK

    rng = np.random.default_rng(seed)
    key = stream_key("bench-search", BENCH_MODALITY)
    for i in range(0, records, WRITE_BATCH):
        pipe = client.pipeline(transaction=False)
        for v in random_units(rng, min(WRITE_BATCH, records - i), dim):
            pipe.xadd(key, encode_embedding(Embedding("bench-search", BENCH_MODALITY, 0, WINDOW_NS, v, BENCH_MODEL, 0, 0)))
        pipe.execute()
    index = ModalityIndex([Query("search", BENCH_MODALITY, random_units(rng, 1, dim)[0], BENCH_MODEL)],
                          bench_background(rng, dim))
    cost = {"xrange": 0.0, "decode": 0.0, "score": 0.0}
    start = "-"
    try:
        while True:
            t = time.perf_counter()
            entries = client.xrange(key, min=start, count=XRANGE_CHUNK)
            cost["xrange"] += time.perf_counter() - t
            if not entries:
                return cost
            t = time.perf_counter()
            x = np.stack([decode_embedding(key, i, f).emb for i, f in entries])
            cost["decode"] += time.perf_counter() - t
            t = time.perf_counter()
            index.shares(x)
            cost["score"] += time.perf_counter() - t
            start = "(" + entries[-1][0].decode()
    finally:
        client.delete(key)


@click.command("alerts")
@click.option("--queries", type=click.IntRange(1), default=100, show_default=True)
@click.option("--rate", type=click.FloatRange(min=1), default=1000.0, show_default=True, help="Embeddings/s written.")
@click.option("--seconds", type=click.FloatRange(min=1), default=10.0, show_default=True)
@click.option("--dim", type=click.IntRange(2), default=1024, show_default=True, help="1024: imagebind_huge.")
@click.option("--devices", type=click.IntRange(1), default=10, show_default=True)
@click.option("--events-per-s", type=click.FloatRange(min=0.01), default=20.0, show_default=True,
              help="Matching events started per second (one alert each).")
@click.option("--score-rows", type=click.IntRange(1), default=200_000, show_default=True,
              help="Embeddings scored for the throughput figure.")
@click.option("--search-records", type=click.IntRange(0), default=100_000, show_default=True,
              help="Stored windows for the search cost figure (0: skip).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--redis", "redis_url", default=None, help="A scratch Redis; default: an embedded redis-server.")
def bench_alerts(queries, rate, seconds, dim, devices, events_per_s, score_rows, search_records, seed, redis_url):
    """Matcher throughput and alert latency against a real redis-server (the matcher in a process of its
    own with one BLAS thread, this process writing the embeddings)."""
    from .redis_server import RedisServer

    if redis_url:
        connect(redis_url)  # a bad --redis fails at once, not after the scoring run
    read_count = MatcherSettings.read_count
    with one_thread_pool() as pool:
        score_per_s = pool.submit(scoring_rate, queries, dim, read_count, score_rows, seed).result()
    server = None if redis_url else RedisServer().start()
    try:
        client = connect(redis_url or server.url)
        written, alerts, stats = alert_run(client, redis_url or server.url, queries, rate, seconds, dim, devices,
                                           events_per_s, seed)
        cost = search_cost(client, search_records, dim, seed) if search_records else None
    finally:
        if server:
            server.stop()
    latency = np.array([id_tuple(a.id)[0] - id_tuple(a.source_id)[0] for a in alerts], dtype=float)
    out = table(f"bench alerts: {queries} queries, {dim}-d, {written['sent']} embeddings at "
                f"{written['sent'] / written['seconds']:.0f}/s from {devices} devices",
                ("figure", "measured", "target"), right=("measured", "target"))
    out.add_row(f"embeddings scored/s, one core (matrix product + shares, batches of {read_count})",
                f"{score_per_s:,.0f}", f">= {TARGET_SCORE_RATE:,} (100 queries)")
    out.add_row("events written / alerts", f"{written['events']} / {len(alerts)}", "equal")
    if len(latency):
        out.add_row("alert latency p50, XADD embedding -> XADD alert (ms)", f"{np.percentile(latency, 50):.1f}", "")
        out.add_row("alert latency p99 (ms)", f"{np.percentile(latency, 99):.1f}",
                    f"<= {TARGET_P99_MS:.0f} at 1,000/s")
    out.add_row("rejected entries / duplicate alerts",
                f"{count_event(stats, 'rejected_')} / {count_event(stats, 'duplicate_alert')}",
                "0 / 0")
    if cost:
        per_million = {k: v * 1e6 / search_records for k, v in cost.items()}
        out.add_row(f"search: XRANGE / decode / score of {search_records:,} windows (s)",
                    " / ".join(f"{v:.2f}" for v in cost.values()), "")
        out.add_row("search: per million windows, extrapolated (s)",
                    f"{sum(per_million.values()):.1f} ({' / '.join(f'{v:.1f}' for v in per_million.values())})", "")
    console.print(out)
