"""ImageBind: one transformer encoder per modality, all projected into one joint embedding space.

Each modality runs tokenizer -> trunk -> head -> postprocessor. Module and parameter names follow the
official checkpoint (`imagebind_huge.pth`) so that it loads with `strict=True`; where the checkpoint's
names are positions in a sequence ("0", "2"), the children here carry the same names.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .config import ImageBindConfig, resolve_config
from .finite import all_finite
from .layers import LN_EPS, Trunk
from .modalities import MEDIA_MODALITIES, MODALITIES

# --------------------------------------------------------------------------------------------------
# Tokenizers: raw tensors -> (B, L, D) tokens
# --------------------------------------------------------------------------------------------------


class VisionStem(nn.Module):
    """Patchify images (B, 3, H, W) or videos (B, 3, T, H, W) with a (t, h, w) Conv3d -> (B, N, D).

    The reference turns an image into a video by repeating it `video_frames` times. A time slice of the
    kernel over identical frames sums to a 2-D convolution with the kernel's time slices added, so an
    image is patchified once in 2-D and its tokens repeated per time position: no second frame is made.
    """

    def __init__(self, dim: int, kernel: tuple[int, int, int], video_frames: int):
        super().__init__()
        # checkpoint key: proj.1 (proj.0 is the reference's parameter-free image-to-video padding)
        self.proj = nn.ModuleDict({"1": nn.Conv3d(3, dim, kernel, stride=kernel, bias=False)})
        self.time_positions = video_frames // kernel[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = cast(nn.Conv3d, self.proj["1"])  # ModuleDict items are typed as nn.Module
        if x.ndim == 4:
            weight = conv.weight.sum(dim=2)  # (D, 3, kh, kw)
            tokens = F.conv2d(x, weight, stride=conv.stride[1:])  # (B, D, h, w)
            return tokens.flatten(2).transpose(1, 2).repeat(1, self.time_positions, 1)  # (B, T*h*w, D)
        return conv(x).flatten(2).transpose(1, 2)  # (B, T*h*w, D)


class PatchStem(nn.Module):
    """Patchify a one-channel image (B, 1, H, W) with a Conv2d, then LayerNorm -> (B, N, D)."""

    def __init__(self, dim: int, kernel: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(1, dim, kernel, stride=stride, bias=False)
        self.norm_layer = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_layer(self.proj(x).flatten(2).transpose(1, 2))


class PositionalEmbedding(nn.Module):
    def __init__(self, num_tokens: int, dim: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))


class PatchTokenizer(nn.Module):
    """[CLS] + patch tokens, plus a learned position per token (vision, audio, depth, thermal).

    `stem_name` is the stem's name in the checkpoint: `rgbt_stem` for vision, audio and thermal,
    `depth_stem` for depth.
    """

    def __init__(self, stem: nn.Module, stem_name: str, num_patches: int, dim: int):
        super().__init__()
        self.stem_name = stem_name
        self.add_module(stem_name, stem)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding_helper = PositionalEmbedding(1 + num_patches, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = getattr(self, self.stem_name)(x)  # (B, N, D)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.pos_embedding_helper.pos_embed  # (B, 1+N, D)


class ImuStem(nn.Module):
    def __init__(self, in_features: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(in_features, dim, bias=False)
        self.norm_layer = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_layer(self.proj(x))


class ImuTokenizer(nn.Module):
    """(B, C, T) IMU -> [CLS] + one token per run of `kernel` steps (all channels of the run together)."""

    def __init__(self, channels: int, length: int, kernel: int, dim: int):
        super().__init__()
        self.kernel = kernel
        self.imu_stem = ImuStem(channels * kernel, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + length // kernel, dim))

    def forward(self, imu: torch.Tensor) -> torch.Tensor:
        B, C, T = imu.shape
        runs = imu.unfold(-1, self.kernel, self.kernel)  # (B, C, T/k, k)
        runs = runs.permute(0, 2, 1, 3).reshape(B, T // self.kernel, C * self.kernel)  # (B, T/k, C*k)
        tokens = self.imu_stem(runs)
        cls = self.cls_token.expand(B, -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.pos_embed


class TextTokenizer(nn.Module):
    """BPE ids (B, context) -> token + position embeddings; carries the causal mask for the trunk."""

    mask: torch.Tensor  # a buffer: (L, L) additive causal mask

    def __init__(self, vocab_size: int, context_length: int, dim: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, context_length, dim))
        mask = torch.full((context_length, context_length), float("-inf")).triu_(1)  # (L, L) additive
        self.register_buffer("mask", mask)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + self.pos_embed[:, : ids.shape[1]]


# --------------------------------------------------------------------------------------------------
# Heads and postprocessors: tokens -> one vector in the joint space
# --------------------------------------------------------------------------------------------------


class ClsHead(nn.Sequential):
    """LayerNorm of the CLS token, then a linear projection to the joint space.

    Children are named by their position in the checkpoint: "0" the norm, `proj_name` the projection
    ("2" for most modalities, "3" for IMU, whose reference head has a dropout in between).
    """

    def __init__(self, dim: int, out_dim: int, proj_name: str = "2"):
        super().__init__(
            OrderedDict([("0", nn.LayerNorm(dim, eps=LN_EPS)), (proj_name, nn.Linear(dim, out_dim, bias=False))])
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        norm, proj = self.children()
        return proj(norm(tokens[:, 0]))  # (B, out_dim)


class TextHead(nn.Module):
    """The token at the end-of-text position (the largest id), normalised and projected."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(dim, eps=LN_EPS), nn.Linear(dim, out_dim, bias=False))

    def forward(self, tokens: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        return self.proj(tokens[torch.arange(tokens.shape[0], device=tokens.device), eot_index])


class LogitScale(nn.Module):
    """Multiply by exp(log_logit_scale), capped at `max_scale`."""

    log_logit_scale: torch.Tensor  # a buffer

    def __init__(self, scale: float, max_scale: float = 100.0):
        super().__init__()
        self.max_scale = max_scale
        self.register_buffer("log_logit_scale", torch.tensor(math.log(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=self.max_scale) * x


class Postprocessor(nn.Module):
    """L2-normalise, then scale (vision has no scale). Checkpoint key of the scale: "1"."""

    def __init__(self, scale: float | None):
        super().__init__()
        if scale is not None:
            self.add_module("1", LogitScale(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x, dim=-1)
        for scale in self.children():
            x = scale(x)
        return x


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class ImageBind(nn.Module):
    """All six encoders. `model({modality: tensor})` returns `{modality: output}` as the reference does
    (normalised and scaled; clips averaged); `model.embed(modality, tensor)` returns unit-norm vectors."""

    def __init__(self, cfg: ImageBindConfig):
        super().__init__()
        self.cfg = cfg
        self.inputs = cfg.input_specs()
        S, out = cfg.image_size, cfg.out_embed_dim
        kt, kh, kw = cfg.vision_kernel
        D = {m: cfg.trunk(m).embed_dim for m in MODALITIES}

        def patches(size_h, size_w, kernel, stride):
            return ((size_h - kernel) // stride + 1) * ((size_w - kernel) // stride + 1)

        vision_patches = (cfg.video_frames // kt) * (S // kh) * (S // kw)
        audio_patches = patches(cfg.audio_num_mel_bins, cfg.audio_target_len, cfg.audio_kernel, cfg.audio_stride)
        self.modality_preprocessors = nn.ModuleDict(
            {
                "vision": PatchTokenizer(
                    VisionStem(D["vision"], cfg.vision_kernel, cfg.video_frames),
                    "rgbt_stem",
                    vision_patches,
                    D["vision"],
                ),
                "text": TextTokenizer(cfg.vocab_size, cfg.context_length, D["text"]),
                "audio": PatchTokenizer(
                    PatchStem(D["audio"], cfg.audio_kernel, cfg.audio_stride), "rgbt_stem", audio_patches, D["audio"]
                ),
                "depth": PatchTokenizer(
                    PatchStem(D["depth"], cfg.depth_kernel, cfg.depth_kernel),
                    "depth_stem",
                    patches(S, S, cfg.depth_kernel, cfg.depth_kernel),
                    D["depth"],
                ),
                "thermal": PatchTokenizer(
                    PatchStem(D["thermal"], cfg.thermal_kernel, cfg.thermal_kernel),
                    "rgbt_stem",
                    patches(S, S, cfg.thermal_kernel, cfg.thermal_kernel),
                    D["thermal"],
                ),
                "imu": ImuTokenizer(cfg.imu_channels, cfg.imu_length, cfg.imu_kernel, D["imu"]),
            }
        )
        self.modality_trunks = nn.ModuleDict({m: Trunk(cfg.trunk(m)) for m in MODALITIES})
        self.modality_heads = nn.ModuleDict(
            {m: ClsHead(D[m], out) for m in MEDIA_MODALITIES if m != "imu"}
            | {"text": TextHead(D["text"], out), "imu": ClsHead(D["imu"], out, proj_name="3")}
        )
        self.modality_postprocessors = nn.ModuleDict(
            {m: Postprocessor(cfg.logit_scale_init.get(m)) for m in MODALITIES}
        )

    # ----- input checks -----

    def check_input(self, modality: str, x: torch.Tensor) -> None:
        """Raise ValueError naming the modality and the expected shape unless `x` is a valid batch
        (of a shape in `cfg.input_specs()`)."""
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
        spec = self.inputs[modality]
        expected = " or ".join(spec.batch_shapes())
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{modality}: expected a torch.Tensor of shape {expected}, got {type(x).__name__}")
        item = tuple(x.shape[1:])
        clip_item = tuple(x.shape[2:])
        clips_ok = spec.clips and clip_item in spec.shapes and x.ndim == len(spec.shapes[-1]) + 2
        if item not in spec.shapes and not clips_ok:
            raise ValueError(f"{modality}: expected shape {expected}, got {tuple(x.shape)}")
        if x.shape[0] == 0 or (clips_ok and x.shape[1] == 0):
            raise ValueError(f"{modality}: empty batch; expected shape {expected}")
        if spec.token_ids:
            if x.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"{modality}: expected integer token ids of shape {expected}, got dtype {x.dtype}")
            if int(x.min()) < 0 or int(x.max()) >= self.cfg.vocab_size:
                raise ValueError(f"{modality}: token ids must lie in [0, {self.cfg.vocab_size})")
        else:
            if not x.is_floating_point():
                raise ValueError(f"{modality}: expected a floating-point tensor of shape {expected}, got {x.dtype}")
            if not all_finite(x):
                raise ValueError(f"{modality}: input of shape {tuple(x.shape)} contains NaN or Inf")

    # ----- forward -----

    def features(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """Head outputs (N, out_embed_dim) before normalisation, for one batch without a clips axis."""
        if modality == "text":
            # Attention is causal and the head reads the end-of-text token, so the tokens after the last
            # end-of-text of the batch change nothing: drop them (a short caption runs 4 tokens, not 77).
            eot_index = x.argmax(dim=-1)
            length = int(eot_index.max()) + 1
            tokenizer = cast(TextTokenizer, self.modality_preprocessors["text"])  # ModuleDict items are nn.Module
            tokens = tokenizer(x[:, :length])
            mask = tokenizer.mask[:length, :length].to(tokens.dtype)
            return self.modality_heads["text"](self.modality_trunks["text"](tokens, mask), eot_index=eot_index)
        tokens = self.modality_preprocessors[modality](x)
        return self.modality_heads[modality](self.modality_trunks[modality](tokens))

    def encode(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """The reference's output for one modality: normalised, scaled, and averaged over clips if any."""
        self.check_input(modality, x)
        x = x.to(self._dtype_for(modality))
        has_clips = x.ndim == len(self.inputs[modality].shapes[-1]) + 2
        if has_clips:
            B, S = x.shape[:2]
            x = x.flatten(0, 1)
        out = self.modality_postprocessors[modality](self.features(modality, x))
        if has_clips:
            out = out.view(B, S, -1).mean(dim=1)
        return out

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {modality: self.encode(modality, x) for modality, x in inputs.items()}

    def embed(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings (B, out_embed_dim) in the model's dtype."""
        return F.normalize(self.encode(modality, x), dim=-1)

    def _dtype_for(self, modality: str) -> torch.dtype:
        if self.inputs[modality].token_ids:
            return torch.int64
        tokenizer = cast("PatchTokenizer | ImuTokenizer", self.modality_preprocessors[modality])  # not text's
        return tokenizer.cls_token.dtype


def build_model(config_or_name: ImageBindConfig | dict | str, device: torch.device | str | None = None) -> ImageBind:
    """An ImageBind model for a preset name (`imagebind_huge`, `tiny`), a reference-style config dict, or a
    config, in eval mode. Parameters keep PyTorch's default initialisation (on `device="meta"` nothing is
    allocated): load weights next."""
    cfg = resolve_config(config_or_name)
    with torch.device(device or "cpu"):
        return ImageBind(cfg).eval()
