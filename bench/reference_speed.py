"""Our encoders against the reference ImageBind implementation, same weights, same inputs, runs interleaved.

The reference is not a dependency of bindstream; install it beside it for this benchmark only, e.g.

    pip download --no-deps -d /tmp/ref imagebind-packaged==0.1.2 && tar xzf /tmp/ref/*.tar.gz -C /tmp/ref
    pip install --target /tmp/refsite --no-deps einops iopath portalocker
    PYTHONPATH=/tmp/refsite:/tmp/ref/imagebind-packaged-0.1.2 python bench/reference_speed.py

Both models get the same random weights (ours are loaded into the reference's state dict, strict), so the
run also checks that the outputs agree at the huge size. The two are timed run by run in turn (the one that goes
first alternating), so that on a shared machine both meet the same load; prints the median seconds per batch
of each with their spread (fastest-slowest run), and the median of the runs' speed ratios with its spread.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
import types
from collections.abc import Callable

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


def interleaved_seconds(a: Callable[[], object], b: Callable[[], object], runs: int) -> list[tuple[float, float]]:
    """(seconds of `a`, seconds of `b`) per run, after one warm-up call each; in each run both go, `a` first in
    even runs and `b` first in odd ones."""
    a(), b()  # warm-up
    pairs = []
    for run in range(runs):
        seconds = {}
        for name, fn in (("a", a), ("b", b)) if run % 2 == 0 else (("b", b), ("a", a)):
            start = time.perf_counter()
            fn()
            seconds[name] = time.perf_counter() - start
        pairs.append((seconds["a"], seconds["b"]))
    return pairs


def median_and_spread(values: list[float], digits: int) -> str:
    """'median (fastest-slowest)'."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=7, help="Timed runs of each, interleaved.")
    parser.add_argument("--modalities", default=",".join(MODALITIES))
    args = parser.parse_args()
    imagebind_huge = import_reference_model()

    cfg = resolve_config("imagebind_huge")
    ours = random_model(cfg)
    reference = imagebind_huge(pretrained=False).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)
    table = Table(
        title=f"imagebind_huge fp32 on CPU ({torch.get_num_threads()} threads), batch {args.batch}, "
        f"{args.runs} interleaved runs: median (fastest-slowest)"
    )
    for column in ("modality", "reference s", "ours s", "speed-up", "max |diff|"):
        table.add_column(column, justify="left" if column == "modality" else "right")
    with torch.inference_mode():
        for modality in args.modalities.split(","):
            x = example_batch(cfg, modality, args.batch)
            ref_out = reference({modality: x})[modality]
            our_out = ours({modality: x})[modality]
            diff = (ref_out - our_out).abs().max().item()
            pairs = interleaved_seconds(
                lambda m=modality, x=x: reference({m: x}), lambda m=modality, x=x: ours({m: x}), args.runs
            )
            t_ref, t_ours = [t for t, _ in pairs], [t for _, t in pairs]
            ratios = [r / o for r, o in pairs]
            table.add_row(
                modality,
                median_and_spread(t_ref, 3),
                median_and_spread(t_ours, 3),
                median_and_spread(ratios, 2).replace(" (", "x ("),
                f"{diff:.1e}",
            )
    Console().print(table)


if __name__ == "__main__":
    main()
