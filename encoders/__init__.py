"""ImageBind encoders: the model, its preprocessing and a loader for weights."""

from .config import MODALITIES, ImageBindConfig, TrunkConfig, resolve_config
from .model import ImageBind, build_model

__all__ = ["MODALITIES", "ImageBind", "ImageBindConfig", "TrunkConfig", "build_model", "resolve_config"]
