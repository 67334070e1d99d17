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
from torch.utils.checkpoint import checkpoint

from .common import (L2NORM_EPS, apply_memory, bound_inner_step, heads_first, initial_memory_state, proj_rates,
                     projections, tokens_first)
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


class _SiluGradMul(torch.autograd.Function):
    """g * silu'(y) in one fused kernel (aten.silu_backward), saving only g and y for the backward."""

    @staticmethod
    def forward(ctx, g, y):
        ctx.save_for_backward(g, y)
        return torch.ops.aten.silu_backward(g, y)

    @staticmethod
    def backward(ctx, grad):
        g, y = ctx.saved_tensors
        s = torch.sigmoid(y)
        second = s * (1 - s) * (2 + y * (1 - 2 * s))  # silu''(y)
        return torch.ops.aten.silu_backward(grad, y), grad * g * second


def _inner_grad_factors(w1, w2, k, vhat):
    """naive.inner_grad_factors, also returning y = k W2^T (the delta rule's W_c k, reused)."""
    y = k @ w2.mT
    if w1 is None:
        return y - vhat, None, None, y
    h = F.silu(y)
    e = (h @ w1.mT).add_(k).sub_(vhat)
    return _SiluGradMul.apply(e @ w1, y), e, h, y


class _Solve(NamedTuple):
    """The delta rule's triangular solve for one chunk, shared by every memory of a head (it depends
    only on k, eta, alpha and gamma): x = m_y @ (k W_c^T) - m_u @ vv - m_s @ (k S_c^T), with
    N = (I + diag(eta) strict(P_prev o K K^T))^-1 diag(-eta), m_y = N diag(a_prev),
    m_u = N (D_prev o K K^T), m_s = N diag(c_prev) (None without momentum)."""

    m_y: torch.Tensor  # (..., C, C)
    m_u: torch.Tensor
    m_s: torch.Tensor | None
    m_0: torch.Tensor | None  # N diag(1 - a_prev): retention toward M_0 (its term in W_{t-1} kk_t)


def _solve(k, dec: _Decay, retain_init: bool = False) -> _Solve:
    """One unit-triangular inverse per chunk and head, instead of one solve per memory."""
    kk_kk = k @ k.mT
    eye = torch.eye(k.shape[-2], dtype=k.dtype, device=k.device)
    inv = torch.linalg.solve_triangular(dec.eta[..., None] * dec.p_prev * kk_kk, eye, upper=False,
                                        unitriangular=True)
    n = inv * -dec.eta[..., None, :]
    return _Solve(n * dec.a_prev[..., None, :], n @ (dec.d_prev * kk_kk),
                  None if dec.c_prev is None else n * dec.c_prev[..., None, :],
                  n * (1 - dec.a_prev[..., None, :]) if retain_init else None)


def _update_weight(w, s, kk, vv, dec: _Decay, sol: _Solve | None, w_kk=None, w0=None):
    """One weight over one chunk. w, s: (..., dout, din) chunk-start weight and momentum (s None
    without momentum); kk (..., C, din), vv (..., C, dout): G_j = vv_j kk_j^T; sol: the chunk's
    shared solve for the weight acting on k (delta rule), None for W1; w_kk = kk W^T when the
    caller has it; w0: M_0 with retention toward it (common.retain_toward), else None.
    Returns (w_end, s_end, x), x the delta rule's solution (None without)."""
    terms = -dec.d[..., -1, :, None] * vv  # coefficient rows of kk_j in W_C
    x = None
    if sol is not None:
        x = sol.m_y @ (kk @ w.mT if w_kk is None else w_kk) - sol.m_u @ vv
        if s is not None:
            x = x - sol.m_s @ (kk @ s.mT)
        if w0 is not None:
            x = x + sol.m_0 @ (kk @ w0.mT)
        terms = terms + dec.p[..., -1, :, None] * x
    w_end = dec.a[..., -1, None, None] * w + terms.mT @ kk
    if w0 is not None:
        w_end = w_end + (1 - dec.a[..., -1, None, None]) * w0
    s_end = None
    if s is not None:
        w_end = w_end - dec.c[..., -1, None, None] * s
        s_end = dec.gam_total[..., None, None] * s + (dec.gam_last[..., :, None] * vv).mT @ kk
    return w_end, s_end, x


def _reads(w, s, kk, vv, x, dec: _Decay, qq, w0=None):
    """Per-token reads W_t qq_t over one chunk (rows qq (..., C, din)) of a weight updated by
    _update_weight -> x (None for a weight without the delta rule); w0 as there."""
    qq_kk = qq @ kk.mT
    reads = dec.a[..., None] * (qq @ w.mT) - (dec.d * qq_kk) @ vv
    if w0 is not None:
        reads = reads + (1 - dec.a[..., None]) * (qq @ w0.mT)
    if x is not None:
        reads = reads + (dec.p * qq_kk) @ x
    if s is not None:
        reads = reads - dec.c[..., None] * (qq @ s.mT)
    return reads


def _update_memories(state: MemoryState, k, vhat, dec: _Decay, grad_scale, delta: tuple[bool, bool], q=None,
                     init: MemoryState | None = None, bound_step: bool = False):
    """Memories `state` (B, n, H, ., .) over one chunk with keys k and targets vhat, all n in one
    batched product per step; reads M_t(q_t) of the last memory (M_o) when q is given.
    grad_scale (broadcastable to (B, 1, H, C, 1)) or None multiplies the inner gradients: 0 on
    padding tokens, 1 - gamma with momentum (the momentum is an EMA of G).
    delta: (w1_delta, w2_delta), which weights take the delta rule's factor (hope_memory's flags).
    init: the same memories' M_0 (1, n, H, ., .) with retention toward it, else None.
    bound_step: the inner gradients bounded by their curvature (common.bound_inner_step)."""
    w1, w2, s1, s2 = state
    w1_0, w2_0 = (None, None) if init is None else (init.w1, init.w2)
    last = lambda t: None if t is None else t[:, -1:]
    u, e, h, y = _inner_grad_factors(w1, w2, k, vhat)
    if bound_step:
        u, e = bound_inner_step(w1, y, u, e, h)
    if grad_scale is not None:
        u = u * grad_scale
        e = None if e is None else e * grad_scale
    w1_delta, w2_delta = delta
    sol2 = _solve(k, dec, init is not None) if w2_delta else None
    w2_end, s2_end, x2 = _update_weight(w2, s2, k, u, dec, sol2, y, w2_0)
    r2 = None
    if q is not None:
        r2 = _reads(last(w2), last(s2), k, last(u), last(x2), dec, q, last(w2_0))
    if w1 is None:
        return MemoryState(None, w2_end, None, s2_end), r2
    x1 = None
    if w1_delta:  # G1 = e h^T = (e |h|) hn^T, and the delta rule acts along hn = l2norm(h)
        h_norm = torch.sqrt(h.square().sum(-1, keepdim=True) + L2NORM_EPS)
        h, e = h / h_norm, e * h_norm
        w1_end, s1_end, x1 = _update_weight(w1, s1, h, e, dec, _solve(h, dec, init is not None), None, w1_0)
    else:
        w1_end, s1_end, _ = _update_weight(w1, s1, h, e, dec, None, None, w1_0)
    if q is None:
        return MemoryState(w1_end, w2_end, s1_end, s2_end), None
    r1 = _reads(last(w1), last(s1), last(h), last(e), last(x1), dec, F.silu(r2), last(w1_0))
    return MemoryState(w1_end, w2_end, s1_end, s2_end), q + r1


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
    vhat = apply_memory(state.w1, state.w2, v)
    return vhat.detach() if stopgrad_vhat else vhat


def _pieces(x, size):
    """x split along the token axis (-2 for (..., T, d), -1 for (..., T)) into views of `size`
    tokens: one SplitBackward for the whole loop, where per-chunk slicing would give every chunk's
    gradient a zero-filled copy of the whole input (quadratic in T)."""
    if x is None:
        return None
    return x.split(size, -2 if x.dim() == 5 else -1)


def _chunked_sequences(q, a, k, v, eta, alpha, state: MemoryState, params: MemoryParams, valid,
                       chunk_size, proj_chunk_size, eta_max, proj_rate, rate_norm, selfgen, stopgrad_vhat,
                       delta, retain_init, bound_step):
    """Sequences in the internal layout (common.py), each starting at a chunk boundary; valid
    (B, 1, 1, T) marks real tokens (None: all). Returns (o, final state).

    With chunk == proj_chunk_size (the default), selfmod and proj_rate 1, the five memories share their
    chunk start, rates and decays, so each chunk step updates all five in one batched product per
    matrix (the n_mem axis) and reads M_o from the same step."""
    selfmod = a is not None
    n_proj = state.w2.shape[1] - 1
    init = None
    if retain_init:
        init = MemoryState(None if params.w1 is None else params.w1[None], params.w2[None])
    log_gamma = one_minus_gamma = None
    if params.gamma is not None:
        log_gamma = F.logsigmoid(params.gamma)[:, None]
        one_minus_gamma = torch.sigmoid(-params.gamma)[:, None, None]
    if valid is not None and not selfmod:
        eta, alpha = torch.where(valid, eta, 0.0), torch.where(valid, alpha, 1.0)

    def chunk_log_gamma(c_valid, n):
        """log gamma per token of a chunk (H, n) or (B, 1, H, n): 0 (gamma = 1) on padding."""
        if log_gamma is None:
            return None
        lg = log_gamma.expand(-1, n)
        return lg if c_valid is None else lg * c_valid

    fused = selfmod and chunk_size == proj_chunk_size and proj_rate == 1.0
    q_c = _pieces(q, chunk_size)
    outs = []
    if not selfmod:
        state = _run_o_chunks(state, _pieces(k, chunk_size), _pieces(v, chunk_size), _pieces(eta, chunk_size),
                              _pieces(alpha, chunk_size), _pieces(valid, chunk_size), q_c, False, stopgrad_vhat,
                              one_minus_gamma, chunk_log_gamma, delta, outs, init, bound_step, recompute=True)
        return torch.cat(outs, -2), state

    def proj_step(state, a_p, p_valid, qs, given):
        """One proj-chunk: projections, the projection memories' update and M_o's chunks in it; given:
        the chunk's (eta, alpha) when the caller gives the rates, else None."""
        proj = _select(state, slice(0, n_proj))
        init_p, init_o = (None, None) if init is None else (_select(init, slice(0, n_proj)),
                                                            _select(init, slice(n_proj, None)))
        k_p, v_p, eta_p, alpha_p = projections(proj.w1, proj.w2, a_p, params, eta_max, rate_norm, given)
        if p_valid is not None:
            eta_p, alpha_p = torch.where(p_valid, eta_p, 0.0), torch.where(p_valid, alpha_p, 1.0)
        scale = _grad_scale(p_valid, one_minus_gamma)
        dec = _decay(*proj_rates(eta_p, alpha_p, proj_rate), chunk_log_gamma(p_valid, a_p.shape[-2]))
        if fused:
            state, o = _update_memories(state, k_p, _targets(state, v_p, selfgen, stopgrad_vhat), dec, scale,
                                        delta, qs[0], init, bound_step)
            return state, [o]
        proj, _ = _update_memories(proj, k_p, _targets(proj, v_p, selfgen, stopgrad_vhat), dec, scale, delta,
                                   init=init_p, bound_step=bound_step)
        reads = []
        mem_o = _run_o_chunks(_select(state, slice(n_proj, None)), _pieces(k_p, chunk_size), _pieces(v_p, chunk_size),
                              _pieces(eta_p, chunk_size), _pieces(alpha_p, chunk_size), _pieces(p_valid,
                                                                                                chunk_size), qs,
                              selfgen, stopgrad_vhat, one_minus_gamma, chunk_log_gamma, delta, reads, init_o,
                              bound_step)
        return _join(proj, mem_o), reads

    per = proj_chunk_size // chunk_size
    valid_p, eta_c, alpha_c = (_pieces(x, proj_chunk_size) for x in (valid, eta, alpha))
    for i, a_p in enumerate(_pieces(a, proj_chunk_size)):
        state, reads = _step(proj_step, state, a_p, None if valid is None else valid_p[i],
                             q_c[i * per:(i + 1) * per], None if eta is None else (eta_c[i], alpha_c[i]))
        outs.extend(reads)
    return torch.cat(outs, -2), state


def _run_o_chunks(mem_o, ks, vs, etas, alphas, valids, qs, selfgen, stopgrad_vhat, one_minus_gamma,
                  chunk_log_gamma, delta, outs, init=None, bound_step=False, recompute=False):
    """M_o over consecutive chunks (pieces of k, v, eta, alpha, valid, q); appends the reads to
    outs. init: M_o's M_0 with retention toward it. recompute: each chunk step through _step
    (titans, whose chunk steps are the outer loop)."""
    def o_step(mem_o, k_j, v_j, eta_j, alpha_j, c_valid, q_j):
        vhat = _targets(mem_o, v_j, selfgen, stopgrad_vhat)
        dec = _decay(eta_j, alpha_j, chunk_log_gamma(c_valid, q_j.shape[-2]))
        return _update_memories(mem_o, k_j, vhat, dec, _grad_scale(c_valid, one_minus_gamma), delta, q_j, init,
                                bound_step)

    for j, q_j in enumerate(qs):
        args = (mem_o, ks[j], vs[j], etas[j], alphas[j], None if valids is None else valids[j], q_j)
        mem_o, o = _step(o_step, *args) if recompute else o_step(*args)
        outs.append(o)
    return mem_o


# Autograd keeps ~40 (B, n_mem, H, C, d) temporaries per chunk step (~250 KB per token and layer
# at H = 4, d_h = 64): with RECOMPUTE each chunk step (a proj-chunk for selfmod) saves only its
# inputs, the chunk-start state among them, and runs its forward again inside the backward
# (torch.utils.checkpoint), about 20x less memory for one more forward of the op.
RECOMPUTE = False


def _step(fn, *args):
    if RECOMPUTE and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _unpack(x, idx, valid):
    """(1, T, ...) packed -> (N, T_max, ...) right-padded with zeros."""
    if x is None:
        return None
    out = x[0][idx]
    return torch.where(valid.view(*valid.shape, *([1] * (out.dim() - 2))), out, 0.0)


def torch_chunked_hope_memory(q, params: MemoryParams, *, a=None, k=None, v=None, eta=None, alpha=None,
                            initial_state: MemoryState | None = None, output_final_state: bool = False,
                            cu_seqlens=None, max_seqlen: int | None = None, chunk_size: int = 64,
                            proj_chunk_size: int = 64, eta_max: float = 1.0, proj_rate: float = 1.0,
                            rate_norm: bool = False, selfgen: bool = True,
                            stopgrad_vhat: bool = True, w1_delta: bool = True, w2_delta: bool = True,
                            retain_init: bool = False, bound_step: bool = False):
    """Chunked path of `kernels.hope_memory.hope_memory` (same arguments, already validated;
    max_seqlen, an int bound on the documents' lengths, is required with cu_seqlens). No host
    sync: documents are gathered into a (N, max_seqlen) padded batch and back by index."""
    valid = None
    if cu_seqlens is not None:
        total = q.shape[1]
        lens = cu_seqlens[1:] - cu_seqlens[:-1]
        pos = torch.arange(max_seqlen, device=q.device)
        valid = pos < lens[:, None]
        idx = (cu_seqlens[:-1, None] + pos).clamp_max(total - 1)
        q, a, k, v, eta, alpha = (_unpack(x, idx, valid) for x in (q, a, k, v, eta, alpha))
        token = torch.arange(total, device=q.device, dtype=cu_seqlens.dtype)
        doc = torch.searchsorted(cu_seqlens[1:], token, right=True)
        back = (doc, token - cu_seqlens[doc])  # packed token -> (document, position)
    state = initial_state if initial_state is not None else initial_memory_state(params, q.shape[0])
    o, state = _chunked_sequences(
        heads_first(q), heads_first(a), heads_first(k), heads_first(v), heads_first(eta),
        heads_first(alpha), state, params, None if valid is None else valid[:, None, None],
        chunk_size, proj_chunk_size, eta_max, proj_rate, rate_norm, selfgen, stopgrad_vhat, (w1_delta, w2_delta),
        retain_init, bound_step)
    o = tokens_first(o)
    if valid is not None:
        o = o[back].unsqueeze(0)
    return o, state if output_final_state else None
