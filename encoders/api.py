"""`load()` and `Encoder`: a ready model on a device and dtype, batches in, unit-norm float32 vectors out."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .config import PRESETS, resolve_config
from .model import ImageBind
from .weights import find_checkpoint, load_checkpoint, random_model

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INT8 = "int8"  # CPU only: dynamic int8 quantisation of every nn.Linear


def has_random_weights(name: str, checkpoint: str | None = None) -> bool:
    """Whether `load(name, checkpoint)` gives seeded random weights: `tiny` without a checkpoint."""
    return name == "tiny" and checkpoint is None


def random_weights_warning(name: str) -> str:
    return f"model {name!r} has RANDOM weights (fixed seed): its embeddings are reproducible but meaningless"


@dataclass
class Encoder:
    """A loaded model with its device and dtype. `embed` takes one modality's batch and returns (B, D)
    unit-norm float32 numpy embeddings; `outputs` returns the reference's scaled outputs (for parity)."""

    name: str
    model: ImageBind
    device: torch.device
    dtype: str
    random_weights: bool

    @property
    def embed_dim(self) -> int:
        return self.model.cfg.out_embed_dim

    @torch.inference_mode()
    def embed(self, modality: str, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        """A uint8 vision batch is RGB levels (`transforms.image_levels`: how vision windows travel), normalised
        here, on the encoder's device."""
        from .transforms import model_input

        out = self.model.embed(modality, model_input(modality, torch.as_tensor(batch).to(self.device)))  # checks it
        return out.float().cpu().numpy()

    @torch.inference_mode()
    def embed_text(self, texts: list[str]) -> np.ndarray:
        from .transforms import tokenize

        return self.embed("text", tokenize(texts))

    @torch.inference_mode()
    def outputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.model({m: torch.as_tensor(x).to(self.device) for m, x in inputs.items()})


def quantize_int8(model: ImageBind) -> ImageBind:
    """Dynamic int8 quantisation of every nn.Linear (weights int8, activations quantised per batch)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch flags its quantized tensor types as deprecated
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def place(name: str, model: ImageBind, device=None, dtype: str | None = None, random_weights=False) -> Encoder:
    """Move an fp32 model to `device` (default: CUDA if present) in `dtype` (`float32`, `bfloat16`,
    `float16`, or `int8` on CPU; default bf16 on GPU, fp32 on CPU) and wrap it as an Encoder."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if dtype != INT8 and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES) + [INT8]}")
    if dtype == INT8 and device.type != "cpu":
        raise ValueError("int8 runs on the CPU only")
    model = quantize_int8(model) if dtype == INT8 else model.to(device=device, dtype=DTYPES[dtype])
    return Encoder(name=name, model=model.eval(), device=device, dtype=dtype, random_weights=random_weights)


def load(
    name: str = "imagebind_huge",
    checkpoint: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | None = None,
    download: bool = True,
) -> Encoder:
    """Load `imagebind_huge` (official weights from `checkpoint`, `$BINDSTREAM_HOME`, or downloaded) or
    `tiny` (seeded random weights unless `checkpoint` is given), placed as `place` describes."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(PRESETS)}")
    cfg = resolve_config(name)
    random_weights = has_random_weights(name, checkpoint)
    if random_weights:
        log.warning(random_weights_warning(name))
        model = random_model(cfg)
    else:
        model = load_checkpoint(cfg, find_checkpoint(checkpoint, download=download))
    return place(name, model, device, dtype, random_weights)
