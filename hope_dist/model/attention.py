"""Causal softmax attention with RoPE (the `attention` mixer; Transformer++ with one CMS level).

Documents packed in a row never attend to each other (block-diagonal causal mask), matching the
memory mixers' state reset. The carried state is a KV cache, for scoring and generation.

Three kernels compute the same attention (`model.attn_impl`; tests/unit/test_attention_impl.py):
- flash: flash-attn's `flash_attn_varlen_func` over the packed documents' offsets (CUDA, 16-bit; the
  optional extra `pip install -e .[flash]`): no mask is built, each document is its own sequence;
- flex: FlexAttention (compiled) with a causal document mask (CUDA; it has no backward on CPU);
- sdpa: scaled_dot_product_attention, with an explicit (T, T) document mask when rows hold several
  documents (on CUDA that leaves the flash backend for the memory-efficient one).
`auto` takes flash where it can run, else flex on CUDA, else sdpa. A KV cache always uses sdpa.
"""
from __future__ import annotations

import importlib.util
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from hope_dist.config import ConfigError, ModelConfig
from hope_dist.model.plan_types import ParamPlan, projections_plan
from hope_dist.model.segments import Segments

log = logging.getLogger(__name__)
_logged: set[tuple[str, str]] = set()
_compiled_flex = None
_last_block_mask: list = [None, None]  # [(seg, B, T, device), BlockMask]: the layers of a batch share one


def apply_rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """x (B, H, T, d_h), pos (T,): rotate channel pairs (i, i + d_h/2)."""
    dh = x.shape[-1]
    dt = torch.promote_types(x.dtype, torch.float32)
    freqs = theta ** (-torch.arange(0, dh // 2, device=x.device, dtype=dt) * 2 / dh)
    angles = pos.to(dt)[:, None] * freqs[None, :]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.to(dt).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def flash_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_attn_impl(requested: str, device: torch.device, dtype: torch.dtype, training: bool,
                      has_flash: bool | None = None) -> str:
    """The kernel `model.attn_impl=requested` runs on q of this device and dtype (module docstring);
    errors name the key and the fix. training: a backward will follow."""
    has_flash = flash_available() if has_flash is None else has_flash
    cuda, half = device.type == "cuda", dtype in (torch.float16, torch.bfloat16)
    if requested == "auto":
        return "flash" if cuda and half and has_flash else "flex" if cuda else "sdpa"
    if requested == "flash" and not (cuda and half and has_flash):
        why = ("flash-attn is not installed: pip install -e .[flash]" if not has_flash else
               f"it needs CUDA and float16/bfloat16 inputs, got {device.type} {dtype}")
        raise ConfigError(f"model.attn_impl=flash cannot run: {why}; or set model.attn_impl=auto")
    if requested == "flex" and training and not cuda:
        raise ConfigError("model.attn_impl=flex cannot train on CPU (FlexAttention has no CPU backward); "
                          "set model.attn_impl=auto or sdpa")
    return requested


def _log_choice(requested: str, impl: str, device: torch.device) -> None:
    if (impl, device.type) not in _logged:
        _logged.add((impl, device.type))
        log.info("attention kernel: %s (model.attn_impl=%s, %s)", impl, requested, device.type)


def varlen_inputs(x: torch.Tensor, segs: Segments | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """x (B, H, T, d) -> (B T, H, d) packed tokens, int32 document offsets and the longest document, as
    flash_attn_varlen_func takes them; without documents inside rows each row is one sequence."""
    B, H, T, d = x.shape
    packed = x.transpose(1, 2).reshape(B * T, H, d)
    if segs is None or segs.cu_seqlens is None:
        return packed, torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=x.device), T
    return packed, segs.cu_seqlens.to(torch.int32), segs.max_seqlen


def _flash(q, k, v, segs: Segments | None) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    B, H, T, d = q.shape
    (q, cu, max_len), (k, _, _), (v, _, _) = (varlen_inputs(x, segs) for x in (q, k, v))
    o = flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)
    return o.view(B, T, H, d).transpose(1, 2)


def _flex(q, k, v, segs: Segments | None) -> torch.Tensor:
    """FlexAttention with a causal (document) mask; compiled on CUDA, eager elsewhere (forward only)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, _, T, _ = q.shape
    seg = segs.seg if segs is not None and segs.cu_seqlens is not None else None

    def mask(b, h, i, j):
        causal = i >= j
        return causal if seg is None else causal & (seg[b, i] == seg[b, j])

    key = _last_block_mask[0]
    if key is None or key[0] is not seg or key[1:] != (B, T, q.device):
        rows = B if seg is not None else None
        _last_block_mask[:] = [(seg, B, T, q.device), create_block_mask(mask, rows, None, T, T, device=q.device)]
    block_mask = _last_block_mask[1]
    fn = flex_attention
    if q.device.type == "cuda":
        _compiled_flex = _compiled_flex or torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex
    return fn(q, k, v, block_mask=block_mask)


def _sdpa(q, k, v, segs: Segments | None, past: int) -> torch.Tensor:
    T = q.shape[2]
    mask = None
    if past or (segs is not None and segs.cu_seqlens is not None):
        mask = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(past)
        if segs is not None and segs.cu_seqlens is not None:
            if past:
                raise ValueError("a KV cache cannot be combined with document resets in the batch")
            mask = mask & (segs.seg[:, None, :, None] == segs.seg[:, None, None, :])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)


class AttentionMixer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.head_dim = cfg.head_dim
        self.theta = cfg.rope_theta
        self.attn_impl = cfg.attn_impl
        self.init_std = cfg.init_std
        self.out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.proj = nn.ModuleDict({name: nn.Linear(d, d, bias=False) for name in ("q", "k", "v")})
        self.out = nn.Linear(d, d, bias=False)

    def parallel_plan(self) -> dict[str, ParamPlan]:
        """Keys relative to the mixer (hope_dist/model/parallel_plan.py): q, k, v by head, out row-parallel."""
        return projections_plan(self)

    @torch.no_grad()
    def init_weights(self) -> None:
        for lin in self.proj.values():
            nn.init.normal_(lin.weight, std=self.init_std)
        nn.init.normal_(self.out.weight, std=self.out_std)

    def attend(self, q, k, v, segs: Segments | None, past: int) -> torch.Tensor:
        """softmax(q k^T / sqrt(d_h) + causal document mask) v, q (B, H, T, d_h), by model.attn_impl."""
        impl = "sdpa" if past else resolve_attn_impl(self.attn_impl, q.device, q.dtype,
                                                     torch.is_grad_enabled() and q.requires_grad)
        _log_choice(self.attn_impl, impl, q.device)
        if impl == "flash":
            return _flash(q, k, v, segs)
        if impl == "flex":
            return _flex(q, k, v, segs)
        return _sdpa(q, k, v, segs, past)

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
        o = self.attend(q, k, v, segs, past)
        y = self.out(o.transpose(1, 2).reshape(B, T, -1))
        return y, ({"k": k, "v": v} if return_state else None)
