"""Command-line options shared by the `bindstream` commands."""

import click

from encoders.config import PRESETS

MODEL_OPTION = click.option(
    "--model", type=click.Choice(sorted(PRESETS)), default=None,
    help="Encoder weights; default: imagebind_huge when its checkpoint is on disk, else tiny (random weights).",
)
CHECKPOINT_OPTION = click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
                                 help="Path of the model's checkpoint file.")
DEVICE_OPTION = click.option("--device", default=None, help="torch device (default: cuda if present, else cpu).")
DTYPE_OPTION = click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16", "int8"]), default=None,
                            help="Weights dtype (default: bfloat16 on GPU, float32 on CPU; int8 is CPU only).")
