"""Encoder throughput benchmark: clips per second per modality, batch size and dtype, side by side."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .api import load, place
from .config import ImageBindConfig, resolve_config
from .modalities import MODALITIES
from .weights import random_model


def example_batch(cfg: ImageBindConfig, modality: str, batch: int, seed: int = 0) -> torch.Tensor:
    """A random, well-formed input batch for `modality`, of its first input shape (images for vision)."""
    g = torch.Generator().manual_seed(seed)
    spec = cfg.input_specs()[modality]
    shape = (batch, *spec.shapes[0])
    if spec.token_ids:
        ids = torch.randint(1, cfg.vocab_size - 1, shape, generator=g)
        ids[:, 20] = cfg.vocab_size - 1  # end-of-text after 20 tokens
        return ids
    return torch.randn(shape, generator=g)


WARMUP_RUNS = 2  # untimed calls before each point is timed ...
WARMUP_SHARE = 0.25  # ... and at least this share of its `min_seconds`


@dataclass
class BenchRow:
    modality: str
    batch: int
    dtype: str
    clips_per_s: float
    seconds_per_batch: float


def time_batch(encoder, modality: str, x: torch.Tensor, min_seconds: float, min_runs: int = 3) -> float:
    """Seconds per call, the best of repeated runs after a warm-up (WARMUP_RUNS calls, and WARMUP_SHARE of
    `min_seconds`: kernels chosen, caches and clocks settled for this shape), so that no point pays for the
    first call of its shape."""
    sync = torch.cuda.synchronize if encoder.device.type == "cuda" else (lambda: None)
    x = x.to(encoder.device)
    warm_until, runs = time.perf_counter() + WARMUP_SHARE * min_seconds, 0
    while runs < WARMUP_RUNS or time.perf_counter() < warm_until:
        encoder.embed(modality, x)
        sync()
        runs += 1
    best, spent, runs = float("inf"), 0.0, 0
    while runs < min_runs or spent < min_seconds:
        start = time.perf_counter()
        encoder.embed(modality, x)
        sync()
        elapsed = time.perf_counter() - start
        best, spent, runs = min(best, elapsed), spent + elapsed, runs + 1
    return best


def bench_encoders(
    model: str = "tiny",
    device: str | None = None,
    dtypes: tuple[str, ...] = ("float32",),
    batches: tuple[int, ...] = (1, 8, 32),
    modalities: tuple[str, ...] = MODALITIES,
    checkpoint: str | None = None,
    min_seconds: float = 1.0,
    on_point: Callable[[int, str, str, int], None] = lambda done, modality, dtype, batch: None,
) -> list[BenchRow]:
    """Time every (modality, batch, dtype); `on_point(points done, modality, dtype, batch)` is called before
    each point. Without a checkpoint the model has seeded random weights: speed does not depend on the
    values, so `imagebind_huge` can be timed without its download."""
    rows: list[BenchRow] = []
    cfg = resolve_config(model)
    base = None if checkpoint else random_model(cfg)
    for i, dtype in enumerate(dtypes):
        encoder = None  # the previous dtype's copy goes before the next is made
        if base is None:
            encoder = load(model, checkpoint=checkpoint, device=device, dtype=dtype)
        else:  # the last dtype takes the random model itself
            encoder = place(
                model, base if i == len(dtypes) - 1 else copy.deepcopy(base), device, dtype, random_weights=True
            )
        for modality in modalities:
            for batch in batches:
                on_point(len(rows), modality, dtype, batch)
                seconds = time_batch(encoder, modality, example_batch(cfg, modality, batch), min_seconds)
                rows.append(BenchRow(modality, batch, dtype, batch / seconds, seconds))
    return rows
