"""The `bindstream` command line."""

from __future__ import annotations

import logging

import click
import numpy as np
from rich.console import Console
from rich.table import Table

console = Console()

MODEL_OPTION = click.option(
    "--model", type=click.Choice(["imagebind_huge", "tiny"]), default=None,
    help="Encoder weights; default: imagebind_huge when its checkpoint is on disk, else tiny (random weights).",
)
CHECKPOINT_OPTION = click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
                                 help="Path of the model's checkpoint file.")
DEVICE_OPTION = click.option("--device", default=None, help="torch device (default: cuda if present, else cpu).")
DTYPE_OPTION = click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16", "int8"]), default=None,
                            help="Weights dtype (default: bfloat16 on GPU, float32 on CPU; int8 is CPU only).")


def parse_list(text: str, kind=int) -> tuple:
    return tuple(kind(part) for part in text.split(",") if part.strip())


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """bindstream: wearable sensor streams -> ImageBind joint embeddings -> Redis."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--modality", type=click.Choice(["vision", "audio", "depth", "thermal", "imu"]), default=None,
              help="Modality of every file (default: from each file's extension).")
@click.option("--text", "texts", multiple=True, help="Also embed this text and print its similarity to each file.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write the (files, D) float32 embeddings to this .npy file.")
@MODEL_OPTION
@CHECKPOINT_OPTION
@DEVICE_OPTION
@DTYPE_OPTION
def embed(files, modality, texts, output, model, checkpoint, device, dtype):
    """Embed media files of any modality (images, video, audio, depth/thermal .npy, IMU .csv)."""
    import encoders
    from encoders.transforms import load_file

    enc = encoders.load(default_model(model, checkpoint), checkpoint=checkpoint, device=device, dtype=dtype)
    rows = []
    for path in files:
        file_modality, tensor = load_file(path, modality)
        rows.append((path, file_modality, enc.embed(file_modality, tensor.unsqueeze(0))[0]))
    embeddings = np.stack([emb for _, _, emb in rows])
    text_embeddings = enc.embed_text(list(texts)) if texts else np.zeros((0, enc.embed_dim), np.float32)

    table = Table(title=f"embeddings ({enc.name}, {enc.dtype} on {enc.device})")
    table.add_column("file")
    table.add_column("modality")
    table.add_column("first values")
    for text in texts:
        table.add_column(f"cos({text!r})", justify="right")
    for (path, file_modality, emb), sims in zip(rows, embeddings @ text_embeddings.T if texts else [[]] * len(rows)):
        table.add_row(path, file_modality, np.array2string(emb[:4], precision=3), *[f"{s:.3f}" for s in sims])
    console.print(table)
    if enc.random_weights:
        console.print(f"[bold red]{encoders.api.random_weights_warning(enc.name)}[/]")
    if output:
        np.save(output, embeddings)
        console.print(f"wrote {embeddings.shape} float32 to {output}")


def default_model(model: str | None, checkpoint: str | None) -> str:
    """The model to use: as asked, else imagebind_huge when a checkpoint is available, else tiny."""
    if model:
        return model
    from encoders.weights import default_checkpoint_path

    return "imagebind_huge" if checkpoint or default_checkpoint_path().is_file() else "tiny"


@main.group()
def bench() -> None:
    """Benchmarks that print figures (nothing here asserts a speed)."""


@bench.command("encoders")
@click.option("--model", type=click.Choice(["imagebind_huge", "tiny"]), default="tiny")
@CHECKPOINT_OPTION
@DEVICE_OPTION
@click.option("--dtype", "dtypes", default="float32", help="Comma-separated dtypes, timed side by side.")
@click.option("--batch", "batches", default="1,8,32", help="Comma-separated batch sizes.")
@click.option("--modalities", default="vision,text,audio,depth,thermal,imu")
@click.option("--min-seconds", default=1.0, help="Time each point for at least this long.")
def bench_encoders_command(model, checkpoint, device, dtypes, batches, modalities, min_seconds):
    """Clips per second per modality, batch size and dtype."""
    from encoders.bench import bench_encoders

    dtypes = parse_list(dtypes, str)
    rows = bench_encoders(model, device, dtypes, parse_list(batches), parse_list(modalities, str), checkpoint,
                          min_seconds)
    table = Table(title=f"{model} encoders, clips/s (device {device or 'auto'})")
    table.add_column("modality")
    table.add_column("batch", justify="right")
    for dtype in dtypes:
        table.add_column(dtype, justify="right")
        table.add_column("ms/batch", justify="right")
    if len(dtypes) > 1:
        table.add_column(f"{dtypes[1]} / {dtypes[0]}", justify="right")
    by_point = {(r.modality, r.batch, r.dtype): r for r in rows}
    for modality in parse_list(modalities, str):
        for batch in parse_list(batches):
            cells = []
            for dtype in dtypes:
                r = by_point[modality, batch, dtype]
                cells += [f"{r.clips_per_s:.1f}", f"{1000 * r.seconds_per_batch:.1f}"]
            if len(dtypes) > 1:
                ratio = by_point[modality, batch, dtypes[1]].clips_per_s / by_point[modality, batch, dtypes[0]].clips_per_s
                cells.append(f"{ratio:.2f}x")
            table.add_row(modality, str(batch), *cells)
    console.print(table)
