"""The tables of `bindstream run/demo`: per stage, items in and out, queue depth, latency, drops; per
modality; and, in the summary, the devices whose data was dropped, rejected or refused.

A stage's `out` is the next one's `in`: ingest passes messages on to windowing, which cuts windows for the
embedders, whose embeddings the publisher writes, together with the `fused` records it forms, which the
matchers (and the search index's indexers) read; a matcher's out is its alerts, an indexer's the entries it
indexed. What a stage dropped, rejected or refused is counted by
reason (`dropped_*`, `rejected_*`, `refused_*`), per device where the stage knows it: not for ingest's
refused connections (over the cap, or by CurveZMQ), nor the matcher's rejected queries and backgrounds.
Every reason of every stage is shown, in the caption of the stage table.
"""

from __future__ import annotations

from collections import Counter

from rich.console import Group
from rich.table import Table

from .records import QUERY_MODALITIES
from .stage import Counts

STAGE_ORDER = ("ingest", "window", "embed", "publish", "match", "notify", "index")
DROPS = ("dropped_", "rejected_", "refused_")
NOT_PER_DEVICE = ("rejected_query", "rejected_background")  # the matcher's: per query id, per model/modality
OUT_EVENT = {"match": "alert", "notify": "sent", "index": "indexed"}  # a stage whose output is not counted as `out`
SINK_STAGES = ("notify",)  # labelled by sink, not by device
TOP_DEVICES = 10


def _drops(stats: dict[str, list[dict]]):
    """(stage, event, label, n) for every drop, reject or refusal count of every stage."""
    for stage in STAGE_ORDER:
        counts = Counts.of(*stats.get(stage, []))
        for event in counts.events():
            if event.startswith(DROPS):
                for label, n in counts.labels(event).items():
                    yield stage, event, label, n


def drops_by_reason(stats: dict[str, list[dict]]) -> Counter:
    """Every dropped, rejected or refused item or connection, keyed by "stage: reason"."""
    out: Counter = Counter()
    for stage, event, _, n in _drops(stats):
        out[f"{stage}: {event}"] += n
    return out


def drops_by_device(stats: dict[str, list[dict]]) -> dict[str, Counter]:
    """Per device, its dropped, rejected or refused items keyed by "stage: reason" (the unlabelled ones,
    connections, are in `drops_by_reason` only)."""
    out: dict[str, Counter] = {}
    for stage, event, device, n in _drops(stats):
        if device and event not in NOT_PER_DEVICE and stage not in SINK_STAGES:
            out.setdefault(device, Counter())[f"{stage}: {event}"] += n
    return out


def stats_table(stats: dict[str, list[dict]], title: str = "bindstream") -> Table:
    table = Table(title=title)
    for column in ("stage", "actors", "in", "out", "queued", "p50 ms", "p99 ms"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for stage in STAGE_ORDER:
        actors = stats.get(stage, [])
        if not actors:
            continue
        p50 = max((a.get("latency_p50_ms", 0.0) for a in actors), default=0.0)
        p99 = max((a.get("latency_p99_ms", 0.0) for a in actors), default=0.0)
        counts = Counts.of(*actors)
        out = counts.get(OUT_EVENT.get(stage, "out"))
        fused = counts.get("out", "fused") if stage == "publish" else 0
        table.add_row(
            stage,
            str(len(actors)),
            str(counts.get("in")),
            f"{out - fused} +{fused} fused" if fused else str(out),
            str(sum(a.get("queue", 0) for a in actors)),
            f"{p50:.0f}" if p50 else "-",
            f"{p99:.0f}" if p99 else "-",
        )
    drops = drops_by_reason(stats)
    table.caption = "drops: " + (", ".join(f"{k} {n}" for k, n in sorted(drops.items())) if drops else "none")
    return table


def per_modality_table(stats: dict[str, list[dict]]) -> Table:
    """Per modality: windows cut, those gated as unchanged (published again without a forward), those embedded
    (model forwards), and entries published."""
    caption = "gated: unchanged since the last embedded window (streaming/gating.py); fused: summed by the publisher"
    table = Table(title="per modality", caption=caption)
    for column in ("modality", "windows", "gated", "embedded", "published"):
        table.add_column(column, justify="left" if column == "modality" else "right")
    window, embed, publish = (Counts.of(*stats.get(s, [])) for s in ("window", "embed", "publish"))
    for modality in QUERY_MODALITIES:
        forwards = embed.get("out", modality) - embed.get("reused", modality)
        row = [window.get("out", modality), window.get("gated", modality), forwards, publish.get("out", modality)]
        if any(row):
            table.add_row(modality, *(["-"] * 3 if modality == "fused" else map(str, row[:3])), str(row[3]))
    return table


def per_device_table(stats: dict[str, list[dict]], top: int = TOP_DEVICES) -> Table | None:
    """The `top` devices with the most items dropped, rejected or refused, by reason, and the rest in one
    row; None when nothing was."""
    by_device = sorted(drops_by_device(stats).items(), key=lambda item: (-item[1].total(), item[0]))
    if not by_device:
        return None
    table = Table(title="dropped, rejected or refused, per device")
    for column in ("device", "items", "by stage and reason"):
        table.add_column(column, justify="right" if column == "items" else "left", overflow="fold")
    for device, reasons in by_device[:top]:
        table.add_row(device, str(reasons.total()), ", ".join(f"{k} {n}" for k, n in reasons.most_common()))
    rest = by_device[top:]
    if rest:
        reasons = sum((r for _, r in rest), Counter())
        table.add_row(
            f"{len(rest)} other devices", str(reasons.total()), ", ".join(f"{k} {n}" for k, n in reasons.most_common())
        )
    return table


def summary(stats: dict[str, list[dict]], title: str) -> Group:
    """The final tables: per stage, per modality, and per device when anything was dropped, rejected or
    refused."""
    tables = [stats_table(stats, title), per_modality_table(stats), per_device_table(stats)]
    return Group(*(t for t in tables if t is not None))
