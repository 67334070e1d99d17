"""Backward kernel of one chunk of one memory (the reverse of `chunk_fwd_kernel`).

It reads the chunk's solved rows from the tape that the chunk kernel wrote just before (the
driver relaunches it for this chunk) and, for M_o, the read-out's gradient parts from
`readout_bwd_kernel`; it recomputes the chunk's targets from the chunk-start state, takes the
gradient of the chunk-end state and returns the gradients of the chunk-start state and momenta, of
the gradient state (the proj-chunk start for the projection memories), of the chunk's k, v, eta,
alpha (one part per memory, summed by the caller) and of the momentum logit gamma. The solves and
the read-out live in other kernels because all of it in one needs more shared memory than an H100
block has (docs/triton.md).
"""
from __future__ import annotations

import triton
import triton.language as tl

from kernels.hope_memory.triton_utils import (
    chunk_range,
    ddsilu,
    dsilu,
    load_matrix,
    load_scalars,
    load_tokens,
    memory_read_bwd,
    store_matrix,
    store_tokens,
    tape_slots,
)
from kernels.hope_memory.wy_fast import chunk_coefficients
from kernels.hope_memory.wy_fast_bwd import coefficients_bwd, weight_bwd
from kernels.hope_memory.chunk_fwd_kernel import chunk_targets, gradient_state, load_momentum, w1_keys
from kernels.hope_memory.readout_kernel import read_grad_slots


@triton.jit
def w1_keys_bwd(kk1, r, norm, dkk1, dvv1, DELTA1: tl.constexpr):
    """Gradients (dr, dh) of w1_keys' (kk1, vv1) = (h / |h|, r |h|) (or (h, r) for the gated update)."""
    if DELTA1:
        dr = dvv1 * norm[:, None]
        dh = (dkk1 - kk1 * tl.sum(dkk1 * kk1, 1)[:, None]) / norm[:, None] + tl.sum(dvv1 * r, 1)[:, None] * kk1
        return dr, dh
    return dvv1, dkk1


@triton.jit
def targets_bwd(k, v, w1c, w2c, r, zk, hk, du, dr, dhk, dk, DEPTH: tl.constexpr, SELFGEN: tl.constexpr,
                V_GRAD: tl.constexpr, PRECISION: tl.constexpr):
    """chunk_targets backward: U = (R W1c) * silu'(Zk), R = M_c(K) - vhat, H = silu(Zk). Returns
    (dk, dv, dw1c, dw2c)."""
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
        dw1c = tl.zeros_like(w1c)
        dr += du
        dzk = dr
    dk += tl.dot(dzk, w2c, input_precision=PRECISION)
    dw2c = tl.dot(tl.trans(dzk), k, input_precision=PRECISION)
    if SELFGEN:
        dv = tl.zeros_like(v)
        if V_GRAD:
            dv, dw1v, dw2v = memory_read_bwd(v, w1c, w2c, -dr, DEPTH, PRECISION)
            dw1c += dw1v
            dw2c += dw2v
    else:
        dv = -dr
    return dk, dv, dw1c, dw2c


@triton.jit
def add_matrix(ptr, x, R: tl.constexpr, C: tl.constexpr):
    store_matrix(ptr, load_matrix(ptr, R, C) + x, R, C)


@triton.jit
def store_token_grads(dk_ptr, dv_ptr, deta_ptr, dalpha_ptr, part, dk, dv, deta, dalpha, t0, ntok, h, H,
                      BC: tl.constexpr, DH: tl.constexpr):
    """This memory's part (offset `part`) of the chunk's k, v, eta, alpha gradients."""
    store_tokens(dk_ptr + part * DH, dk, t0, ntok, h, H, BC, DH)
    store_tokens(dv_ptr + part * DH, dv, t0, ntok, h, H, BC, DH)
    rows = tl.arange(0, BC)
    tl.store(deta_ptr + part + (t0 + rows) * H + h, deta, mask=rows < ntok)
    tl.store(dalpha_ptr + part + (t0 + rows) * H + h, dalpha, mask=rows < ntok)


@triton.jit
def read_grads(ptr, row, IS_O: tl.constexpr, BC: tl.constexpr, DH: tl.constexpr, DM: tl.constexpr,
               DEPTH: tl.constexpr, MOM: tl.constexpr):
    """The gradients the chunk's backward starts from: M_o's read-out parts (`readout_bwd_kernel`),
    zeros for a projection memory. Returns (dw1, dw2, ds1, ds2, dk, du, dy2, dkk1, dvv1, dy1, and
    the coefficients' G, P, D, c)."""
    dw1, ds1 = tl.zeros((DH, DM), dtype=tl.float32), tl.zeros((DH, DM), dtype=tl.float32)
    dw2, ds2 = tl.zeros((DM, DH), dtype=tl.float32), tl.zeros((DM, DH), dtype=tl.float32)
    dkk1, du, dy2 = (tl.zeros((BC, DM), dtype=tl.float32), tl.zeros((BC, DM), dtype=tl.float32),
                     tl.zeros((BC, DM), dtype=tl.float32))
    dvv1, dy1, dk = (tl.zeros((BC, DH), dtype=tl.float32), tl.zeros((BC, DH), dtype=tl.float32),
                     tl.zeros((BC, DH), dtype=tl.float32))
    g_p, g_dm = tl.zeros((BC, BC), dtype=tl.float32), tl.zeros((BC, BC), dtype=tl.float32)
    g_eg, g_c = tl.zeros((BC,), dtype=tl.float32), tl.zeros((BC,), dtype=tl.float32)
    if IS_O:
        slot = read_grad_slots(ptr, row, BC, DH, DM)
        dw2 = load_matrix(slot[2], DM, DH)
        du, dy2, dk = load_matrix(slot[5], BC, DM), load_matrix(slot[6], BC, DM), load_matrix(slot[9], BC, DH)
        g_p, g_dm = load_matrix(slot[10], BC, BC), load_matrix(slot[11], BC, BC)
        g_eg, g_c = tl.load(slot[12] + tl.arange(0, BC)), tl.load(slot[13] + tl.arange(0, BC))
        if MOM:
            ds2 = load_matrix(slot[3], DM, DH)
        if DEPTH == 2:
            dw1, dkk1 = load_matrix(slot[0], DH, DM), load_matrix(slot[4], BC, DM)
            dvv1, dy1 = load_matrix(slot[7], BC, DH), load_matrix(slot[8], BC, DH)
            if MOM:
                ds1 = load_matrix(slot[1], DH, DM)
    return dw1, dw2, ds1, ds2, dk, du, dy2, dkk1, dvv1, dy1, g_eg, g_p, g_dm, g_c


@triton.jit
def end_grads(dw_ptr, ds_ptr, R: tl.constexpr, C: tl.constexpr, MOM: tl.constexpr):
    """Gradient of a weight's chunk-end value and momentum (zeros without momentum)."""
    ds = tl.zeros((R, C), dtype=tl.float32)
    if MOM:
        ds = load_matrix(ds_ptr, R, C)
    return load_matrix(dw_ptr, R, C), ds


@triton.jit
def gamma_grad(dgamma_ptr, gamma_ptr, h, dlgam, domg, valid):
    """Adds the momentum logit's gradient, through log gamma per token and 1 - gamma, at dgamma_ptr."""
    gam = tl.sigmoid(tl.load(gamma_ptr + h).to(tl.float32))
    dgam = tl.sum(tl.where(valid, dlgam, 0.0), 0) * (1.0 - gam) - domg * gam * (1.0 - gam)
    tl.store(dgamma_ptr, tl.load(dgamma_ptr) + dgam)


@triton.jit
def chunk_bwd_kernel(
    k_ptr, v_ptr, eta_ptr, alpha_ptr, gamma_ptr,
    w1_ptr, w2_ptr, s1_ptr, s2_ptr, w1c_ptr, w2c_ptr, dw1_ptr, dw2_ptr, ds1_ptr, ds2_ptr, dw1c_ptr, dw2c_ptr,
    dk_ptr, dv_ptr, deta_ptr, dalpha_ptr, dgamma_ptr, tape_ptr, rgrad_ptr, cu_ptr,
    step, N, H, TOKENS, M0,
    CHUNK: tl.constexpr, BC: tl.constexpr, DH: tl.constexpr, DM: tl.constexpr,
    DEPTH: tl.constexpr, N_MEM: tl.constexpr, SELFGEN: tl.constexpr, V_GRAD: tl.constexpr,
    IS_O: tl.constexpr, DELTA1: tl.constexpr, MOM: tl.constexpr, PRECISION: tl.constexpr,
):
    """Memory M0 + program_id(1). dw1/dw2/ds1/ds2 (N, N_MEM, H, ...): in, the gradient of the
    chunk-end state; out, of the chunk-start state (M_o's includes its gradient-state part).
    dw1c/dw2c: the projection memories' gradient-state part is added there. dk, dv, deta, dalpha:
    (N_MEM, tokens, H, ...) one part per memory; dgamma (N, N_MEM, H) accumulates the momentum
    logit's gradient. tape: the chunk kernel's rows, as it wrote them; rgrad (IS_O): row n * H + h
    of the read-out's gradient parts."""
    nh = tl.program_id(0)
    m = M0 + tl.program_id(1)
    n = nh // H
    h = nh % H
    t0, ntok = chunk_range(cu_ptr, n, step * CHUNK, CHUNK)
    base = ((n * N_MEM + m) * H + h) * (DM * DH)
    tape = tape_slots(tape_ptr, tl.program_id(1) * N * H + nh, BC, DH, DM)

    k = load_tokens(k_ptr, t0, ntok, h, H, BC, DH)
    eta = load_scalars(eta_ptr, t0, ntok, h, H, 0.0, BC)
    alpha = load_scalars(alpha_ptr, t0, ntok, h, H, 1.0, BC)
    s1, s2, lgam, omg = load_momentum(s1_ptr, s2_ptr, gamma_ptr, base, h, ntok, BC, DH, DM, DEPTH, MOM)
    _, egp, _, pp, _, dmp, _, cp, to_end, d_end, g_end, c_end, gs_end, gam_end = chunk_coefficients(
        alpha, lgam, eta, BC, MOM, PRECISION)
    dw1, dw2, ds1, ds2, dk, du, dy2, dkk1, dvv1, dy1, g_eg, g_p, g_dm, g_c = read_grads(
        rgrad_ptr, nh, IS_O, BC, DH, DM, DEPTH, MOM)

    w2 = load_matrix(w2_ptr + base, DM, DH)
    dw_end, ds_end = end_grads(dw2_ptr + base, ds2_ptr + base, DM, DH, MOM)
    dw, ds, dkk, dvv, g_eta, g_egp, g_pp, g_dmp, g_cp, g_to_end, g_d_end, g_g_end, g_c_end, g_gs_end, g_gam_end = \
        weight_bwd(w2, s2, k, load_matrix(tape[0], BC, DM), load_matrix(tape[1], BC, DM), dy2, eta, egp, pp, dmp,
                   cp, to_end, d_end, g_end, c_end, gs_end, gam_end, dw_end, ds_end, BC, CHUNK, True, MOM, PRECISION)
    dw2 += dw
    ds2 += ds
    dk += dkk
    du += dvv
    w1 = w2
    if DEPTH == 2:
        w1 = load_matrix(w1_ptr + base, DH, DM)
        dw_end, ds_end = end_grads(dw1_ptr + base, ds1_ptr + base, DH, DM, MOM)
        dw, ds, dkk, dvv, e_eta, e_egp, e_pp, e_dmp, e_cp, e_to_end, e_d_end, e_g_end, e_c_end, e_gs_end, \
            e_gam_end = weight_bwd(w1, s1, load_matrix(tape[2], BC, DM), load_matrix(tape[3], BC, DH),
                                   load_matrix(tape[4], BC, DH), dy1, eta, egp, pp, dmp, cp, to_end, d_end, g_end,
                                   c_end, gs_end, gam_end, dw_end, ds_end, BC, CHUNK, DELTA1, MOM, PRECISION)
        dw1 += dw
        ds1 += ds
        dkk1 += dkk
        dvv1 += dvv
        g_eta += e_eta
        g_egp += e_egp
        g_pp += e_pp
        g_dmp += e_dmp
        g_cp += e_cp
        g_to_end += e_to_end
        g_d_end += e_d_end
        g_g_end += e_g_end
        g_c_end += e_c_end
        g_gs_end += e_gs_end
        g_gam_end += e_gam_end
    deta, dalpha, dlgam = coefficients_bwd(
        alpha, lgam, eta, g_eg, g_egp, g_p, g_pp, g_dm, g_dmp, g_c, g_cp, g_to_end, g_d_end, g_g_end, g_c_end,
        g_gs_end, g_gam_end, g_eta, BC, MOM, PRECISION)

    if IS_O:  # M_o's gradient state is its chunk start, read again (as k): kept from above, their
        w1c_ptr = w1_ptr  # shared-memory copies would stay live through both weights' backward
        w2c_ptr = w2_ptr
    w1c, w2c = gradient_state(w1, w2, w1c_ptr, w2c_ptr, base, IS_O, DH, DM, DEPTH, True)
    k = load_tokens(k_ptr, t0, ntok, h, H, BC, DH, True)
    v = load_tokens(v_ptr, t0, ntok, h, H, BC, DH)
    r, zk, hk, u0 = chunk_targets(k, v, w1c, w2c, DEPTH, SELFGEN, PRECISION)
    kk1, vv10, norm = w1_keys(hk, r, DELTA1)
    domg = tl.sum(tl.sum(du * u0, 1), 0)
    dr = tl.zeros_like(r)
    dhk = tl.zeros_like(hk)
    if DEPTH == 2:
        domg += tl.sum(tl.sum(dvv1 * vv10, 1), 0)
        dr, dhk = w1_keys_bwd(kk1, r, norm, dkk1, dvv1 * omg, DELTA1)
    dk, dv, dw1c, dw2c = targets_bwd(k, v, w1c, w2c, r, zk, hk, du * omg, dr, dhk, dk, DEPTH, SELFGEN, V_GRAD,
                                     PRECISION)
    if MOM:
        gamma_grad(dgamma_ptr + (n * N_MEM + m) * H + h, gamma_ptr, h, dlgam, domg, tl.arange(0, BC) < ntok)
        store_matrix(ds2_ptr + base, ds2, DM, DH)
        if DEPTH == 2:
            store_matrix(ds1_ptr + base, ds1, DH, DM)
    if IS_O:
        dw1 += dw1c
        dw2 += dw2c
    else:
        add_matrix(dw2c_ptr + base, dw2c, DM, DH)
        if DEPTH == 2:
            add_matrix(dw1c_ptr + base, dw1c, DH, DM)
    store_matrix(dw2_ptr + base, dw2, DM, DH)
    if DEPTH == 2:
        store_matrix(dw1_ptr + base, dw1, DH, DM)
    store_token_grads(dk_ptr, dv_ptr, deta_ptr, dalpha_ptr, m.to(tl.int64) * TOKENS * H, dk, dv, deta, dalpha, t0,
                      ntok, h, H, BC, DH)
