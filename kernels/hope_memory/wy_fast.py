"""One weight's chunk of the (gated, momentum) delta rule, generic over the weight: the forward
pieces both W2 (keys k) and W1 (keys hn = l2norm(h), docs/model.md section 2.4) use.

For a weight W (dout x din) with chunk-start W_c and momentum S_c, keys kk_t (din) and rank-1
gradients vv_t kk_t^T (vv already scaled by 1 - gamma with momentum), the rule
    W_t = W_{t-1} (alpha_t I - eta_t kk_t kk_t^T) - eta_t S_t,  S_t = gamma S_{t-1} + vv_t kk_t^T
(DELTA = False drops the kk kk^T term: W1's gated update) unrolls, with P_tj = G_t / G_j
(G the cumulative alpha), Gam_tj = gamma^(t-j), D = P diag(eta) Gam and c_t = sum_s P_ts eta_s Gam_s0,
into  W_t = G_t W_c - c_t S_c - sum_{j<=t} (P_tj y_j + D_tj vv_j) kk_j^T  with y_t = eta_t W_{t-1} kk_t,
the solution of the UT system (I + A) Y = diag(eta) (diag(G_prev) KK W_c^T - diag(c_prev) KK S_c^T
- (D_prev o KK KK^T) VV), A = diag(eta) (P_prev o KK KK^T) strictly lower ("_prev": row t-1).
Without momentum Gam = I, so D = P diag(eta) and c = 0. Padding rows (past a document's end) have
eta = 0, alpha = gamma = 1 and kk = vv = 0: exact no-ops.
"""
from __future__ import annotations

import triton
import triton.language as tl

from kernels.hope_memory.triton_utils import chunk_decay, masked_exp
from kernels.hope_memory.solve_tril import forward_substitution


@triton.jit
def momentum_decay(lgam):
    """Cumulative log gamma (inclusive) and its chunk total, from per-token log gamma (0 on padding)."""
    lgg = tl.cumsum(lgam, 0)
    return lgg, tl.sum(lgam, 0)


@triton.jit
def chunk_coefficients(alpha, lgam, eta, BC: tl.constexpr, MOM: tl.constexpr, PRECISION: tl.constexpr):
    """The unrolled rule's coefficients: (eg = G, egp = G_prev, P, P_prev, D, D_prev, c, c_prev,
    to_end = P_end., D_end., g_end, c_end, gs_end = Gam_end0, gam_end = Gam_end.)."""
    rows = tl.arange(0, BC)
    incl = rows[None, :] <= rows[:, None]
    strict = rows[None, :] < rows[:, None]
    lg, lgp, lg_end = chunk_decay(alpha)
    p = masked_exp(lg[:, None] - lg[None, :], incl)
    pp = masked_exp(lgp[:, None] - lg[None, :], strict)
    to_end = tl.exp(lg_end - lg)
    if MOM:
        lgg, lgg_end = momentum_decay(lgam)
        gam = masked_exp(lgg[:, None] - lgg[None, :], incl)
        ev = eta * tl.exp(lgg)
        d = tl.dot(p * eta[None, :], gam, input_precision=PRECISION)
        dp = tl.dot(pp * eta[None, :], gam, input_precision=PRECISION)
        c = tl.sum(p * ev[None, :], 1)
        cp = tl.sum(pp * ev[None, :], 1)
        d_end = tl.sum((to_end * eta)[:, None] * gam, 0)
        c_end = tl.sum(to_end * ev, 0)
        gs_end = tl.exp(lgg_end)
        gam_end = tl.exp(lgg_end - lgg)
    else:
        d = p * eta[None, :]
        dp = pp * eta[None, :]
        c = tl.zeros((BC,), dtype=tl.float32)
        cp = c
        d_end = to_end * eta
        c_end = 0.0
        gs_end = 1.0
        gam_end = tl.full((BC,), 1.0, dtype=tl.float32)
    return tl.exp(lg), tl.exp(lgp), p, pp, d, dp, c, cp, to_end, d_end, tl.exp(lg_end), c_end, gs_end, gam_end


@triton.jit
def delta_solve(w, s, kk, vv, eta, egp, pp, dp, cp, BC: tl.constexpr, CHUNK: tl.constexpr, MOM: tl.constexpr,
                PRECISION: tl.constexpr):
    """Y of the module docstring (C x dout)."""
    kkt = tl.dot(kk, tl.trans(kk), input_precision=PRECISION)
    inner = egp[:, None] * tl.dot(kk, tl.trans(w), input_precision=PRECISION)
    inner -= tl.dot(dp * kkt, vv, input_precision=PRECISION)
    if MOM:
        inner -= cp[:, None] * tl.dot(kk, tl.trans(s), input_precision=PRECISION)
    return forward_substitution(eta[:, None] * pp * kkt, eta[:, None] * inner, BC, CHUNK)


@triton.jit
def delta_end(w, s, kk, vv, y, to_end, d_end, g_end, c_end, gs_end, gam_end, DELTA: tl.constexpr,
              MOM: tl.constexpr, PRECISION: tl.constexpr):
    """Chunk-end weight and momentum (s is returned as is without momentum)."""
    coef = d_end[:, None] * vv
    if DELTA:
        coef += to_end[:, None] * y
    w_end = g_end * w - tl.dot(tl.trans(coef), kk, input_precision=PRECISION)
    s_end = s
    if MOM:
        w_end -= c_end * s
        s_end = gs_end * s + tl.dot(tl.trans(gam_end[:, None] * vv), kk, input_precision=PRECISION)
    return w_end, s_end


@triton.jit
def delta_read(w, s, kk, vv, y, eg, p, d, c, qq, DELTA: tl.constexpr, MOM: tl.constexpr,
               PRECISION: tl.constexpr):
    """Per-token inclusive reads W_t qq_t for the rows qq (C x din)."""
    qk = tl.dot(qq, tl.trans(kk), input_precision=PRECISION)
    out = eg[:, None] * tl.dot(qq, tl.trans(w), input_precision=PRECISION)
    out -= tl.dot(qk * d, vv, input_precision=PRECISION)
    if DELTA:
        out -= tl.dot(qk * p, y, input_precision=PRECISION)
    if MOM:
        out -= c[:, None] * tl.dot(qq, tl.trans(s), input_precision=PRECISION)
    return out
