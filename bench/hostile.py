"""Hostile neighbours at full size: each attack of issue 9 against a pipeline with the product's default
bounds, while a legitimate wearable streams beside it at its real pace. Prints one row per attack: the
legitimate device's windows kept, each stage's peak private memory over its level before the attack, and
what the attack was counted as. tests/test_hostile.py runs the same attacks, smaller, and asserts.

    python bench/hostile.py                       # every attack
    python bench/hostile.py --only bombs ids      # some of them
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: the attacks live with the tests

from streaming.connections import raise_file_limit  # noqa: E402
from streaming.pipeline import PipelineConfig, pipeline_session  # noqa: E402
from tests import attacks  # noqa: E402

ATTACKS = {
    "rates": (
        "mic at 44,101 / 191,999 / 8,001 / 96,001 Hz, 8 ch",
        functools.partial(attacks.odd_rate_audio, devices=4),
    ),
    "bombs": ("20 JPEG scan bombs and PNG bombs, 4096 px", functools.partial(attacks.image_bombs, count=20)),
    "padded": (
        "64 px PNGs padded with 8 MB of compressed zeros (17 s each to decode), 10 fps, 6 s",
        functools.partial(attacks.padded_pngs, seconds=6, pad_mb=8000),
    ),
    "costly": (
        "valid 4096 px progressive JPEGs, 30 fps at 5x, 20 s",
        functools.partial(attacks.costly_frames, seconds=20),
    ),
    "omitted": (
        "200,000 header-only omitted depth frames, as fast as they go",
        functools.partial(attacks.omitted_frames, frames=200_000),
    ),
    "imu": ("IMU rows of +-3e38", attacks.huge_imu),
    "forged": ("seq 2^63-1 and clock +2^62 in the victim's name", attacks.forged_seq_and_clock),
    "ids": ("20,000 new device ids, one message each", functools.partial(attacks.device_id_flood, ids=20_000)),
    "connections": (
        "2,000 silent ZeroMQ peers, 500 raw TCP, 20 x 14 MB partial frames, held 40 s",
        functools.partial(attacks.connection_flood, silent=2000, raw=500, partial=20, partial_mb=14, hold_s=40),
    ),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(ATTACKS), help="attacks to run (default: all)")
    parser.add_argument("--seconds", type=float, default=8.0, help="the legitimate device's stream, s (default 8)")
    args = parser.parse_args(argv)
    raise_file_limit(10_000)  # the connection flood's own sockets
    console = Console(width=180)
    table = Table(title="Hostile neighbours (default bounds; memory: peak private MB over the level before)")
    for column in ("attack", "legit windows kept", "ingest", "window", "embed", "publish", "counted as"):
        table.add_column(column, justify="left" if column in ("attack", "counted as") else "right")
    config = PipelineConfig(ingest=["tcp://127.0.0.1:*"], model="tiny", matchers=0)
    with pipeline_session(config) as (pipeline, redis_url, _model):
        for name in args.only or ATTACKS:
            what, attack = ATTACKS[name]
            console.print(f"[bold]{name}[/]: {what} ...")
            outcome = attacks.beside_legit(pipeline, redis_url, name, attack, seconds=args.seconds)
            stage_mb = {
                stage: max((mb for actor, mb in outcome.growth_mb.items() if actor.startswith(stage)), default=0.0)
                for stage in ("ingest", "window", "embed", "publish")
            }
            counted = ", ".join(f"{event} {n:,}" for event, n in outcome.counted.most_common()) or "-"
            table.add_row(
                f"{name}: {what}",
                f"{outcome.expected - outcome.lost} / {outcome.expected}",
                *(f"{mb:+.0f}" for mb in stage_mb.values()),
                counted,
            )
        final = pipeline.drain()
    console.print(table)
    unfinished = [stage for stage, actors in final.items() for a in actors if a.get("unfinished")]
    console.print(f"drain after the attacks: {'clean' if not unfinished else 'unfinished: ' + ', '.join(unfinished)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
