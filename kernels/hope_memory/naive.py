"""Per-token reference of the HOPE memory op (docs/model.md section 2): the contract every faster
path is tested against. A plain loop over tokens, batched only over sequences, memories and heads.

Self-contained except for common.py, which holds the definitions that are themselves part of the
contract and that the chunked path shares (the internal layout, l2norm, a memory's forward map M(z),
the self-modifying projections, the initial state). Everything else, the inner gradient and the
update rule above all, is written out here, token by token. Internal layout: token tensors are
(B, 1, H, T, ...) and states (B, n_mem, H, ., .), so one memory axis broadcasts over all memories.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import (apply_memory, bound_inner_step, heads_first, initial_memory_state, l2norm, proj_rates,
                     projections, retain_toward, silu_grad, tokens_first)
from .types import MemoryParams, MemoryState


def inner_grad_factors(w1, w2, k, vhat):
    """Rank-1 factors of the inner gradient of l = 1/2 ||M(k) - vhat||^2 at (w1, w2), per row:
    grad W2 = u k^T and grad W1 = e h^T. Returns (u, e, h); e and h are None for depth 1."""
    y = k @ w2.mT
    if w1 is None:
        return y - vhat, None, None
    h = F.silu(y)
    e = k + h @ w1.mT - vhat
    return (e @ w1) * silu_grad(y), e, h


def _naive_sequences(q, a, k, v, eta, alpha, state, params, chunk_size, proj_chunk_size, eta_max, proj_rate,
                     rate_norm, selfgen, stopgrad_vhat, w1_delta, w2_delta, retain_init, bound_step):
    """Sequences that all start at a chunk boundary, in the internal layout; returns (o, state)."""
    w1, w2, s1, s2 = state
    w1_0, w2_0 = (params.w1, params.w2) if retain_init else (None, None)
    n_proj = w2.shape[1] - 1
    selfmod = a is not None
    gamma = None if params.gamma is None else torch.sigmoid(params.gamma)[:, None, None]
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    eye_m = None if w1 is None else torch.eye(w1.shape[-1], dtype=q.dtype, device=q.device)
    outs = []
    for t in range(q.shape[-2]):
        if t % proj_chunk_size == 0:  # projection memories' chunk-start snapshot
            c1p = None if w1 is None else w1[:, :n_proj]
            c2p = w2[:, :n_proj]
        if t % chunk_size == 0:  # M_o's chunk-start snapshot
            c1o = None if w1 is None else w1[:, n_proj:]
            c2o = w2[:, n_proj:]
        c1 = None if w1 is None else torch.cat([c1p, c1o], 1)
        c2 = torch.cat([c2p, c2o], 1)
        tok = slice(t, t + 1)
        if selfmod:
            given = None if eta is None else (eta[..., tok], alpha[..., tok])
            k_t, v_t, eta_t, alpha_t = projections(c1p, c2p, a[..., tok, :], params, eta_max, rate_norm, given)
        else:
            k_t, v_t, eta_t, alpha_t = k[..., tok, :], v[..., tok, :], eta[..., tok], alpha[..., tok]
        if selfmod and selfgen:
            vhat = apply_memory(c1, c2, v_t)
            vhat = vhat.detach() if stopgrad_vhat else vhat
        else:
            vhat = v_t
        u, e, h = inner_grad_factors(c1, c2, k_t, vhat)
        if bound_step:
            u, e = bound_inner_step(c1, k_t @ c2.mT, u, e, h)
        eta_t, alpha_t = eta_t[..., None], alpha_t[..., None]  # (B, 1, H, 1, 1)
        if selfmod and proj_rate != 1.0:  # per memory: (B, n_mem, H, 1, 1)
            eta_p, alpha_p = proj_rates(eta_t, alpha_t, proj_rate)
            eta_t = torch.cat([eta_p.expand(-1, n_proj, -1, -1, -1), eta_t], 1)
            alpha_t = torch.cat([alpha_p.expand(-1, n_proj, -1, -1, -1), alpha_t], 1)
        g2 = u.mT @ k_t
        s2 = g2 if gamma is None else gamma * s2 + (1 - gamma) * g2
        if w2_delta:  # the spec's delta gradient descent: the factor (alpha I - eta k k^T) on W2
            w2 = w2 @ (alpha_t * eye - eta_t * k_t.mT @ k_t) - eta_t * s2
        else:  # gradient descent with retention only
            w2 = alpha_t * w2 - eta_t * s2
        w2 = retain_toward(w2, w2_0, alpha_t)
        if w1 is not None:
            g1 = e.mT @ h
            s1 = g1 if gamma is None else gamma * s1 + (1 - gamma) * g1
            if w1_delta:  # the delta rule on W1's own input, the unit hidden activation
                hn = l2norm(h)
                w1 = w1 @ (alpha_t * eye_m - eta_t * hn.mT @ hn) - eta_t * s1
            else:
                w1 = alpha_t * w1 - eta_t * s1
            w1 = retain_toward(w1, w1_0, alpha_t)
        outs.append(apply_memory(None if w1 is None else w1[:, n_proj:], w2[:, n_proj:], q[..., tok, :]))
    if gamma is None:
        s1 = s2 = None
    return torch.cat(outs, -2), MemoryState(w1, w2, s1, s2)


def naive_hope_memory(q, params: MemoryParams, *, a=None, k=None, v=None, eta=None, alpha=None,
                      initial_state: MemoryState | None = None, output_final_state: bool = False,
                      cu_seqlens=None, chunk_size: int = 64, proj_chunk_size: int = 64, eta_max: float = 1.0,
                      proj_rate: float = 1.0, rate_norm: bool = False, selfgen: bool = True, stopgrad_vhat: bool = True,
                      w1_delta: bool = True, w2_delta: bool = True, retain_init: bool = False,
                      bound_step: bool = False):
    """Reference path of `kernels.hope_memory.hope_memory` (same arguments, already validated).
    Packed documents (cu_seqlens) run one by one, each from its own initial state."""
    if cu_seqlens is None:
        bounds, batch = [(0, q.shape[1])], q.shape[0]
    else:
        cu = cu_seqlens.tolist()
        bounds, batch = list(zip(cu[:-1], cu[1:])), 1
    outs, states = [], []
    for i, (start, end) in enumerate(bounds):
        if initial_state is None:
            state = initial_memory_state(params, batch)
        elif cu_seqlens is None:
            state = initial_state
        else:
            state = MemoryState(*(None if s is None else s[i:i + 1] for s in initial_state))
        tok = slice(start, end)
        o, state = _naive_sequences(
            heads_first(q[:, tok]), heads_first(None if a is None else a[:, tok]),
            heads_first(None if k is None else k[:, tok]), heads_first(None if v is None else v[:, tok]),
            heads_first(None if eta is None else eta[:, tok]),
            heads_first(None if alpha is None else alpha[:, tok]),
            state, params, chunk_size, proj_chunk_size, eta_max, proj_rate, rate_norm, selfgen, stopgrad_vhat,
            w1_delta, w2_delta, retain_init, bound_step)
        outs.append(tokens_first(o))
        states.append(state)
    o = torch.cat(outs, 1)
    if not output_final_state:
        return o, None
    return o, MemoryState(*(None if f[0] is None else torch.cat(f, 0) for f in zip(*states)))
