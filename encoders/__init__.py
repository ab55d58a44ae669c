"""ImageBind encoders: the model, its preprocessing, and loading weights onto a device.

enc = encoders.load("tiny")                     # or "imagebind_huge"
enc.embed("audio", mel_batch)                   # (B, D) unit-norm float32
model = encoders.build_model(fixture["config"]) # reference-compatible module for parity checks
"""

from .api import Encoder, load
from .config import ImageBindConfig, TrunkConfig, resolve_config
from .modalities import MODALITIES
from .model import ImageBind, build_model

__all__ = [
    "MODALITIES",
    "Encoder",
    "ImageBind",
    "ImageBindConfig",
    "TrunkConfig",
    "build_model",
    "load",
    "resolve_config",
]
