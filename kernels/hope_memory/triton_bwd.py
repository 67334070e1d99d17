"""Backward kernel of one chunk of every memory (the reverse of `chunk_fwd_kernel`).

From the chunk-start state it recomputes the chunk's targets, gradients and WY solve (nothing
per token is saved), takes the gradient of the chunk-end state (and of M_o's read-out) and
returns the gradient of the chunk-start state, of the gradient state (the proj-chunk start for
the projection memories) and of the chunk's k, v, eta, alpha (one part per memory, summed by the
caller) and q. The triangular solve's adjoint is a back substitution with (I + A)^T.
"""
from __future__ import annotations

import triton
import triton.language as tl

from kernels.hope_memory.triton_common import (
    chunk_decay,
    chunk_range,
    ddsilu,
    dsilu,
    load_matrix,
    load_scalars,
    load_tokens,
    masked_exp,
    memory_read_bwd,
    silu,
    store_matrix,
    store_tokens,
)
from kernels.hope_memory.triton_fwd import chunk_targets, load_memory, wy_solve


@triton.jit
def backward_substitution(a, y, BC: tl.constexpr, CHUNK: tl.constexpr):
    """(I + a)^{-T} y for a strictly lower-triangular (BC, BC) a, last row first (rows and
    columns from CHUNK on are padding: a has no entries there)."""
    rows = tl.arange(0, BC)
    x = y
    for j in range(1, CHUNK):
        i = CHUNK - 1 - j
        a_i = tl.sum(tl.where(rows[None, :] == i, a, 0.0), 1)
        x = tl.where(rows[:, None] == i, x - tl.sum(a_i[:, None] * x, 0)[None, :], x)
    return x


@triton.jit
def chunk_bwd_kernel(
    k_ptr, v_ptr, eta_ptr, alpha_ptr, q_ptr, do_ptr,
    w1_ptr, w2_ptr, w1c_ptr, w2c_ptr, dw1_ptr, dw2_ptr, dw1c_ptr, dw2c_ptr,
    dq_ptr, dk_ptr, dv_ptr, deta_ptr, dalpha_ptr, cu_ptr,
    step, N, H, TOKENS,
    CHUNK: tl.constexpr, BC: tl.constexpr, DH: tl.constexpr, DM: tl.constexpr,
    DEPTH: tl.constexpr, N_MEM: tl.constexpr, SELFGEN: tl.constexpr, V_GRAD: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dw1/dw2 (N, N_MEM, H, ...): in, the gradient of the chunk-end state; out, of the
    chunk-start state (M_o's includes its gradient-state part). dw1c/dw2c: the projection
    memories' gradient-state part is added there. dk, dv, deta, dalpha: (N_MEM, tokens, H, ...)
    one part per memory; dq (tokens, H, DH) from M_o."""
    nh = tl.program_id(0)
    m = tl.program_id(1)
    n = nh // H
    h = nh % H
    t0, ntok = chunk_range(cu_ptr, n, step * CHUNK, CHUNK)
    base = ((n * N_MEM + m) * H + h) * (DM * DH)
    is_o = m == N_MEM - 1
    rows = tl.arange(0, BC)
    valid = rows < ntok

    k = load_tokens(k_ptr, t0, ntok, h, H, BC, DH)
    v = load_tokens(v_ptr, t0, ntok, h, H, BC, DH)
    eta = load_scalars(eta_ptr, t0, ntok, h, H, 0.0, BC)
    alpha = load_scalars(alpha_ptr, t0, ntok, h, H, 1.0, BC)
    w1, w2, w1c, w2c = load_memory(w1_ptr, w2_ptr, w1c_ptr, w2c_ptr, base, is_o, DH, DM, DEPTH)
    r, zk, hk, u = chunk_targets(k, v, w1c, w2c, DEPTH, SELFGEN, PRECISION)
    lg, lgp, lg_end = chunk_decay(alpha)
    x, a, kk, kw, e_low = wy_solve(k, u, eta, lg, lgp, w2, BC, CHUNK, PRECISION)
    g_end = tl.exp(lg_end)
    to_end = tl.where(valid, tl.exp(lg_end - lg), 0.0)

    # chunk-end state: W2e = g_end W2 - (X * to_end)^T K, W1e = g_end W1 - (R * eta to_end)^T H
    dw2e = load_matrix(dw2_ptr + base, DM, DH)
    dw2 = g_end * dw2e
    dlg_end = g_end * tl.sum(tl.sum(dw2e * w2, 1), 0)
    kdw = tl.dot(k, tl.trans(dw2e), input_precision=PRECISION)
    dx = -to_end[:, None] * kdw
    dk = -tl.dot(x * to_end[:, None], dw2e, input_precision=PRECISION)
    dto_end = -tl.sum(kdw * x, 1)
    dr = tl.zeros((BC, DH), dtype=tl.float32)
    dhk = tl.zeros((BC, DM), dtype=tl.float32)
    deta = tl.zeros((BC,), dtype=tl.float32)
    dw1 = tl.zeros((DH, DM), dtype=tl.float32)
    if DEPTH == 2:
        dw1e = load_matrix(dw1_ptr + base, DH, DM)
        dw1 = g_end * dw1e
        dlg_end += g_end * tl.sum(tl.sum(dw1e * w1, 1), 0)
        c1 = eta * to_end
        rdw = tl.dot(r, dw1e, input_precision=PRECISION)
        dr = -c1[:, None] * tl.dot(hk, tl.trans(dw1e), input_precision=PRECISION)
        dhk = -c1[:, None] * rdw
        dc1 = -tl.sum(rdw * hk, 1)
        deta = dc1 * to_end
        dto_end += dc1 * eta

    dlg = tl.zeros((BC,), dtype=tl.float32)
    if is_o:
        # Z = G Q W2^T - (QK^T * D) X;  O = Q + G silu(Z) W1^T - (silu(Z) H^T * D * eta) R
        q = load_tokens(q_ptr, t0, ntok, h, H, BC, DH)
        do = load_tokens(do_ptr, t0, ntok, h, H, BC, DH)
        decay = masked_exp(lg[:, None] - lg[None, :], rows[None, :] <= rows[:, None])
        g = tl.exp(lg)
        qw = tl.dot(q, tl.trans(w2), input_precision=PRECISION)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if DEPTH == 2:
            z = g[:, None] * qw - tl.dot(qk * decay, x, input_precision=PRECISION)
            p = silu(z)
            phk = tl.dot(p, tl.trans(hk), input_precision=PRECISION)
            dq = do
            dp = g[:, None] * tl.dot(do, w1, input_precision=PRECISION)
            dw1 += tl.dot(tl.trans(do * g[:, None]), p, input_precision=PRECISION)
            dg = tl.sum(do * tl.dot(p, tl.trans(w1), input_precision=PRECISION), 1)
            dr -= tl.dot(tl.trans(phk * decay * eta[None, :]), do, input_precision=PRECISION)
            dph = -tl.dot(do, tl.trans(r), input_precision=PRECISION)
            e1 = dph * decay * eta[None, :]
            dp += tl.dot(e1, hk, input_precision=PRECISION)
            dhk += tl.dot(tl.trans(e1), p, input_precision=PRECISION)
            ddecay = dph * phk * eta[None, :]
            deta += tl.sum(dph * phk * decay, 0)
            dz = dp * dsilu(z)
        else:
            dq = tl.zeros((BC, DH), dtype=tl.float32)
            dz = do
            dg = tl.zeros((BC,), dtype=tl.float32)
            ddecay = tl.zeros((BC, BC), dtype=tl.float32)
        gdz = dz * g[:, None]
        dq += tl.dot(gdz, w2, input_precision=PRECISION)
        dw2 += tl.dot(tl.trans(gdz), q, input_precision=PRECISION)
        dg += tl.sum(dz * qw, 1)
        dx -= tl.dot(tl.trans(qk * decay), dz, input_precision=PRECISION)
        dm = -tl.dot(dz, tl.trans(x), input_precision=PRECISION)
        dqk = dm * decay
        ddecay += dm * qk
        dq += tl.dot(dqk, k, input_precision=PRECISION)
        dk += tl.dot(tl.trans(dqk), q, input_precision=PRECISION)
        t_ = ddecay * decay
        dlg += tl.sum(t_, 1) - tl.sum(t_, 0) + dg * g
        store_tokens(dq_ptr, dq, t0, ntok, h, H, BC, DH)

    # X = (I + A)^{-1} eta (U + G_prev K W2^T),  A = eta_t e_low K K^T
    drhs = backward_substitution(a, dx, BC, CHUNK)
    da = tl.where(rows[None, :] < rows[:, None], -tl.dot(drhs, tl.trans(x), input_precision=PRECISION), 0.0)
    glp = tl.exp(lgp)
    deta += tl.sum(drhs * (u + glp[:, None] * kw), 1) + tl.sum(da * e_low * kk, 1)
    du = eta[:, None] * drhs
    dkw = (eta * glp)[:, None] * drhs
    dk += tl.dot(dkw, w2, input_precision=PRECISION)
    dw2 += tl.dot(tl.trans(dkw), k, input_precision=PRECISION)
    dkk = da * eta[:, None] * e_low
    dk += tl.dot(dkk + tl.trans(dkk), k, input_precision=PRECISION)
    de = da * a
    dlgp = eta * tl.sum(drhs * kw, 1) * glp + tl.sum(de, 1)
    dlg -= tl.sum(de, 0)
    t_ = dto_end * to_end
    dlg_end += tl.sum(t_, 0)
    dlg -= t_
    # lg = cumsum(log alpha), lgp = lg - log alpha, lg_end = sum(log alpha)
    dla = tl.cumsum(dlg + dlgp, 0, reverse=True) - dlgp + dlg_end
    dalpha = tl.where(alpha > 0, dla / alpha, 0.0)

    # chunk-start targets and gradients: U = (R W1c) * silu'(Zk), R = M_c(K) - vhat
    if DEPTH == 2:
        rw = tl.dot(r, w1c, input_precision=PRECISION)
        durw = du * dsilu(zk)
        dr += tl.dot(durw, tl.trans(w1c), input_precision=PRECISION)
        dw1c = tl.dot(tl.trans(r), durw, input_precision=PRECISION)
        dw1c += tl.dot(tl.trans(dr), hk, input_precision=PRECISION)
        dhk += tl.dot(dr, w1c, input_precision=PRECISION)
        dzk = du * rw * ddsilu(zk) + dhk * dsilu(zk)
        dk += dr
    else:
        dw1c = tl.zeros((DH, DM), dtype=tl.float32)
        dr += du
        dzk = dr
    dk += tl.dot(dzk, w2c, input_precision=PRECISION)
    dw2c = tl.dot(tl.trans(dzk), k, input_precision=PRECISION)
    if SELFGEN:
        if V_GRAD:
            dv, dw1v, dw2v = memory_read_bwd(v, w1c, w2c, -dr, DEPTH, PRECISION)
            dw1c += dw1v
            dw2c += dw2v
        else:
            dv = tl.zeros((BC, DH), dtype=tl.float32)
    else:
        dv = -dr

    if is_o:
        dw1 += dw1c
        dw2 += dw2c
    else:
        store_matrix(dw2c_ptr + base, load_matrix(dw2c_ptr + base, DM, DH) + dw2c, DM, DH)
        if DEPTH == 2:
            store_matrix(dw1c_ptr + base, load_matrix(dw1c_ptr + base, DH, DM) + dw1c, DH, DM)
    store_matrix(dw2_ptr + base, dw2, DM, DH)
    if DEPTH == 2:
        store_matrix(dw1_ptr + base, dw1, DH, DM)
    part = m.to(tl.int64) * TOKENS * H
    store_tokens(dk_ptr + part * DH, dk, t0, ntok, h, H, BC, DH)
    store_tokens(dv_ptr + part * DH, dv, t0, ntok, h, H, BC, DH)
    tl.store(deta_ptr + part + (t0 + rows) * H + h, deta, mask=valid)
    tl.store(dalpha_ptr + part + (t0 + rows) * H + h, dalpha, mask=valid)
