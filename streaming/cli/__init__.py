"""The `bindstream` command line: the `main` group (--verbose, --debug; every command's --help shows its
defaults) and its commands, one module per subject: embed, pipeline (run, demo), events (tail, watch), review
(event), alerts (alert, match, notify), search (search, index, timeline), bench, ui (the web console), and the device
commands of sensors/cli.py (`device ...`, and `simulate` and `replay`), which stay with the sensors: sensors/
imports nothing of streaming/."""

from __future__ import annotations

import logging
import signal
import sys

import click

signal.signal(signal.SIGINT, lambda *_: sys.exit(130))  # a Ctrl-C while the commands below load: no traceback

from sensors.cli import main as device_commands  # noqa: E402

from . import alerts, bench, embed, events, pipeline, review, search, ui  # noqa: E402

signal.signal(signal.SIGINT, signal.default_int_handler)


@click.group(context_settings={"show_default": True})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.option("--debug", is_flag=True, help="Show the traceback of an error, not only its one-line message.")
def main(verbose: bool, debug: bool) -> None:
    """bindstream: wearable sensor streams -> ImageBind joint embeddings -> Redis."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


for _command in (
    embed.embed,
    pipeline.run,
    pipeline.demo,
    events.tail,
    events.watch,
    review.event,
    alerts.alert,
    alerts.match,
    alerts.notify_command,
    search.search_command,
    search.index_command,
    search.timeline_command,
    bench.bench,
    ui.ui,
):
    main.add_command(_command)
main.add_command(device_commands, name="device")
main.add_command(device_commands.commands["simulate"], name="simulate")
main.add_command(device_commands.commands["replay"], name="replay")
