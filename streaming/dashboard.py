"""The live table of `bindstream run/demo`: per stage, items in and out, queue depth, latency, drops."""

from __future__ import annotations

from collections import Counter

from rich.table import Table

STAGE_ORDER = ("ingest", "window", "embed", "publish", "match")


def _sum_counts(actors: list[dict], prefix: str) -> int:
    return sum(n for a in actors for k, n in a["counts"].items() if k == prefix or k.startswith(prefix + ":"))


def drops_by_reason(stats: dict[str, list[dict]]) -> Counter:
    """Every dropped or rejected item, keyed by "stage: reason"."""
    out: Counter = Counter()
    for stage, actors in stats.items():
        for actor in actors:
            for key, n in actor["counts"].items():
                event = key.split(":", 1)[0]
                if event.startswith(("dropped_", "rejected_")):
                    out[f"{stage}: {event}"] += n
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
        table.add_row(
            stage, str(len(actors)), str(_sum_counts(actors, "in")), str(_sum_counts(actors, "out")),
            str(sum(a.get("queue", 0) for a in actors)),
            f"{p50:.0f}" if p50 else "-", f"{p99:.0f}" if p99 else "-",
        )
    drops = drops_by_reason(stats)
    table.caption = "drops: " + (", ".join(f"{k} {n}" for k, n in sorted(drops.items())) if drops else "none")
    return table


def per_modality_table(stats: dict[str, list[dict]]) -> Table:
    """Windows cut and embeddings published per modality."""
    table = Table(title="per modality")
    for column in ("modality", "windows", "embedded", "published"):
        table.add_column(column, justify="left" if column == "modality" else "right")
    for modality in ("vision", "audio", "depth", "thermal", "imu", "fused"):
        row = [_sum_counts(stats.get(s, []), f"out:{modality}") for s in ("window", "embed", "publish")]
        if any(row):
            table.add_row(modality, *map(str, row))
    return table
