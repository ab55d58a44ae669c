"""Command-line options and table layout shared by the `bindstream` commands."""

import sys

import click
from rich.console import Console
from rich.table import Table

from encoders.config import PRESETS

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DTYPES = ("float32", "bfloat16", "float16", "int8")
PIPE_WIDTH = 200  # columns of output that goes to a pipe or file

MODEL_OPTION = click.option(
    "--model", type=click.Choice(sorted(PRESETS)), default=None,
    help="Encoder weights; default: imagebind_huge when its checkpoint is on disk, else tiny (random weights).",
)
CHECKPOINT_OPTION = click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
                                 help="Path of the model's checkpoint file.")
DEVICE_OPTION = click.option("--device", default=None, help="torch device (default: cuda if present, else cpu).")
DTYPE_OPTION = click.option("--dtype", type=click.Choice(DTYPES), default=None,
                            help="Weights dtype (default: bfloat16 on GPU, float32 on CPU; int8 is CPU only).")
REDIS_OPTION = click.option("--redis", "redis_url", default=DEFAULT_REDIS, show_default=True,
                            envvar="BINDSTREAM_REDIS_URL", show_envvar=True, help="Redis URL.")
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


def wide_console() -> Console:
    """The console commands print to: the terminal's width, or, into a pipe or file, wide enough that
    tables and lines are not folded at 80 columns."""
    return Console(width=None if sys.stdout.isatty() else PIPE_WIDTH)


def table(title: str, columns: tuple[str, ...], right: tuple[str, ...] = (), whole: tuple[str, ...] = ()) -> Table:
    """A table that cuts no cell: the `whole` columns (ids) stay on one line, the others fold to fit the
    console's width; the `right` columns are right-aligned."""
    t = Table(title=title)
    for column in columns:
        t.add_column(column, justify="right" if column in right else "left", no_wrap=column in whole,
                     overflow="fold")
    return t
