"""Following Redis as it is written: `bindstream tail` prints embedding records, `bindstream watch` shows
alerts, each an event's start, update or end; with --since, what was stored in that last while comes first."""

from __future__ import annotations

from collections import deque
from fnmatch import fnmatchcase

import click
import redis
from rich.live import Live
from rich.table import Table

from streaming.alerts.search import since_id
from streaming.redis_access import redact_url
from streaming.redis_layout import ALERTS_STREAM, END, HEALTH_EVENT, Alert, id_tuple
from streaming.subscriber import Tail, describe

from .options import SECONDS_OPTION, Duration, connect, redis_option
from .terminal import clock_time, console, table, until_stopped

WATCH_BLOCK_MS = 500
EVENT_SHOWN = 8  # characters of an event id shown by `watch`: `bindstream event show` takes this prefix


@click.command()
@redis_option()
@click.option(
    "--device", default="*", help="Device id or glob; devices that appear later are included from their first window."
)
@click.option("--modality", default="*", help="vision, audio, depth, thermal, imu, fused, or a glob.")
@click.option(
    "--since",
    type=Duration({"start": None}),
    default="0",
    help="First print the records stored in this last while (30s, 10m, 2h, 1d), or all of them (start); "
    "0: only new ones.",
)
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=None,
    help="Exit after this many records (default: run until Ctrl-C).",
)
def tail(redis_url, device, modality, since, count):
    """Print embedding records as they are published (with --since, the stored ones first), until Ctrl-C."""
    try:
        client = connect(redis_url)
        where = redact_url(redis_url)
        follow = Tail(client, device, modality, start="0" if since is None else since_id(client, since))
        printed, said_waiting = 0, False
        for r in follow.records():
            if r is None:
                if not printed and not said_waiting:
                    click.echo(f"waiting for records of {device}/{modality} at {where} (Ctrl-C to stop)", err=True)
                    said_waiting = True
                continue
            printed += 1
            click.echo(describe(r))
            if printed == count:
                break
        if follow.skipped:
            click.echo(f"skipped {follow.skipped} malformed entries", err=True)
    except redis.RedisError as err:
        raise click.ClickException(f"Redis at {where}: {err}") from None
    except KeyboardInterrupt:
        pass  # Ctrl-C: the user is done


def alerts_table(alerts, title: str = "bindstream alerts") -> Table:
    """One row per alerts entry: its state change (start, update, end) and event; a health event reads as its
    silence (`dev audio silent`, seconds silent against the silence that raises one), with no latency."""
    columns = (
        "time",
        "state",
        "event",
        "device",
        "query",
        "query id",
        "modality",
        "score",
        "threshold",
        "window t0 s",
        "latency ms",
    )
    out = table(title, columns, right=columns[7:], whole=("event", "query id"))
    for a in alerts:
        if a.kind == HEALTH_EVENT:  # its score is the silence in seconds, and its source the last entry before it
            score, threshold, latency = f"{a.score:.1f} s silent", f"{a.threshold:g} s", "-"
        else:
            score, threshold = f"{a.score:.3f}" + (" peak" if a.state == END else ""), f"{a.threshold:.3g}"
            latency = str(id_tuple(a.id)[0] - id_tuple(a.source_id)[0])
        out.add_row(
            clock_time(a.id),
            a.state,
            a.event[:EVENT_SHOWN] or "-",
            a.device,
            a.query_text,
            a.query,
            a.modality,
            score,
            threshold,
            f"{a.t0 / 1e9:.1f}",
            latency,
        )
    return out


@click.command()
@redis_option()
@click.option("--device", default="*", help="Device id or glob.")
@click.option("--since", type=Duration(), default="10m", help="First show the alerts of this last while (0: none).")
@click.option("--rows", type=click.IntRange(1), default=20, help="Alerts shown.")
@SECONDS_OPTION
def watch(redis_url, device, since, rows, seconds):
    """Show alerts live, newest last."""
    client = connect(redis_url)
    shown: deque = deque(maxlen=rows)

    def read(entries) -> str:
        """Keep the alerts of `entries` that are `device`'s; returns the last one's id, to read on from."""
        alerts = [Alert.from_entry(entry_id, f) for entry_id, f in entries]
        shown.extend(a for a in alerts if fnmatchcase(a.device, device))
        return alerts[-1].id

    last = "$"
    if since:
        last = since_id(client, since)
        if entries := client.xrange(ALERTS_STREAM, min=last):
            last = read(entries)
    stop = until_stopped(seconds)
    with Live(alerts_table(shown), console=console, refresh_per_second=2) as view:
        while not stop.is_set():
            for _, entries in client.xread({ALERTS_STREAM: last}, block=WATCH_BLOCK_MS) or []:
                last = read(entries)
            view.update(alerts_table(shown))
