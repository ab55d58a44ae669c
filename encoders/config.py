"""Model configuration: one dataclass per trunk, one for the whole model, and the named presets.

`ImageBindConfig.from_reference` takes the constructor arguments of the reference `ImageBindModel`
(the `config` entry of a parity fixture) so that any configuration of the reference can be rebuilt here.
`ImageBindConfig.input_specs()` is the one table of input shapes (timm's `input_size`, per modality): the
model checks its inputs against it, the benchmark draws its batches from it, and the transforms make those
of the default config, whose sizes are the official ImageBind preprocessing's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .modalities import MODALITIES


@dataclass(frozen=True)
class TrunkConfig:
    """One modality's transformer trunk."""

    embed_dim: int
    num_blocks: int
    num_heads: int
    pre_transformer_ln: bool = False  # LayerNorm before the first block (vision only in ImageBind)
    add_bias_kv: bool = True  # one learned extra key/value token per block (audio, depth, thermal, IMU)


@dataclass(frozen=True)
class InputSpec:
    """One modality's input per item (after the batch axis)."""

    shapes: tuple[tuple[int, ...], ...]  # the layouts one forward pass takes; the last is the full one
    clips: bool = False  # also (S, *shapes[-1]): S clips per item, their outputs averaged (the reference's rule)
    token_ids: bool = False  # integer ids (text); every other input is floating point

    def batch_shapes(self) -> list[str]:
        """The accepted batch shapes as text (B = batch, S = clips per item)."""
        dims = [", ".join(map(str, shape)) for shape in self.shapes]
        shapes = [f"(B, {d})" for d in dims] + ([f"(B, S, {dims[-1]})"] if self.clips else [])
        return [f"{shape} integer ids" for shape in shapes] if self.token_ids else shapes


@dataclass(frozen=True)
class ImageBindConfig:
    """Every size and layout the model depends on. Defaults are the reference constructor's defaults."""

    out_embed_dim: int = 768
    vision: TrunkConfig = TrunkConfig(1024, 24, 16, pre_transformer_ln=True, add_bias_kv=False)
    text: TrunkConfig = TrunkConfig(768, 12, 12, add_bias_kv=False)
    audio: TrunkConfig = TrunkConfig(768, 12, 12)
    depth: TrunkConfig = TrunkConfig(384, 12, 8)
    thermal: TrunkConfig = TrunkConfig(768, 12, 12)
    imu: TrunkConfig = TrunkConfig(512, 6, 8)
    # vision: images and videos of `video_frames` frames, patchified by a (time, h, w) kernel
    image_size: int = 224
    video_frames: int = 2
    vision_kernel: tuple[int, int, int] = (2, 14, 14)
    # audio: a (mel_bins x target_len) log-mel spectrogram, overlapping square patches
    audio_kernel: int = 16
    audio_stride: int = 10
    audio_num_mel_bins: int = 128
    audio_target_len: int = 204
    # depth and thermal: one-channel images, non-overlapping square patches
    depth_kernel: int = 16
    thermal_kernel: int = 16
    # IMU: 6 channels x imu_length steps, cut into non-overlapping runs of imu_kernel steps
    imu_channels: int = 6
    imu_length: int = 2000
    imu_kernel: int = 8
    # text: CLIP BPE ids
    context_length: int = 77
    vocab_size: int = 49408
    # fixed output scales after L2 normalisation (text's is learned); values at initialisation
    logit_scale_init: dict[str, float] = field(
        default_factory=lambda: {"text": 1 / 0.07, "audio": 20.0, "depth": 5.0, "thermal": 10.0, "imu": 5.0}
    )

    def trunk(self, modality: str) -> TrunkConfig:
        return getattr(self, modality)

    def input_specs(self) -> dict[str, InputSpec]:
        """Every modality's input: images or `video_frames`-frame videos (with clips), BPE ids, log-mel
        spectrograms (with clips), one-channel depth and thermal images, IMU channels x steps."""
        S = self.image_size
        return {
            "vision": InputSpec(((3, S, S), (3, self.video_frames, S, S)), clips=True),
            "text": InputSpec(((self.context_length,),), token_ids=True),
            "audio": InputSpec(((1, self.audio_num_mel_bins, self.audio_target_len),), clips=True),
            "depth": InputSpec(((1, S, S),)),
            "thermal": InputSpec(((1, S, S),)),
            "imu": InputSpec(((self.imu_channels, self.imu_length),)),
        }

    @classmethod
    def from_reference(cls, kwargs: dict) -> ImageBindConfig:
        """Build from the reference `ImageBindModel(**kwargs)` argument names; unknown names are an error."""
        kwargs = dict(kwargs)
        known = {
            "out_embed_dim",
            "video_frames",
            "kernel_size",
            "audio_kernel_size",
            "audio_stride",
            "audio_num_mel_bins",
            "audio_target_len",
            "depth_kernel_size",
            "thermal_kernel_size",
            "imu_kernel_size",
        }
        trunk_args = {f"{m}_{p}" for m in MODALITIES for p in ("embed_dim", "num_blocks", "num_heads", "drop_path")}
        unknown = set(kwargs) - known - trunk_args
        if unknown:
            raise ValueError(f"unknown ImageBind config keys: {sorted(unknown)}")
        base = cls()
        # keyword arguments of dataclasses.replace (a TrunkConfig per modality field): mypy checks the value
        # type of a **dict against every field of the config, so it is typed as replace's own **changes: Any
        trunks: dict[str, Any] = {}
        for m in MODALITIES:
            default = base.trunk(m)
            trunks[m] = dataclasses.replace(
                default,
                embed_dim=kwargs.get(f"{m}_embed_dim", default.embed_dim),
                num_blocks=kwargs.get(f"{m}_num_blocks", default.num_blocks),
                num_heads=kwargs.get(f"{m}_num_heads", default.num_heads),
            )
            # drop path only matters in training; this implementation is inference-only
        return dataclasses.replace(
            base,
            **trunks,
            out_embed_dim=kwargs.get("out_embed_dim", base.out_embed_dim),
            video_frames=kwargs.get("video_frames", base.video_frames),
            vision_kernel=tuple(kwargs.get("kernel_size", base.vision_kernel)),
            audio_kernel=kwargs.get("audio_kernel_size", base.audio_kernel),
            audio_stride=kwargs.get("audio_stride", base.audio_stride),
            audio_num_mel_bins=kwargs.get("audio_num_mel_bins", base.audio_num_mel_bins),
            audio_target_len=kwargs.get("audio_target_len", base.audio_target_len),
            depth_kernel=kwargs.get("depth_kernel_size", base.depth_kernel),
            thermal_kernel=kwargs.get("thermal_kernel_size", base.thermal_kernel),
            imu_kernel=kwargs.get("imu_kernel_size", base.imu_kernel),
        )


# The one public checkpoint (imagebind_huge.pth): ViT-H vision, a 24-block text encoder, 1024-d joint space.
IMAGEBIND_HUGE = ImageBindConfig.from_reference(
    {
        "vision_embed_dim": 1280,
        "vision_num_blocks": 32,
        "vision_num_heads": 16,
        "text_embed_dim": 1024,
        "text_num_blocks": 24,
        "text_num_heads": 16,
        "out_embed_dim": 1024,
    }
)

# Random weights, for tests and CPU demos: the huge layout shrunk to 64-d, 2 blocks, 4 heads per modality.
TINY = ImageBindConfig.from_reference(
    {"out_embed_dim": 64}
    | {f"{m}_embed_dim": 64 for m in MODALITIES}
    | {f"{m}_num_blocks": 2 for m in MODALITIES}
    | {f"{m}_num_heads": 4 for m in MODALITIES}
)

PRESETS = {"imagebind_huge": IMAGEBIND_HUGE, "tiny": TINY}


def resolve_config(config_or_name: ImageBindConfig | dict | str) -> ImageBindConfig:
    """A preset name, a reference-style dict, or a config, as an `ImageBindConfig`."""
    if isinstance(config_or_name, ImageBindConfig):
        return config_or_name
    if isinstance(config_or_name, str):
        if config_or_name not in PRESETS:
            raise ValueError(f"unknown model {config_or_name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[config_or_name]
    if isinstance(config_or_name, dict):
        return ImageBindConfig.from_reference(config_or_name)
    raise TypeError(f"expected a model name, a config dict or an ImageBindConfig, got {type(config_or_name)}")
