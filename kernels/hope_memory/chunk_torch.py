"""Chunked PyTorch path of the HOPE memory op: parallel inside a chunk, a Python loop over chunks.

The chunk loop is sequential because k, v, eta, alpha and the inner gradients of a chunk use the
chunk-start state. Inside a chunk, for one weight W (dout x din) with chunk-start W_c and momentum
S_c, rank-1 gradients G_j = vv_j kk_j^T and the rule
    W_t = alpha_t W_{t-1} + x_t kk_t^T - eta_t S_t,  S_t = gamma_t S_{t-1} + G_t,
(with momentum the op's G is already scaled by 1 - gamma: its momentum is an EMA of the gradients),
    x_t = -delta eta_t W_{t-1} kk_t  (delta = 1 for the weight acting on k, 0 for W1),
unrolling gives, with Lg_t = sum_{s<=t} log alpha_s, P_tj = exp(Lg_t - Lg_j) (j <= t),
Gam_sj = prod_{r=j+1..s} gamma_r, D = P diag(eta) Gam, c_t = sum_{s<=t} P_ts eta_s Gam_s0:
    W_t = exp(Lg_t) W_c - c_t S_c + sum_{j<=t} (P_tj x_j - D_tj vv_j) kk_j^T
    S_t = Gam_t0 S_c + sum_{j<=t} Gam_tj vv_j kk_j^T
and substituting W_{t-1} into x_t gives the unit-lower-triangular (UT / WY) system
    x_t + eta_t sum_{j<t} P_{t-1,j} (kk_j . kk_t) x_j
        = -eta_t (exp(Lg_{t-1}) W_c kk_t - c_{t-1} S_c kk_t - sum_{j<t} D_{t-1,j} (kk_j . kk_t) vv_j),
solved with one triangular solve per chunk. Per-token reads W_t qq_t are then a masked (C x C)
"attention" plus the chunk-start terms. Packed documents are unpacked into a right-padded batch whose
padding tokens are exact no-ops (eta = 0, alpha = 1, gamma = 1, G = 0). Autograd gives the backward.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .naive import heads_first, inner_grad_factors, initial_memory_state, memory_forward, projections, tokens_first
from .types import MemoryParams, MemoryState


class _Decay(NamedTuple):
    """Per-chunk coefficients of the unrolled rule (module docstring); `_prev` rows are shifted by
    one token (row t holds t-1, row 0 the chunk start). Momentum terms are None without momentum."""

    eta: torch.Tensor  # (..., C)
    a: torch.Tensor  # (..., C) exp(Lg_t)
    a_prev: torch.Tensor
    p: torch.Tensor  # (..., C, C)
    p_prev: torch.Tensor
    d: torch.Tensor  # (..., C, C)
    d_prev: torch.Tensor
    c: torch.Tensor | None  # (..., C)
    c_prev: torch.Tensor | None
    gam_last: torch.Tensor | None  # (..., C) Gam_Cj
    gam_total: torch.Tensor | None  # (...,) Gam_C0


def _shift(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Shift by one position along dim (negative), filling the first with 0."""
    pad = [0, 0] * (-dim - 1) + [1, 0]
    return F.pad(x.narrow(dim, 0, x.shape[dim] - 1), pad)


def _segment_products(log_cum: torch.Tensor) -> torch.Tensor:
    """exp(log_cum_t - log_cum_j) for j <= t, exactly 0 above the diagonal."""
    n = log_cum.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=log_cum.device).tril()
    diff = log_cum[..., :, None] - log_cum[..., None, :]
    return torch.where(causal, diff, -torch.inf).exp()


def _decay(eta, alpha, log_gamma) -> _Decay:
    """eta, alpha, log_gamma: (..., C) per token; log_gamma None without momentum. alpha is clamped
    to the dtype's smallest normal number before the log (alpha = 0 would give inf - inf)."""
    log_alpha = alpha.clamp_min(torch.finfo(alpha.dtype).tiny).log()
    lg = log_alpha.cumsum(-1)
    p = _segment_products(lg)
    if log_gamma is None:
        d = p * eta[..., None, :]
        c = gam_last = gam_total = None
    else:
        lgg = log_gamma.cumsum(-1)
        gam = _segment_products(lgg)
        d = p @ (eta[..., :, None] * gam)
        c = (p @ (eta * lgg.exp())[..., None]).squeeze(-1)
        gam_last, gam_total = gam[..., -1, :], lgg[..., -1].exp()
    return _Decay(eta, lg.exp(), (lg - log_alpha).exp(), p, _shift(p, -2), d, _shift(d, -2),
                  c, None if c is None else _shift(c, -1), gam_last, gam_total)


def _update_weight(w, s, kk, vv, dec: _Decay, delta: bool, qq=None):
    """One weight over one chunk. w, s: (..., dout, din) chunk-start weight and momentum (s None
    without momentum); kk (..., C, din), vv (..., C, dout): G_j = vv_j kk_j^T; qq (..., C, din)
    rows to read with W_t. Returns (w_end, s_end, reads or None)."""
    terms = -dec.d[..., -1, :, None] * vv  # coefficient rows of kk_j in W_C
    if delta:
        kk_kk = kk @ kk.mT
        rhs = dec.a_prev[..., None] * (kk @ w.mT) - (dec.d_prev * kk_kk) @ vv
        if s is not None:
            rhs = rhs - dec.c_prev[..., None] * (kk @ s.mT)
        eta = dec.eta[..., None]
        x = torch.linalg.solve_triangular(eta * dec.p_prev * kk_kk, -eta * rhs, upper=False, unitriangular=True)
        terms = terms + dec.p[..., -1, :, None] * x
    w_end = dec.a[..., -1, None, None] * w + terms.mT @ kk
    s_end = None
    if s is not None:
        w_end = w_end - dec.c[..., -1, None, None] * s
        s_end = dec.gam_total[..., None, None] * s + (dec.gam_last[..., :, None] * vv).mT @ kk
    if qq is None:
        return w_end, s_end, None
    qq_kk = qq @ kk.mT
    reads = dec.a[..., None] * (qq @ w.mT) - (dec.d * qq_kk) @ vv
    if delta:
        reads = reads + (dec.p * qq_kk) @ x
    if s is not None:
        reads = reads - dec.c[..., None] * (qq @ s.mT)
    return w_end, s_end, reads


def _update_memories(state: MemoryState, k, vhat, dec: _Decay, grad_scale, q=None):
    """Memories `state` (B, n, H, ., .) over one chunk with keys k and targets vhat; reads M_t(q_t)
    when q is given. grad_scale (broadcastable to (B, 1, H, C, 1)) or None multiplies the inner
    gradients: 0 on padding tokens, 1 - gamma with momentum (the momentum is an EMA of G)."""
    w1, w2, s1, s2 = state
    u, e, h = inner_grad_factors(w1, w2, k, vhat)
    if grad_scale is not None:
        u = u * grad_scale
        e = None if e is None else e * grad_scale
    w2, s2, r2 = _update_weight(w2, s2, k, u, dec, True, q)
    if w1 is None:
        return MemoryState(None, w2, None, s2), r2
    w1, s1, r1 = _update_weight(w1, s1, h, e, dec, False, None if q is None else F.silu(r2))
    return MemoryState(w1, w2, s1, s2), None if q is None else q + r1


def _grad_scale(valid, one_minus_gamma):
    """The inner gradients' per-token factor: valid (B, 1, 1, C) as 0/1 times (1 - gamma) (H, 1, 1)."""
    if valid is None:
        return one_minus_gamma
    return valid[..., None] if one_minus_gamma is None else valid[..., None] * one_minus_gamma


def _select(state: MemoryState, mems: slice) -> MemoryState:
    return MemoryState(*(None if x is None else x[:, mems] for x in state))


def _join(first: MemoryState, second: MemoryState) -> MemoryState:
    return MemoryState(*(None if x is None else torch.cat([x, y], 1) for x, y in zip(first, second)))


def _targets(state: MemoryState, v, selfgen: bool, stopgrad_vhat: bool):
    """vhat = M_c(v) per memory (self-generated, detached if stopgrad_vhat), else v itself."""
    if not selfgen:
        return v
    vhat = memory_forward(state.w1, state.w2, v)
    return vhat.detach() if stopgrad_vhat else vhat


def _chunked_sequences(q, a, k, v, eta, alpha, state: MemoryState, params: MemoryParams, valid,
                       chunk, proj_chunk, eta_max, selfgen, stopgrad_vhat):
    """Sequences in the internal layout (naive.py), each starting at a chunk boundary; valid
    (B, 1, 1, T) marks real tokens (None: all). Returns (o, final state)."""
    selfmod = a is not None
    n_proj = state.w2.shape[1] - 1
    proj, mem_o = _select(state, slice(0, n_proj)), _select(state, slice(n_proj, None))
    log_gamma = one_minus_gamma = None
    if params.gamma is not None:
        log_gamma = F.logsigmoid(params.gamma)[:, None].expand(q.shape[2], q.shape[3])
        one_minus_gamma = torch.sigmoid(-params.gamma)[:, None, None]
        if valid is not None:
            log_gamma = log_gamma * valid
    if valid is not None and not selfmod:
        eta, alpha = torch.where(valid, eta, 0.0), torch.where(valid, alpha, 1.0)
    outs = []
    for p0 in range(0, q.shape[-2], proj_chunk):
        pt = slice(p0, min(p0 + proj_chunk, q.shape[-2]))
        p_valid = None if valid is None else valid[..., pt]
        p_log_gamma = None if log_gamma is None else log_gamma[..., pt]
        if selfmod:
            k_p, v_p, eta_p, alpha_p = projections(proj.w1, proj.w2, a[..., pt, :], params, eta_max)
            if valid is not None:
                eta_p, alpha_p = torch.where(p_valid, eta_p, 0.0), torch.where(p_valid, alpha_p, 1.0)
            vhat = _targets(proj, v_p, selfgen, stopgrad_vhat)
            proj, _ = _update_memories(proj, k_p, vhat, _decay(eta_p, alpha_p, p_log_gamma),
                                       _grad_scale(p_valid, one_minus_gamma))
        else:
            k_p, v_p, eta_p, alpha_p = k[..., pt, :], v[..., pt, :], eta[..., pt], alpha[..., pt]
        for c0 in range(0, pt.stop - p0, chunk):
            ct = slice(c0, min(c0 + chunk, pt.stop - p0))
            vhat = _targets(mem_o, v_p[..., ct, :], selfmod and selfgen, stopgrad_vhat)
            dec = _decay(eta_p[..., ct], alpha_p[..., ct], None if p_log_gamma is None else p_log_gamma[..., ct])
            mem_o, o = _update_memories(mem_o, k_p[..., ct, :], vhat, dec,
                                        _grad_scale(None if p_valid is None else p_valid[..., ct], one_minus_gamma),
                                        q[..., p0 + ct.start:p0 + ct.stop, :])
            outs.append(o)
    return torch.cat(outs, -2), _join(proj, mem_o)


def _unpack(x, idx, valid):
    """(1, T, ...) packed -> (N, T_max, ...) right-padded with zeros."""
    if x is None:
        return None
    out = x[0][idx]
    return torch.where(valid.view(*valid.shape, *([1] * (out.dim() - 2))), out, 0.0)


def chunk_torch_hope_memory(q, params: MemoryParams, *, a=None, k=None, v=None, eta=None, alpha=None,
                            initial_state: MemoryState | None = None, output_final_state: bool = False,
                            cu_seqlens=None, chunk: int = 64, proj_chunk: int = 64,
                            eta_max: float = 1.0, selfgen: bool = True, stopgrad_vhat: bool = True):
    """Chunked path of `kernels.hope_memory.hope_memory` (same arguments, already validated)."""
    valid = None
    if cu_seqlens is not None:
        lens = cu_seqlens[1:] - cu_seqlens[:-1]
        pos = torch.arange(int(lens.max()), device=q.device)
        valid = pos < lens[:, None]
        idx = (cu_seqlens[:-1, None] + pos).clamp_max(q.shape[1] - 1)
        q, a, k, v, eta, alpha = (_unpack(x, idx, valid) for x in (q, a, k, v, eta, alpha))
    state = initial_state if initial_state is not None else initial_memory_state(params, q.shape[0])
    o, state = _chunked_sequences(
        heads_first(q), heads_first(a), heads_first(k), heads_first(v), heads_first(eta),
        heads_first(alpha), state, params, None if valid is None else valid[:, None, None],
        chunk, proj_chunk, eta_max, selfgen, stopgrad_vhat)
    o = tokens_first(o)
    if valid is not None:
        o = o[valid].unsqueeze(0)
    return o, state if output_final_state else None
