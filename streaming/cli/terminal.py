"""What the `bindstream` commands share about the terminal: the one console they print to, tables that cut no
cell and live ones, the time of day of a stream entry, and Ctrl-C / SIGTERM turned into an event to stop on."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from datetime import datetime

from rich.console import Console
from rich.live import Live
from rich.table import Table

from streaming.redis_layout import id_tuple

PIPE_WIDTH = 200  # columns of output that goes to a pipe or file
REFRESH_S = 0.5  # between two draws of a live table

# the terminal's width, or, into a pipe or file, wide enough that tables and lines are not folded at 80 columns
console = Console(width=None if sys.stdout.isatty() else PIPE_WIDTH)


def table(title: str, columns: tuple[str, ...], right: tuple[str, ...] = (), whole: tuple[str, ...] = ()) -> Table:
    """A table that cuts no cell: the `whole` columns (ids) stay on one line, the others fold to fit the
    console's width; the `right` columns are right-aligned."""
    t = Table(title=title)
    for column in columns:
        t.add_column(column, justify="right" if column in right else "left", no_wrap=column in whole, overflow="fold")
    return t


def show_live(render: Callable[[], Table], stop: threading.Event) -> None:
    """Show `render()`, drawn again every REFRESH_S, until `stop` is set."""
    with Live(render(), console=console, refresh_per_second=2) as view:
        while not stop.wait(REFRESH_S):
            view.update(render())


def watch_workers(
    workers: list, on_ray: bool, render: Callable[..., Table], stop: threading.Event, final_title: str
) -> None:
    """Show `render(stats)` of the `workers` (matchers, indexers: in this process, or Ray actors `on_ray`) live
    until `stop` is set; then stop them, show `render(stats, final_title)` of what they return, and kill the actors."""
    import ray

    def call(method: str) -> list[dict]:
        if on_ray:
            return ray.get([getattr(a, method).remote() for a in workers])
        return [getattr(w, method)() for w in workers]

    show_live(lambda: render(call("stats")), stop)
    console.print(render(call("stop"), final_title))
    if on_ray:
        for a in workers:
            ray.kill(a)


def clock_time(entry_id: str) -> str:
    """The local time of day at which the server stored a stream entry."""
    return datetime.fromtimestamp(id_tuple(entry_id)[0] / 1000).strftime("%H:%M:%S")


def stop_on_signals(stop: threading.Event) -> threading.Event:
    """Make SIGINT (Ctrl-C) and SIGTERM set `stop` instead of ending the process (signals reach the main
    thread only: from another, nothing changes); returns `stop`."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    return stop


def until_stopped(seconds: float | None = None) -> threading.Event:
    """An event set by SIGINT/SIGTERM, or after `seconds`."""
    stop = stop_on_signals(threading.Event())
    if seconds is not None:
        timer = threading.Timer(seconds, stop.set)
        timer.daemon = True
        timer.start()
    return stop
