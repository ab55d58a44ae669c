"""Encoder throughput benchmark: clips per second per modality, batch size and dtype, side by side, each dtype's
embeddings compared with fp32's (least cosine similarity); and the preprocessing of windows, one at a time on
the CPU (the windowing stage) against batched on a device (the embedder: encoders/batch_transforms.py)."""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from . import batch_transforms
from . import transforms as T
from .api import Encoder, load, place
from .config import ImageBindConfig, resolve_config
from .modalities import MODALITIES
from .model import ImageBind
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
COSINE_ITEMS = 4  # inputs per modality that each dtype's embeddings are compared with fp32's on, by default ...
COSINE_SEED = 1  # ... drawn with this seed (the timed batches use 0)


@dataclass
class BenchRow:
    modality: str
    batch: int
    dtype: str
    clips_per_s: float
    seconds_per_batch: float
    cosine: float  # least cosine similarity of this dtype's embeddings to fp32's, over the modality's cosine inputs


def timed(fn: Callable[[], object], sync: Callable[[], None], min_seconds: float, min_runs: int = 3) -> float:
    """Seconds per call of `fn`, the best of repeated runs after a warm-up (WARMUP_RUNS calls, and WARMUP_SHARE
    of `min_seconds`: kernels chosen, caches and clocks settled for this shape), so that no point pays for the
    first call of its shape. `sync` waits for the device."""
    warm_until, runs = time.perf_counter() + WARMUP_SHARE * min_seconds, 0
    while runs < WARMUP_RUNS or time.perf_counter() < warm_until:
        fn()
        sync()
        runs += 1
    best, spent, runs = float("inf"), 0.0, 0
    while runs < min_runs or spent < min_seconds:
        start = time.perf_counter()
        fn()
        sync()
        elapsed = time.perf_counter() - start
        best, spent, runs = min(best, elapsed), spent + elapsed, runs + 1
    return best


def synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def time_batch(encoder, modality: str, x: torch.Tensor, min_seconds: float, min_runs: int = 3) -> float:
    """Seconds per `encoder.embed` call on `x` (see `timed`)."""
    x = x.to(encoder.device)
    return timed(lambda: encoder.embed(modality, x), synchronizer(encoder.device), min_seconds, min_runs)


def least_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The least cosine similarity between matching rows of two (N, D) batches, in float64 (a bf16 model's unit
    vectors are unit only to ~4e-3, which a plain dot product would count)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.min(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def embeddings(encoder: Encoder, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {modality: encoder.embed(modality, x) for modality, x in inputs.items()}


def cosine_to_fp32(
    model: ImageBind, inputs: dict[str, torch.Tensor], dtypes: Sequence[str], device=None
) -> dict[str, dict[str, float]]:
    """{dtype: {modality: least cosine similarity to fp32}} of `model` (fp32 on the CPU, left as it is: each
    dtype runs a copy, placed on `device`) over `inputs`."""
    reference = embeddings(place("fp32", model, "cpu", "float32"), inputs)
    out = {}
    for dtype in dtypes:
        got = embeddings(place("copy", copy.deepcopy(model), device, dtype), inputs)
        out[dtype] = {modality: least_cosine(got[modality], reference[modality]) for modality in inputs}
    return out


def bench_encoders(
    model: str = "tiny",
    device: str | None = None,
    dtypes: tuple[str, ...] = ("float32",),
    batches: tuple[int, ...] = (1, 8, 32),
    modalities: tuple[str, ...] = MODALITIES,
    checkpoint: str | None = None,
    min_seconds: float = 1.0,
    on_point: Callable[[int, str, str, int], None] = lambda done, modality, dtype, batch: None,
    cosine_inputs: dict[str, torch.Tensor] | None = None,
) -> list[BenchRow]:
    """Time every (modality, batch, dtype); `on_point(points done, modality, dtype, batch)` is called before
    each point. Without a checkpoint the model has seeded random weights: speed does not depend on the
    values, so `imagebind_huge` can be timed without its download (its cosines are then those of random
    weights). Each dtype's embeddings of `cosine_inputs` (per modality; default COSINE_ITEMS seeded random
    inputs) are compared with those of the fp32 model on the CPU."""
    rows: list[BenchRow] = []
    cfg = resolve_config(model)
    base = None if checkpoint else random_model(cfg)
    given = cosine_inputs or {}
    inputs = {m: given[m] if m in given else example_batch(cfg, m, COSINE_ITEMS, COSINE_SEED) for m in modalities}
    fp32 = place(model, base, "cpu", "float32") if base else load(model, checkpoint, device="cpu", dtype="float32")
    reference = embeddings(fp32, inputs)
    del fp32
    for i, dtype in enumerate(dtypes):
        encoder = None  # the previous dtype's copy goes before the next is made
        if base is None:
            encoder = load(model, checkpoint=checkpoint, device=device, dtype=dtype)
        else:  # the last dtype takes the random model itself
            encoder = place(
                model, base if i == len(dtypes) - 1 else copy.deepcopy(base), device, dtype, random_weights=True
            )
        got = embeddings(encoder, inputs)
        for modality in modalities:
            cosine = least_cosine(got[modality], reference[modality])
            for batch in batches:
                on_point(len(rows), modality, dtype, batch)
                seconds = time_batch(encoder, modality, example_batch(cfg, modality, batch), min_seconds)
                rows.append(BenchRow(modality, batch, dtype, batch / seconds, seconds, cosine))
    return rows


PREPROCESSED = ("vision", "audio", "depth", "thermal")  # the modalities whose windows may travel as raw media
FRAME_SIZE = (480, 640)  # (h, w) of the camera and depth frames (a wearable's VGA sensors); thermal is 120 x 160
AUDIO_RATE_HZ = 48_000


@dataclass
class PreprocessRow:
    modality: str
    batch: int
    cpu_windows_per_s: float  # one window at a time on the CPU, as the windowing stage preprocesses
    device_windows_per_s: float  # the batch at once on the device, as the embedder preprocesses raw media


def example_stream(modality: str, windows: int, seed: int = 0) -> list:
    """Seeded media of `windows` consecutive windows of one stream: camera JPEG frames (each shared by two
    windows: `windows + 1` in all), 2 s of 48 kHz mono audio, 480 x 640 depth in mm, 120 x 160 thermal in
    centi-kelvin; a smooth scene with a moving disc and sensor noise."""
    rng = np.random.default_rng(seed)
    if modality == "audio":
        t = np.arange(2 * AUDIO_RATE_HZ) / AUDIO_RATE_HZ
        return [
            (0.3 * np.sin(2 * np.pi * (220 + 20 * i) * t) + 0.01 * rng.standard_normal(t.size))[:, None].astype(
                np.float32
            )
            for i in range(windows)
        ]
    h, w = (120, 160) if modality == "thermal" else FRAME_SIZE
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    frames = []
    for i in range(windows + (modality == "vision")):
        disc = (y - 0.4) ** 2 + (x - 0.2 - 0.05 * i) ** 2 < 0.02
        scene = x + y + disc + 0.02 * rng.standard_normal((h, w))  # about 0 .. 3
        if modality == "vision":
            rgb = np.clip(np.stack([scene, 3 - scene, scene * x], axis=-1) * 85, 0, 255).astype(np.uint8)
            frames.append(cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].reshape(-1))
        elif modality == "depth":
            frames.append(np.clip(700 + 1500 * scene, 0, 65535).astype(np.uint16))
        else:
            frames.append((T.KELVIN_AT_0C * 100 + 2000 + 500 * scene).astype(np.uint16))
    return frames


def preprocess_on_cpu(modality: str, stream: list) -> list[torch.Tensor]:
    """The model inputs of `example_stream`'s windows made one window at a time, as the windowing stage and the
    encoder make them (each camera frame decoded and resized once, though two windows sample it)."""
    if modality == "vision":
        images = [T.image_tensor(batch_transforms.opencv_rgb(jpeg)) for jpeg in stream]
        return [torch.stack(images[i : i + 2], dim=1) for i in range(len(stream) - 1)]
    if modality == "audio":
        return [T.audio_tensor(samples.T, AUDIO_RATE_HZ) for samples in stream]
    return [(T.depth_tensor if modality == "depth" else T.thermal_tensor)(frame) for frame in stream]


def raw_media(modality: str, stream: list) -> list[tuple[tuple[np.ndarray, ...], int]]:
    """`example_stream`'s windows as they travel raw (`RawInput`: arrays, rate), for `batch_transforms.preprocess`."""
    if modality == "vision":
        return [((stream[i], stream[i + 1]), 0) for i in range(len(stream) - 1)]
    if modality == "audio":
        return [((samples,), AUDIO_RATE_HZ) for samples in stream]
    return [((batch_transforms.frame_media(modality, frame),), 0) for frame in stream]


def bench_preprocessing(
    device=None,
    batches: tuple[int, ...] = (1, 8, 32),
    modalities: tuple[str, ...] = PREPROCESSED,
    min_seconds: float = 1.0,
) -> list[PreprocessRow]:
    """Windows/s preprocessed from their media: one window at a time on the CPU (`preprocess_on_cpu`) against a
    batch at once on `device` (default: CUDA if present), as the embedder preprocesses raw media
    (encoders/batch_transforms.py). Depth and thermal frames of integers (the example streams') reach the device as
    sent, as the windowing stage ships them, and their conversion per pixel is timed with the batch (since the
    ninth round: earlier figures left it out)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for modality in modalities:
        for batch in batches:
            stream = example_stream(modality, batch)
            media = raw_media(modality, stream)
            cpu_s = timed(functools.partial(preprocess_on_cpu, modality, stream), lambda: None, min_seconds)
            on_device = functools.partial(batch_transforms.preprocess, modality, media, device)
            device_s = timed(on_device, synchronizer(device), min_seconds)
            rows.append(PreprocessRow(modality, batch, batch / cpu_s, batch / device_s))
    return rows
