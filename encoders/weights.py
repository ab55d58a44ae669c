"""Where weights come from: the official checkpoint (found, downloaded or loaded) or seeded random weights.

The official `imagebind_huge.pth` is loaded memory-mapped and assigned into a model built on the meta
device, so the weights exist once in memory (as file pages) and never as a second copy.
"""

from __future__ import annotations

import logging
import os
import urllib.request
from pathlib import Path

import torch
from torch import nn

from .model import ImageBind, build_model

log = logging.getLogger(__name__)

CHECKPOINT_URL = "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"
CHECKPOINT_FILE = "imagebind_huge.pth"
TINY_SEED = 0
INIT_STD = 0.02
DOWNLOAD_CHUNK = 1 << 20


class CheckpointMissing(FileNotFoundError):
    """The official checkpoint is not on disk and could not be downloaded."""


def bindstream_home() -> Path:
    """`$BINDSTREAM_HOME`, default `~/.cache/bindstream`: where checkpoints are looked up and stored."""
    return Path(os.environ.get("BINDSTREAM_HOME", Path.home() / ".cache" / "bindstream"))


def default_checkpoint_path() -> Path:
    return bindstream_home() / CHECKPOINT_FILE


def default_model_name(model: str | None = None, checkpoint: str | None = None) -> str:
    """The model to use: `model` if given, else imagebind_huge when its checkpoint is available, else tiny."""
    if model:
        return model
    return "imagebind_huge" if checkpoint or default_checkpoint_path().is_file() else "tiny"


def download_checkpoint(dest: Path | None = None, url: str = CHECKPOINT_URL) -> Path:
    """Download the official checkpoint to `dest` with a progress bar, resuming a partial `.part` file.

    The file is complete when its size equals the server's total; only then is it renamed into place.
    """
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    dest = Path(dest or default_checkpoint_path())
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=30)
    except OSError as err:
        raise CheckpointMissing(
            f"could not download {url} ({err}). Download it elsewhere and put it at {dest} "
            f"(or set BINDSTREAM_HOME, or pass --checkpoint FILE)."
        ) from err
    with response:
        if response.status == 206:  # resumed: Content-Range is "bytes start-end/total"
            total = int(response.headers["Content-Range"].rsplit("/", 1)[1])
        else:
            have, total = 0, int(response.headers["Content-Length"])
        with (
            open(part, "ab" if have else "wb") as out,
            Progress(*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn()) as progress,
        ):
            task = progress.add_task(f"downloading {dest.name}", total=total, completed=have)
            while chunk := response.read(DOWNLOAD_CHUNK):
                out.write(chunk)
                progress.advance(task, len(chunk))
    size = part.stat().st_size
    if size != total:
        raise CheckpointMissing(f"download of {url} stopped at {size} of {total} bytes; run again to resume")
    part.rename(dest)
    return dest


def find_checkpoint(checkpoint: str | Path | None = None, download: bool = True) -> Path:
    """The checkpoint path: `checkpoint` if given, else `$BINDSTREAM_HOME/imagebind_huge.pth`, downloaded if
    missing and `download` is set. Raises CheckpointMissing with the place to put the file."""
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise CheckpointMissing(f"checkpoint {path} does not exist")
        return path
    path = default_checkpoint_path()
    if path.is_file():
        return path
    if not download:
        raise CheckpointMissing(f"no checkpoint at {path}; download {CHECKPOINT_URL} and put it there")
    return download_checkpoint(path)


def load_checkpoint(model_config, path: str | Path) -> ImageBind:
    """Build the model on the meta device and assign the memory-mapped checkpoint into it (strict)."""
    state_dict = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    model = build_model(model_config, device="meta")
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


def random_model(model_config, seed: int = TINY_SEED) -> ImageBind:
    """A model with seeded random weights, identical in every process: N(0, 0.02) for weights and
    embeddings, 1 for LayerNorm scales, 0 for biases; buffers (text mask, output scales) as constructed.
    Its embeddings mean nothing: it exists for tests and CPU demos."""
    model = build_model(model_config, device="cpu")
    generator = torch.Generator().manual_seed(seed)
    layer_norms = {id(m.weight) for m in model.modules() if isinstance(m, nn.LayerNorm)}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if id(param) in layer_norms:
                param.fill_(1.0)
            elif name.endswith("bias") and param.ndim == 1:
                param.zero_()
            else:
                param.normal_(0.0, INIT_STD, generator=generator)
    return model.eval()
