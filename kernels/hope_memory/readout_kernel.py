"""M_o's read-out o = q + W1_t silu(W2_t q) (depth 2; W2_t q at depth 1), forward and backward, as
kernels of their own after M_o's chunk kernel. They read the chunk's solved rows from the tape
(`triton_utils.tape_slots`) instead of solving again, so no kernel holds the solves, the read-out
and the weights' backward at once: together they need more shared memory than an H100 block has
(docs/triton.md, bench/triton_smem_check.py). Each tile is loaded next to its use for the same
reason: Triton keeps a tile's shared-memory copy from its load to its last use."""
from __future__ import annotations

import triton
import triton.language as tl

from kernels.hope_memory.triton_utils import (
    chunk_range,
    dsilu,
    load_matrix,
    load_scalars,
    load_tokens,
    silu,
    store_matrix,
    store_tokens,
    tape_slots,
)
from kernels.hope_memory.wy_fast import chunk_coefficients, delta_read
from kernels.hope_memory.wy_fast_bwd import delta_read_bwd
from kernels.hope_memory.chunk_fwd_kernel import load_momentum


def read_grad_size(BC: int, DH: int, DM: int) -> int:
    """float32 elements of one (document, head) row of the read-out's gradient parts (`read_grad_slots`)."""
    return 4 * DH * DM + 3 * BC * (DM + DH) + 2 * BC * BC + 2 * BC


@triton.jit
def read_grad_slots(ptr, row, BC: tl.constexpr, DH: tl.constexpr, DM: tl.constexpr):
    """Pointers of row `row` of the read-out's gradient parts, which the backward chunk kernel of M_o
    starts from: dW1, dS1 (DH x DM), dW2, dS2 (DM x DH), dkk1, du, dY2 (BC x DM), dvv1, dY1, dk
    (BC x DH), and of the coefficients P, D (BC x BC), G, c (BC)."""
    dw1 = ptr + row.to(tl.int64) * (4 * DH * DM + 3 * BC * (DM + DH) + 2 * BC * BC + 2 * BC)
    ds1 = dw1 + DH * DM
    dw2 = ds1 + DH * DM
    ds2 = dw2 + DH * DM
    dkk1 = ds2 + DH * DM
    du = dkk1 + BC * DM
    dy2 = du + BC * DM
    dvv1 = dy2 + BC * DM
    dy1 = dvv1 + BC * DH
    dk = dy1 + BC * DH
    g_p = dk + BC * DH
    g_dm = g_p + BC * BC
    g_eg = g_dm + BC * BC
    return dw1, ds1, dw2, ds2, dkk1, du, dy2, dvv1, dy1, dk, g_p, g_dm, g_eg, g_eg + BC


@triton.jit
def read_coefficients(eta_ptr, alpha_ptr, gamma_ptr, s1_ptr, s2_ptr, base, t0, ntok, h, H, BC: tl.constexpr,
                      DH: tl.constexpr, DM: tl.constexpr, DEPTH: tl.constexpr, MOM: tl.constexpr,
                      PRECISION: tl.constexpr):
    """The read-out's coefficients (G, P, D, c) of the chunk."""
    eta = load_scalars(eta_ptr, t0, ntok, h, H, 0.0, BC)
    alpha = load_scalars(alpha_ptr, t0, ntok, h, H, 1.0, BC)
    _, _, lgam, _ = load_momentum(s1_ptr, s2_ptr, gamma_ptr, base, h, ntok, BC, DH, DM, DEPTH, MOM)
    eg, _, p, _, d, _, c, _, _, _, _, _, _, _ = chunk_coefficients(alpha, lgam, eta, BC, MOM, PRECISION)
    return eg, p, d, c


@triton.jit
def weight_pieces(w_ptr, s_ptr, vv_ptr, y_ptr, BC: tl.constexpr, DOUT: tl.constexpr, DIN: tl.constexpr,
                  MOM: tl.constexpr):
    """A weight's chunk-start W, S (W stands in without momentum) and its tape rows vv, Y."""
    w = load_matrix(w_ptr, DOUT, DIN)
    s = w
    if MOM:
        s = load_matrix(s_ptr, DOUT, DIN)
    return w, s, load_matrix(vv_ptr, BC, DOUT), load_matrix(y_ptr, BC, DOUT)


@triton.jit
def readout_fwd_kernel(
    k_ptr, eta_ptr, alpha_ptr, gamma_ptr, q_ptr, o_ptr, w1_ptr, w2_ptr, s1_ptr, s2_ptr, tape_ptr, cu_ptr,
    step, N, H,
    CHUNK: tl.constexpr, BC: tl.constexpr, DH: tl.constexpr, DM: tl.constexpr, DEPTH: tl.constexpr,
    N_MEM: tl.constexpr, DELTA1: tl.constexpr, MOM: tl.constexpr, PRECISION: tl.constexpr,
):
    """o (tokens, H, DH) of the chunk for program (n, h), from M_o's (memory N_MEM - 1) chunk-start
    state (N, N_MEM, H, ...) and tape row n * H + h."""
    nh = tl.program_id(0)
    n = nh // H
    h = nh % H
    t0, ntok = chunk_range(cu_ptr, n, step * CHUNK, CHUNK)
    base = ((n * N_MEM + N_MEM - 1) * H + h) * (DM * DH)
    tape = tape_slots(tape_ptr, nh, BC, DH, DM)
    eg, p, d, c = read_coefficients(eta_ptr, alpha_ptr, gamma_ptr, s1_ptr, s2_ptr, base, t0, ntok, h, H, BC, DH,
                                    DM, DEPTH, MOM, PRECISION)
    q = load_tokens(q_ptr, t0, ntok, h, H, BC, DH)
    w2, s2, u, y2 = weight_pieces(w2_ptr + base, s2_ptr + base, tape[0], tape[1], BC, DM, DH, MOM)
    o = delta_read(w2, s2, load_tokens(k_ptr, t0, ntok, h, H, BC, DH), u, y2, eg, p, d, c, q, True, MOM,
                   PRECISION)
    if DEPTH == 2:
        w1, s1, vv1, y1 = weight_pieces(w1_ptr + base, s1_ptr + base, tape[3], tape[4], BC, DH, DM, MOM)
        o = q + delta_read(w1, s1, load_matrix(tape[2], BC, DM), vv1, y1, eg, p, d, c, silu(o), DELTA1, MOM,
                           PRECISION)
    store_tokens(o_ptr, o, t0, ntok, h, H, BC, DH)


@triton.jit
def readout_bwd_kernel(
    k_ptr, eta_ptr, alpha_ptr, gamma_ptr, q_ptr, do_ptr, dq_ptr, w1_ptr, w2_ptr, s1_ptr, s2_ptr, tape_ptr,
    grad_ptr, cu_ptr, step, N, H,
    CHUNK: tl.constexpr, BC: tl.constexpr, DH: tl.constexpr, DM: tl.constexpr, DEPTH: tl.constexpr,
    N_MEM: tl.constexpr, DELTA1: tl.constexpr, MOM: tl.constexpr, PRECISION: tl.constexpr,
):
    """readout_fwd_kernel's backward given do: writes dq (tokens, H, DH) and row n * H + h of the
    read-out's gradient parts (`read_grad_slots`; dS1, dS2 only with momentum, the W1 parts only at
    depth 2, which the chunk kernel then reads likewise)."""
    nh = tl.program_id(0)
    n = nh // H
    h = nh % H
    t0, ntok = chunk_range(cu_ptr, n, step * CHUNK, CHUNK)
    base = ((n * N_MEM + N_MEM - 1) * H + h) * (DM * DH)
    tape = tape_slots(tape_ptr, nh, BC, DH, DM)
    out = read_grad_slots(grad_ptr, nh, BC, DH, DM)
    eg, p, d, c = read_coefficients(eta_ptr, alpha_ptr, gamma_ptr, s1_ptr, s2_ptr, base, t0, ntok, h, H, BC, DH,
                                    DM, DEPTH, MOM, PRECISION)
    q = load_tokens(q_ptr, t0, ntok, h, H, BC, DH)
    do = load_tokens(do_ptr, t0, ntok, h, H, BC, DH)
    k = load_tokens(k_ptr, t0, ntok, h, H, BC, DH)
    w2, s2, u, y2 = weight_pieces(w2_ptr + base, s2_ptr + base, tape[0], tape[1], BC, DM, DH, MOM)
    z = delta_read(w2, s2, k, u, y2, eg, p, d, c, q, True, MOM, PRECISION)
    dz = do
    dq = tl.zeros_like(do)
    g_eg, g_p, g_dm, g_c = tl.zeros_like(eg), tl.zeros_like(p), tl.zeros_like(p), tl.zeros_like(eg)
    if DEPTH == 2:
        w1, s1, vv1, y1 = weight_pieces(w1_ptr + base, s1_ptr + base, tape[3], tape[4], BC, DH, DM, MOM)
        dpz, dw1, ds1, dkk1, dvv1, dy1, g_eg, g_p, g_dm, g_c = delta_read_bwd(
            w1, s1, load_matrix(tape[2], BC, DM), vv1, y1, eg, p, d, c, silu(z), do, DELTA1, MOM, PRECISION)
        store_matrix(out[0], dw1, DH, DM)
        if MOM:
            store_matrix(out[1], ds1, DH, DM)
        store_matrix(out[4], dkk1, BC, DM)
        store_matrix(out[7], dvv1, BC, DH)
        store_matrix(out[8], dy1, BC, DH)
        dz = dpz * dsilu(z)
        dq = do
    dq2, dw2, ds2, dk, du, dy2, g_eg2, g_p2, g_dm2, g_c2 = delta_read_bwd(
        w2, s2, k, u, y2, eg, p, d, c, q, dz, True, MOM, PRECISION)
    store_tokens(dq_ptr, dq + dq2, t0, ntok, h, H, BC, DH)
    store_matrix(out[2], dw2, DM, DH)
    if MOM:
        store_matrix(out[3], ds2, DM, DH)
    store_matrix(out[5], du, BC, DM)
    store_matrix(out[6], dy2, BC, DM)
    store_matrix(out[9], dk, BC, DH)
    store_matrix(out[10], g_p + g_p2, BC, BC)
    store_matrix(out[11], g_dm + g_dm2, BC, BC)
    rows = tl.arange(0, BC)
    tl.store(out[12] + rows, g_eg + g_eg2)
    tl.store(out[13] + rows, g_c + g_c2)
