"""Causal softmax attention with RoPE (the `attention` mixer; Transformer++ with one CMS level).

Documents packed in a row never attend to each other (block-diagonal causal mask), matching the
memory mixers' state reset. The carried state is a KV cache, for scoring and generation.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hope_dist.config import ModelConfig
from hope_dist.model.segments import Segments


def apply_rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """x (B, H, T, d_h), pos (T,): rotate channel pairs (i, i + d_h/2)."""
    dh = x.shape[-1]
    dt = torch.promote_types(x.dtype, torch.float32)
    freqs = theta ** (-torch.arange(0, dh // 2, device=x.device, dtype=dt) * 2 / dh)
    angles = pos.to(dt)[:, None] * freqs[None, :]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.to(dt).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class AttentionMixer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.head_dim = cfg.head_dim
        self.theta = cfg.rope_theta
        self.init_std = cfg.init_std
        self.out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.proj = nn.ModuleDict({name: nn.Linear(d, d, bias=False) for name in ("q", "k", "v")})
        self.out = nn.Linear(d, d, bias=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        for lin in self.proj.values():
            nn.init.normal_(lin.weight, std=self.init_std)
        nn.init.normal_(self.out.weight, std=self.out_std)

    def forward(self, x: torch.Tensor, segs: Segments | None = None, state: dict | None = None,
                return_state: bool = False) -> tuple[torch.Tensor, dict | None]:
        B, T, _ = x.shape
        q, k, v = (self.proj[n](x).view(B, T, -1, self.head_dim).transpose(1, 2) for n in "qkv")
        past = state["k"].shape[2] if state is not None else 0
        pos = torch.arange(past, past + T, device=x.device)
        q, k = apply_rope(q, pos, self.theta), apply_rope(k, pos, self.theta)
        if state is not None:
            k = torch.cat([state["k"], k], dim=2)
            v = torch.cat([state["v"], v], dim=2)
        mask = None
        if past or (segs is not None and segs.cu_seqlens is not None):
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            if segs is not None and segs.cu_seqlens is not None:
                if past:
                    raise ValueError("a KV cache cannot be combined with document resets in the batch")
                mask = mask & (segs.seg[:, None, :, None] == segs.seg[:, None, None, :])
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        y = self.out(o.transpose(1, 2).reshape(B, T, -1))
        return y, ({"k": k, "v": v} if return_state else None)
