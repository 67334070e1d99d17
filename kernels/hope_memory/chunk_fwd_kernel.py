"""Forward kernel of one chunk of one memory: the self-generated targets and chunk-start
gradients (u, e, h), W2's delta rule along k and W1's along hn = l2norm(h) (or W1's gated update),
both solved in WY/UT form with momentum when on (wy_fast.py), the chunk-end state and, when
asked, the tape of solved rows (u, Y2, kk1, vv1, Y1) that M_o's read-out (readout_kernel.py) and the
backward kernel read. Parallel over (document x head, memory); M_o runs as its own launch (IS_O:
its gradient state is its own chunk start)."""
from __future__ import annotations

import triton
import triton.language as tl

from kernels.hope_memory.triton_utils import (
    chunk_range,
    dsilu,
    load_matrix,
    load_scalars,
    load_tokens,
    memory_read,
    silu,
    store_matrix,
    tape_slots,
)
from kernels.hope_memory.wy_fast import chunk_coefficients, delta_end, delta_solve


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
def w1_keys(hk, r, DELTA1: tl.constexpr):
    """W1's keys and gradient rows: G1 = r h^T = (r |h|) hn^T along hn = l2norm(h) with the
    delta rule, (h, r) for the gated update. Also returns |h| (eps as l2norm's)."""
    norm = tl.sqrt(tl.sum(hk * hk, 1) + 1e-6)
    if DELTA1:
        return hk / norm[:, None], r * norm[:, None], norm
    return hk, r, norm


@triton.jit
def gradient_state(w1, w2, w1c_ptr, w2c_ptr, base, IS_O: tl.constexpr, DH: tl.constexpr, DM: tl.constexpr,
                   DEPTH: tl.constexpr, AGAIN: tl.constexpr = False):
    """(w1c, w2c): the weights a memory takes its inner gradients at; M_o's are its own chunk-start
    (w1, w2), a projection memory's are loaded (its proj-chunk start). w2 stands in for w1 at depth 1.
    AGAIN: M_o's are read again from w1c_ptr/w2c_ptr (`load_matrix`; pass its chunk start there)."""
    if IS_O and not AGAIN:
        w1c = w1
        w2c = w2
    else:
        w2c = load_matrix(w2c_ptr + base, DM, DH, AGAIN)
        w1c = w2c
        if DEPTH == 2:
            w1c = load_matrix(w1c_ptr + base, DH, DM, AGAIN)
    return w1c, w2c


@triton.jit
def load_memory(w1_ptr, w2_ptr, w1c_ptr, w2c_ptr, base, IS_O: tl.constexpr, DH: tl.constexpr,
                DM: tl.constexpr, DEPTH: tl.constexpr):
    """One memory's chunk-start (w1, w2) and gradient-state (w1c, w2c) weights."""
    w2 = load_matrix(w2_ptr + base, DM, DH)
    w1 = w2
    if DEPTH == 2:
        w1 = load_matrix(w1_ptr + base, DH, DM)
    w1c, w2c = gradient_state(w1, w2, w1c_ptr, w2c_ptr, base, IS_O, DH, DM, DEPTH)
    return w1, w2, w1c, w2c


@triton.jit
def load_momentum(s1_ptr, s2_ptr, gamma_ptr, base, h, ntok, BC: tl.constexpr, DH: tl.constexpr,
                  DM: tl.constexpr, DEPTH: tl.constexpr, MOM: tl.constexpr):
    """Chunk-start momenta (zeros without momentum), log gamma per token (0 on padding rows, so
    they keep S) and 1 - gamma, the gradients' EMA weight (1 without momentum)."""
    s2 = tl.zeros((DM, DH), dtype=tl.float32)
    s1 = tl.zeros((DH, DM), dtype=tl.float32)
    lgam = tl.zeros((BC,), dtype=tl.float32)
    omg = 1.0
    if MOM:
        s2 = load_matrix(s2_ptr + base, DM, DH)
        if DEPTH == 2:
            s1 = load_matrix(s1_ptr + base, DH, DM)
        g = tl.load(gamma_ptr + h).to(tl.float32)
        log_gamma = tl.minimum(g, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(g)))
        lgam = tl.where(tl.arange(0, BC) < ntok, log_gamma, 0.0)
        omg = 1.0 - tl.sigmoid(g)
    return s1, s2, lgam, omg


@triton.jit
def chunk_fwd_kernel(
    k_ptr, v_ptr, eta_ptr, alpha_ptr, gamma_ptr,
    w1_ptr, w2_ptr, s1_ptr, s2_ptr, w1c_ptr, w2c_ptr, w1e_ptr, w2e_ptr, s1e_ptr, s2e_ptr, tape_ptr, cu_ptr,
    step, N, H, M0,
    CHUNK: tl.constexpr, BC: tl.constexpr, DH: tl.constexpr, DM: tl.constexpr,
    DEPTH: tl.constexpr, N_MEM: tl.constexpr, SELFGEN: tl.constexpr, TAPE: tl.constexpr,
    IS_O: tl.constexpr, DELTA1: tl.constexpr, MOM: tl.constexpr, PRECISION: tl.constexpr,
):
    """Memory M0 + program_id(1). w1/w2/s1/s2: chunk-start state (N, N_MEM, H, ...) float32;
    w1c/w2c: the state the projection memories take their gradients at (their proj-chunk start;
    M_o uses w1/w2); w1e/w2e/s1e/s2e: chunk-end state out. With TAPE, program (n, h) of launch
    memory j writes its tape at row (j * N + n) * H + h of tape (rows of `tape_size` floats)."""
    nh = tl.program_id(0)
    m = M0 + tl.program_id(1)
    n = nh // H
    h = nh % H
    t0, ntok = chunk_range(cu_ptr, n, step * CHUNK, CHUNK)
    base = ((n * N_MEM + m) * H + h) * (DM * DH)

    k = load_tokens(k_ptr, t0, ntok, h, H, BC, DH)
    v = load_tokens(v_ptr, t0, ntok, h, H, BC, DH)
    eta = load_scalars(eta_ptr, t0, ntok, h, H, 0.0, BC)
    alpha = load_scalars(alpha_ptr, t0, ntok, h, H, 1.0, BC)
    w1, w2, w1c, w2c = load_memory(w1_ptr, w2_ptr, w1c_ptr, w2c_ptr, base, IS_O, DH, DM, DEPTH)
    s1, s2, lgam, omg = load_momentum(s1_ptr, s2_ptr, gamma_ptr, base, h, ntok, BC, DH, DM, DEPTH, MOM)
    r, _, hk, u = chunk_targets(k, v, w1c, w2c, DEPTH, SELFGEN, PRECISION)
    _, egp, _, pp, _, dp, _, cp, to_end, d_end, g_end, c_end, gs_end, gam_end = chunk_coefficients(
        alpha, lgam, eta, BC, MOM, PRECISION)
    tape = tape_slots(tape_ptr, (tl.program_id(1) * N + n) * H + h, BC, DH, DM)

    u = u * omg
    y2 = delta_solve(w2, s2, k, u, eta, egp, pp, dp, cp, BC, CHUNK, MOM, PRECISION)
    w2e, s2e = delta_end(w2, s2, k, u, y2, to_end, d_end, g_end, c_end, gs_end, gam_end, True, MOM, PRECISION)
    store_matrix(w2e_ptr + base, w2e, DM, DH)
    if MOM:
        store_matrix(s2e_ptr + base, s2e, DM, DH)
    if TAPE:
        store_matrix(tape[0], u, BC, DM)
        store_matrix(tape[1], y2, BC, DM)
    if DEPTH == 2:
        kk1, vv1, _ = w1_keys(hk, r, DELTA1)
        vv1 = vv1 * omg
        y1 = vv1
        if DELTA1:
            y1 = delta_solve(w1, s1, kk1, vv1, eta, egp, pp, dp, cp, BC, CHUNK, MOM, PRECISION)
        w1e, s1e = delta_end(w1, s1, kk1, vv1, y1, to_end, d_end, g_end, c_end, gs_end, gam_end, DELTA1, MOM,
                             PRECISION)
        store_matrix(w1e_ptr + base, w1e, DH, DM)
        if MOM:
            store_matrix(s1e_ptr + base, s1e, DH, DM)
        if TAPE:
            store_matrix(tape[2], kk1, BC, DM)
            store_matrix(tape[3], vv1, BC, DH)
            store_matrix(tape[4], y1, BC, DH)
