"""Transformer building blocks shared by every modality's trunk (pre-norm ViT blocks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrunkConfig

LN_EPS = 1e-6


class Attention(nn.Module):
    """Multi-head self-attention computed with `scaled_dot_product_attention`.

    The parameters follow `nn.MultiheadAttention`'s checkpoint layout (`in_proj_weight`, `in_proj_bias`,
    `bias_k`, `bias_v`, `out_proj`), so the official weights load unchanged. The packed q/k/v projection
    is held as an `nn.Linear` (`in_proj`) so that Linear-level tools such as dynamic int8 quantisation
    apply to it; two small state-dict hooks translate between its name and the checkpoint's.
    """

    def __init__(self, dim: int, num_heads: int, add_bias_kv: bool):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        if add_bias_kv:
            # one extra key and value, appended to every sequence after projection
            self.bias_k = nn.Parameter(torch.zeros(1, 1, dim))
            self.bias_v = nn.Parameter(torch.zeros(1, 1, dim))
        else:
            self.register_parameter("bias_k", None)
            self.register_parameter("bias_v", None)
        self._register_state_dict_hook(_in_proj_to_checkpoint_names)
        self._register_load_state_dict_pre_hook(_in_proj_from_checkpoint_names)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, D = x.shape
        H = self.num_heads
        q, k, v = self.in_proj(x).chunk(3, dim=-1)  # 3 x (B, L, D)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(B, 1, D)], dim=1)  # (B, L+1, D)
            v = torch.cat([v, self.bias_v.expand(B, 1, D)], dim=1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))  # the extra key is visible to every query
        q = q.view(B, L, H, D // H).transpose(1, 2)  # (B, H, L, hd)
        k = k.view(B, -1, H, D // H).transpose(1, 2)
        v = v.view(B, -1, H, D // H).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, L, hd)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))


def _in_proj_to_checkpoint_names(module, state_dict, prefix, local_metadata):
    for suffix in ("weight", "bias"):
        state_dict[f"{prefix}in_proj_{suffix}"] = state_dict.pop(f"{prefix}in_proj.{suffix}")
    return state_dict


def _in_proj_from_checkpoint_names(state_dict, prefix, *args):
    for suffix in ("weight", "bias"):
        key = f"{prefix}in_proj_{suffix}"
        if key in state_dict:
            state_dict[f"{prefix}in_proj.{suffix}"] = state_dict.pop(key)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, num_heads: int, add_bias_kv: bool, mlp_ratio: int = 4):
        super().__init__()
        self.norm_1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, add_bias_kv)
        self.norm_2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, mlp_ratio * dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), attn_mask)
        return x + self.mlp(self.norm_2(x))


class Trunk(nn.Module):
    """A stack of blocks over (B, L, D) tokens, with ImageBind's optional LayerNorm in front."""

    def __init__(self, cfg: TrunkConfig):
        super().__init__()
        if cfg.pre_transformer_ln:
            # checkpoint key: pre_transformer_layer.0
            self.pre_transformer_layer: nn.Module = nn.Sequential(nn.LayerNorm(cfg.embed_dim, eps=LN_EPS))
        else:
            self.pre_transformer_layer = nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg.embed_dim, cfg.num_heads, cfg.add_bias_kv) for _ in range(cfg.num_blocks))

    def forward(self, tokens: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.pre_transformer_layer(tokens)
        for block in self.blocks:
            x = block(x, attn_mask)
        return x
