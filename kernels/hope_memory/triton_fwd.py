"""Forward kernel of one chunk of every memory: the self-generated targets and chunk-start
gradients (u, e, h), the in-chunk gated delta rule for W2 (WY/UT form, solved by forward
substitution in float32) and gated linear update for W1, the chunk-end state and, for M_o, the
inclusive per-token read-out. Parallel over (document x head, memory).

Within a chunk with start state W and cumulative decays G_t = prod_{s<=t} alpha_s:
  x_t = eta_t (W_{t-1} k_t + u_t)   solves   (I + A) X = diag(eta) (U + diag(G_{t-1}) K W^T),
  A[t, s] = eta_t G_{t-1} / G_s k_t.k_s (s < t), and  W2_t = G_t W2 - sum_{s<=t} G_t/G_s x_s k_s^T,
  W1_t = G_t W1 - sum_{s<=t} G_t/G_s eta_s e_s h_s^T.
"""
from __future__ import annotations

import triton
import triton.language as tl

from kernels.hope_memory.triton_common import (
    chunk_decay,
    chunk_range,
    dsilu,
    load_matrix,
    load_scalars,
    load_tokens,
    masked_exp,
    memory_read,
    silu,
    store_matrix,
    store_tokens,
)


@triton.jit
def chunk_targets(k, v, w1c, w2c, DEPTH: tl.constexpr, SELFGEN: tl.constexpr,
                  PRECISION: tl.constexpr):
    """Chunk-start pieces of the inner gradient: e = r = M_c(k) - vhat, h = silu(W2c k) and
    u = (W1c^T r) * silu'(W2c k) (depth 2) or u = r (depth 1). Returns (r, W2c k, h, u)."""
    if SELFGEN:
        vhat = memory_read(v, w1c, w2c, DEPTH, PRECISION)
    else:
        vhat = v
    zk = tl.dot(k, tl.trans(w2c), input_precision=PRECISION)
    if DEPTH == 2:
        hk = silu(zk)
        r = k + tl.dot(hk, tl.trans(w1c), input_precision=PRECISION) - vhat
        u = tl.dot(r, w1c, input_precision=PRECISION) * dsilu(zk)
    else:
        hk = zk
        r = zk - vhat
        u = r
    return r, zk, hk, u


@triton.jit
def forward_substitution(a, rhs, BC: tl.constexpr, CHUNK: tl.constexpr):
    """(I + a)^{-1} rhs for a strictly lower-triangular (BC, BC) a, row by row (rows from
    CHUNK on are padding: a has no entries there)."""
    rows = tl.arange(0, BC)
    x = rhs
    for i in range(1, CHUNK):
        a_i = tl.sum(tl.where(rows[:, None] == i, a, 0.0), 0)
        x = tl.where(rows[:, None] == i, x - tl.sum(a_i[:, None] * x, 0)[None, :], x)
    return x


@triton.jit
def load_memory(w1_ptr, w2_ptr, w1c_ptr, w2c_ptr, base, is_o, DH: tl.constexpr, DM: tl.constexpr,
                DEPTH: tl.constexpr):
    """One memory's chunk-start (w1, w2) and gradient-state (w1c, w2c) weights; M_o's gradient
    state is its own chunk start. w1 stands in for w2 at depth 1."""
    w2 = load_matrix(w2_ptr + base, DM, DH)
    w1 = w2
    if DEPTH == 2:
        w1 = load_matrix(w1_ptr + base, DH, DM)
    if is_o:
        w1c = w1
        w2c = w2
    else:
        w2c = load_matrix(w2c_ptr + base, DM, DH)
        w1c = w2c
        if DEPTH == 2:
            w1c = load_matrix(w1c_ptr + base, DH, DM)
    return w1, w2, w1c, w2c


@triton.jit
def wy_solve(k, u, eta, lg, lgp, w2, BC: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr):
    """X of the module docstring, with the pieces the backward reuses: (X, A, K K^T, K W2^T,
    the strictly-lower decay G_{t-1} / G_s)."""
    rows = tl.arange(0, BC)
    e_low = masked_exp(lgp[:, None] - lg[None, :], rows[None, :] < rows[:, None])
    kk = tl.dot(k, tl.trans(k), input_precision=PRECISION)
    a = eta[:, None] * e_low * kk
    kw = tl.dot(k, tl.trans(w2), input_precision=PRECISION)
    x = forward_substitution(a, eta[:, None] * (u + tl.exp(lgp)[:, None] * kw), BC, CHUNK)
    return x, a, kk, kw, e_low


@triton.jit
def chunk_fwd_kernel(
    k_ptr, v_ptr, eta_ptr, alpha_ptr, q_ptr, o_ptr,
    w1_ptr, w2_ptr, w1c_ptr, w2c_ptr, w1e_ptr, w2e_ptr, cu_ptr,
    step, N, H,
    CHUNK: tl.constexpr, BC: tl.constexpr, DH: tl.constexpr, DM: tl.constexpr,
    DEPTH: tl.constexpr, N_MEM: tl.constexpr, SELFGEN: tl.constexpr, READOUT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """w1/w2: chunk-start state (N, N_MEM, H, ...) float32; w1c/w2c: the state the projection
    memories take their gradients at (their proj-chunk start; M_o, the last memory, always uses
    w1/w2); w1e/w2e: chunk-end state out. o (tokens, H, DH) is written by M_o's programs when READOUT."""
    nh = tl.program_id(0)
    m = tl.program_id(1)
    n = nh // H
    h = nh % H
    t0, ntok = chunk_range(cu_ptr, n, step * CHUNK, CHUNK)
    mat = DM * DH
    base = ((n * N_MEM + m) * H + h) * mat
    is_o = m == N_MEM - 1

    k = load_tokens(k_ptr, t0, ntok, h, H, BC, DH)
    v = load_tokens(v_ptr, t0, ntok, h, H, BC, DH)
    eta = load_scalars(eta_ptr, t0, ntok, h, H, 0.0, BC)
    alpha = load_scalars(alpha_ptr, t0, ntok, h, H, 1.0, BC)
    w1, w2, w1c, w2c = load_memory(w1_ptr, w2_ptr, w1c_ptr, w2c_ptr, base, is_o, DH, DM, DEPTH)
    r, _, hk, u = chunk_targets(k, v, w1c, w2c, DEPTH, SELFGEN, PRECISION)

    rows = tl.arange(0, BC)
    lg, lgp, lg_end = chunk_decay(alpha)
    x, _, _, _, _ = wy_solve(k, u, eta, lg, lgp, w2, BC, CHUNK, PRECISION)

    g_end = tl.exp(lg_end)
    to_end = tl.where(rows < ntok, tl.exp(lg_end - lg), 0.0)
    w2e = g_end * w2 - tl.dot(tl.trans(x * to_end[:, None]), k, input_precision=PRECISION)
    store_matrix(w2e_ptr + base, w2e, DM, DH)
    if DEPTH == 2:
        w1e = g_end * w1 - tl.dot(tl.trans(r * (eta * to_end)[:, None]), hk, input_precision=PRECISION)
        store_matrix(w1e_ptr + base, w1e, DH, DM)

    if READOUT:
        if is_o:
            q = load_tokens(q_ptr, t0, ntok, h, H, BC, DH)
            decay = masked_exp(lg[:, None] - lg[None, :], rows[None, :] <= rows[:, None])
            g = tl.exp(lg)[:, None]
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * decay
            z = g * tl.dot(q, tl.trans(w2), input_precision=PRECISION) - tl.dot(qk, x, input_precision=PRECISION)
            if DEPTH == 2:
                p = silu(z)
                ph = tl.dot(p, tl.trans(hk), input_precision=PRECISION) * decay * eta[None, :]
                o = (q + g * tl.dot(p, tl.trans(w1), input_precision=PRECISION)
                     - tl.dot(ph, r, input_precision=PRECISION))
            else:
                o = z
            store_tokens(o_ptr, o, t0, ntok, h, H, BC, DH)
