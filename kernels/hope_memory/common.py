"""Definitions both PyTorch paths of the HOPE memory op share (docs/model.md section 2).

Each is part of the op's contract, written once so that the per-token reference (naive.py) and the
chunked path (torch_chunked.py) cannot drift apart: the internal token layout, `l2norm`, a memory's
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
    """(B, T, H, ...) -> (B, 1, H, T, ...), the internal layout; a per-memory input
    (B, T, n, H, d) -> (B, n, H, T, d)."""
    if x is None:
        return None
    return x.movedim(1, 3) if x.dim() == 5 else x.transpose(1, 2).unsqueeze(1)


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


def projections(w1, w2, a, params: MemoryParams, eta_max: float, rate_norm: bool = False, given=None):
    """k, v, eta, alpha of the self-modifying mixer from the projection memories (k, v, eta, alpha)
    at their chunk-start state w1/w2 (B, 4, H, ., .); a (B, 1, H, T, d_h), one input for all four,
    or (B, 4, H, T, d_h), one per memory. rate_norm: eta and alpha read M_eta's and M_alpha's outputs
    RMS-normalised (unit scale per element, like titans' read-outs of the normed residual).
    given: (eta, alpha) of these tokens when the caller gives the rates (read out of the input; params
    then has no read-outs), else None.
    Returns k, v (B, 1, H, T, d_h) and eta, alpha (B, 1, H, T)."""
    m = apply_memory(w1, w2, a)
    k, v = l2norm(m[:, 0:1]), l2norm(m[:, 1:2])
    if given is not None:
        return k, v, *given
    m_eta, m_alpha = m[:, 2:3], m[:, 3:4]
    if rate_norm:
        m_eta, m_alpha = (x * torch.rsqrt(x.square().mean(-1, keepdim=True) + L2NORM_EPS) for x in (m_eta, m_alpha))
    eta = eta_max * torch.sigmoid((m_eta * params.eta_w[:, None]).sum(-1) + params.eta_b[:, None])
    alpha = torch.sigmoid((m_alpha * params.alpha_w[:, None]).sum(-1) + params.alpha_b[:, None])
    return k, v, eta, alpha


def proj_rates(eta, alpha, proj_rate: float):
    """eta and alpha of the projection memories (selfmod, `proj_rate`): the rate scaled by proj_rate and
    so is the decay 1 - alpha, so a projection memory moves proj_rate of the way the rule would move it
    (W + r (rule(W) - W)); 0 freezes them at M_0 (static k, v, eta, alpha maps). Padding (eta 0,
    alpha 1) stays a no-op."""
    if proj_rate == 1.0:
        return eta, alpha
    return proj_rate * eta, 1 - proj_rate * (1 - alpha)


def bound_inner_step(w1, y, u, e, h):
    """The inner gradients' rows scaled so that no step overshoots along its own direction (normalised
    LMS): G1 = e h^T by 1 / max(1, |h|^2) (the inner loss is quadratic in W1 with curvature |h|^2) and
    G2 = u k^T by 1 / max(1, |W1 (silu'(y) o u)|^2 / |u|^2) (its curvature along that step, to first
    order; keys are unit). With eta <= 1 a token's write then cannot overshoot, whatever the weights'
    scale. Depth 1 (w1 None): G = (W k - vhat) k^T has curvature |k|^2 = 1 already: unchanged."""
    if w1 is None:
        return u, e
    d = u * silu_grad(y)
    curv2 = (d @ w1.mT).square().sum(-1, keepdim=True) / (d.square().sum(-1, keepdim=True) + L2NORM_EPS)
    curv1 = h.square().sum(-1, keepdim=True)
    return u / curv2.clamp_min(1.0), e / curv1.clamp_min(1.0)


def silu_grad(y: torch.Tensor) -> torch.Tensor:
    """silu'(y) = s (1 + y (1 - s)), s = sigmoid(y)."""
    s = torch.sigmoid(y)
    return s * (1 + y * (1 - s))


def retain_toward(w_new: torch.Tensor, w0: torch.Tensor | None, alpha: torch.Tensor) -> torch.Tensor:
    """With retention toward the initial weights, the decay alpha acts on the deviation W - M_0:
    W_t = (the rule's W_t) + (1 - alpha_t) M_0. w0 None: plain retention (decay toward 0)."""
    return w_new if w0 is None else w_new + (1 - alpha) * w0


def initial_memory_state(params: MemoryParams, batch: int) -> MemoryState:
    """The state a sequence (or document) starts from: the params' weights, zero momenta."""
    w1 = None if params.w1 is None else params.w1.expand(batch, *params.w1.shape)
    w2 = params.w2.expand(batch, *params.w2.shape)
    if params.gamma is None:
        return MemoryState(w1, w2)
    return MemoryState(w1, w2, None if w1 is None else torch.zeros_like(w1), torch.zeros_like(w2))
