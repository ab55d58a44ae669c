"""Our encoders against the reference ImageBind implementation, same weights, same inputs, one run.

The reference is not a dependency of bindstream; install it beside it for this benchmark only, e.g.

    pip download --no-deps -d /tmp/ref imagebind-packaged==0.1.2 && tar xzf /tmp/ref/*.tar.gz -C /tmp/ref
    pip install --target /tmp/refsite --no-deps einops iopath portalocker
    PYTHONPATH=/tmp/refsite:/tmp/ref/imagebind-packaged-0.1.2 python bench/reference_speed.py

Both models get the same random weights (ours are loaded into the reference's state dict, strict), so the
run also checks that the outputs agree at the huge size. Prints seconds per batch and the speed ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import types

import torch
from rich.console import Console
from rich.table import Table

from encoders.bench import example_batch
from encoders.config import resolve_config
from encoders.modalities import MODALITIES
from encoders.weights import random_model


def import_reference_model():
    """The reference's `imagebind_huge` constructor. Only its model code is imported: the package's
    __init__ also loads its media loaders, whose dependencies (pytorchvideo, ...) the model does not need."""
    spec = importlib.util.find_spec("imagebind")
    if spec is None:
        raise SystemExit("the reference implementation is not importable; see this file's docstring")
    package = types.ModuleType("imagebind")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["imagebind"] = package
    from imagebind.models.imagebind_model import imagebind_huge

    return imagebind_huge


def best_seconds(fn, runs: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modalities", default=",".join(MODALITIES))
    args = parser.parse_args()
    imagebind_huge = import_reference_model()

    cfg = resolve_config("imagebind_huge")
    ours = random_model(cfg)
    reference = imagebind_huge(pretrained=False).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)
    table = Table(title=f"imagebind_huge fp32 on CPU ({torch.get_num_threads()} threads), batch {args.batch}")
    for column in ("modality", "reference s", "ours s", "speed-up", "max |diff|"):
        table.add_column(column, justify="left" if column == "modality" else "right")
    with torch.inference_mode():
        for modality in args.modalities.split(","):
            x = example_batch(cfg, modality, args.batch)
            ref_out = reference({modality: x})[modality]
            our_out = ours({modality: x})[modality]
            diff = (ref_out - our_out).abs().max().item()
            t_ref = best_seconds(lambda m=modality, x=x: reference({m: x}), args.runs)
            t_ours = best_seconds(lambda m=modality, x=x: ours({m: x}), args.runs)
            table.add_row(modality, f"{t_ref:.3f}", f"{t_ours:.3f}", f"{t_ref / t_ours:.2f}x", f"{diff:.1e}")
    Console().print(table)


if __name__ == "__main__":
    main()
