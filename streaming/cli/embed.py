"""`bindstream embed`: media files of any modality through the encoder, without the pipeline. Every file is
read before the model loads, so that one it cannot use fails at once."""

from __future__ import annotations

import click
import numpy as np

from encoders.modalities import MEDIA_MODALITIES

from .options import CHECKPOINT_OPTION, DEVICE_OPTION, DTYPE_OPTION, MODEL_OPTION, load_encoder, model_name
from .terminal import console, table


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--modality",
    type=click.Choice(MEDIA_MODALITIES),
    default=None,
    help="Modality of every file (default: from each file's extension).",
)
@click.option("--text", "texts", multiple=True, help="Also embed this text and print its similarity to each file.")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the (files, D) float32 embeddings to this .npy file.",
)
@MODEL_OPTION
@CHECKPOINT_OPTION
@DEVICE_OPTION
@DTYPE_OPTION
def embed(files, modality, texts, output, model, checkpoint, device, dtype):
    """Embed media files of any modality (images, video, audio, depth/thermal .npy, IMU .csv)."""
    from encoders.transforms import load_file

    loaded = []
    for path in files:
        try:
            loaded.append((path, *load_file(path, modality)))
        except (ValueError, OSError) as err:
            raise click.ClickException(f"{path}: {err}") from None
    enc = load_encoder(model_name(model, checkpoint), checkpoint, device, dtype)
    embeddings = np.stack([enc.embed(m, tensor.unsqueeze(0))[0] for _, m, tensor in loaded])
    text_embeddings = enc.embed_text(list(texts)) if texts else np.zeros((0, enc.embed_dim), np.float32)

    similarity = [f"cos({text!r})" for text in texts]
    out = table(
        f"embeddings ({enc.name}, {enc.dtype} on {enc.device})",
        ("file", "modality", "first values", *similarity),
        right=tuple(similarity),
    )
    for (path, file_modality, _), emb, sims in zip(loaded, embeddings, embeddings @ text_embeddings.T, strict=True):
        out.add_row(path, file_modality, np.array2string(emb[:4], precision=3), *[f"{s:.3f}" for s in sims])
    console.print(out)
    if output:
        np.save(output, embeddings)
        console.print(f"wrote {embeddings.shape} float32 to {output}")
