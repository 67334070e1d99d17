"""Definitions both PyTorch paths of the HOPE memory op share (docs/model.md section 2).

Each is part of the op's contract, written once so that the per-token reference (naive.py) and the
chunked path (chunk_torch.py) cannot drift apart: the internal token layout, `l2norm`, a memory's
forward map M(z), the self-modifying projections (k, v, eta, alpha from the projection memories)
and the state a sequence starts from. Internal layout: token tensors are (B, 1, H, T, ...) and
states (B, n_mem, H, ., .), so one memory axis broadcasts over all memories.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .types import MemoryParams, MemoryState

L2NORM_EPS = 1e-6


def heads_first(x: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T, H, ...) -> (B, 1, H, T, ...), the internal layout."""
    return None if x is None else x.transpose(1, 2).unsqueeze(1)


def tokens_first(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, T, ...) -> (B, T, H, ...), the public layout."""
    return x.squeeze(1).transpose(1, 2)


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(||x||^2 + 1e-6) over the last axis: smooth at 0, so an all-zero input gives 0."""
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + L2NORM_EPS)


def apply_memory(w1: torch.Tensor | None, w2: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """M(z) = z + W1 silu(W2 z) (depth 2) or W2 z (depth 1, no residual), for rows z (..., T, d_h)."""
    y = z @ w2.mT
    return y if w1 is None else z + F.silu(y) @ w1.mT


def projections(w1, w2, a, params: MemoryParams, eta_max: float):
    """k, v, eta, alpha of the self-modifying mixer from the projection memories (k, v, eta, alpha)
    at their chunk-start state w1/w2 (B, 4, H, ., .); a (B, 1, H, T, d_h).
    Returns k, v (B, 1, H, T, d_h) and eta, alpha (B, 1, H, T)."""
    m = apply_memory(w1, w2, a)
    k, v = l2norm(m[:, 0:1]), l2norm(m[:, 1:2])
    eta = eta_max * torch.sigmoid((m[:, 2:3] * params.eta_w[:, None]).sum(-1) + params.eta_b[:, None])
    alpha = torch.sigmoid((m[:, 3:4] * params.alpha_w[:, None]).sum(-1) + params.alpha_b[:, None])
    return k, v, eta, alpha


def initial_memory_state(params: MemoryParams, batch: int) -> MemoryState:
    """The state a sequence (or document) starts from: the params' weights, zero momenta."""
    w1 = None if params.w1 is None else params.w1.expand(batch, *params.w1.shape)
    w2 = params.w2.expand(batch, *params.w2.shape)
    if params.gamma is None:
        return MemoryState(w1, w2)
    return MemoryState(w1, w2, None if w1 is None else torch.zeros_like(w1), torch.zeros_like(w2))
