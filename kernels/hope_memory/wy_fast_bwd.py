"""Backward of wy_fast.py: the gradients of one weight's chunk (reads, chunk-end state and
the UT solve, whose adjoint is a back substitution with (I + A)^T) and of the coefficients P, D,
c, ... back to eta, alpha and log gamma. Each function returns fresh gradients; the kernel sums
them over W2 and W1, which share the coefficients."""
from __future__ import annotations

import triton
import triton.language as tl

from kernels.hope_memory.triton_utils import chunk_decay, masked_exp
from kernels.hope_memory.wy_fast import momentum_decay
from kernels.hope_memory.solve_tril import backward_substitution


@triton.jit
def delta_read_bwd(w, s, kk, vv, y, eg, p, d, c, qq, dr, DELTA: tl.constexpr, MOM: tl.constexpr,
                   PRECISION: tl.constexpr):
    """Gradients of delta_read given d reads = dr: (dqq, dw, ds, dkk, dvv, dy, deg, dp, dd, dc)."""
    qk = tl.dot(qq, tl.trans(kk), input_precision=PRECISION)
    dqq = eg[:, None] * tl.dot(dr, w, input_precision=PRECISION)
    dw = tl.dot(tl.trans(eg[:, None] * dr), qq, input_precision=PRECISION)
    deg = tl.sum(dr * tl.dot(qq, tl.trans(w), input_precision=PRECISION), 1)
    dm = -tl.dot(dr, tl.trans(vv), input_precision=PRECISION)
    dvv = -tl.dot(tl.trans(qk * d), dr, input_precision=PRECISION)
    dd = dm * qk
    dqk = dm * d
    dy = tl.zeros_like(dr)
    dp = tl.zeros_like(dd)
    if DELTA:
        dm1 = -tl.dot(dr, tl.trans(y), input_precision=PRECISION)
        dy = -tl.dot(tl.trans(qk * p), dr, input_precision=PRECISION)
        dp = dm1 * qk
        dqk += dm1 * p
    ds = tl.zeros_like(w)
    dc = tl.zeros_like(deg)
    if MOM:
        dqq -= c[:, None] * tl.dot(dr, s, input_precision=PRECISION)
        ds = -tl.dot(tl.trans(c[:, None] * dr), qq, input_precision=PRECISION)
        dc = -tl.sum(dr * tl.dot(qq, tl.trans(s), input_precision=PRECISION), 1)
    dqq += tl.dot(dqk, kk, input_precision=PRECISION)
    dkk = tl.dot(tl.trans(dqk), qq, input_precision=PRECISION)
    return dqq, dw, ds, dkk, dvv, dy, deg, dp, dd, dc


@triton.jit
def delta_end_bwd(w, s, kk, vv, y, to_end, d_end, g_end, c_end, gs_end, gam_end, dw_end, ds_end,
                  DELTA: tl.constexpr, MOM: tl.constexpr, PRECISION: tl.constexpr):
    """Gradients of delta_end: (dw, ds, dkk, dvv, dy, dto_end, dd_end, dg_end, dc_end, dgs_end, dgam_end)."""
    coef = d_end[:, None] * vv
    if DELTA:
        coef += to_end[:, None] * y
    dw = g_end * dw_end
    dg_end = tl.sum(tl.sum(dw_end * w, 1), 0)
    dcoef = -tl.dot(kk, tl.trans(dw_end), input_precision=PRECISION)
    dkk = -tl.dot(coef, dw_end, input_precision=PRECISION)
    dvv = d_end[:, None] * dcoef
    dd_end = tl.sum(dcoef * vv, 1)
    dy = tl.zeros_like(vv)
    dto_end = tl.zeros_like(dd_end)
    if DELTA:
        dy = to_end[:, None] * dcoef
        dto_end = tl.sum(dcoef * y, 1)
    ds = tl.zeros_like(w)
    dc_end = 0.0
    dgs_end = 0.0
    dgam_end = tl.zeros_like(dd_end)
    if MOM:
        dc_end = -tl.sum(tl.sum(dw_end * s, 1), 0)
        dgs_end = tl.sum(tl.sum(ds_end * s, 1), 0)
        ds = gs_end * ds_end - c_end * dw_end
        kds = tl.dot(kk, tl.trans(ds_end), input_precision=PRECISION)
        dvv += gam_end[:, None] * kds
        dkk += tl.dot(gam_end[:, None] * vv, ds_end, input_precision=PRECISION)
        dgam_end = tl.sum(kds * vv, 1)
    return dw, ds, dkk, dvv, dy, dto_end, dd_end, dg_end, dc_end, dgs_end, dgam_end


@triton.jit
def delta_solve_bwd(w, s, kk, vv, y, dy, eta, egp, pp, dp, cp, BC: tl.constexpr, CHUNK: tl.constexpr,
                    MOM: tl.constexpr, PRECISION: tl.constexpr):
    """Gradients of delta_solve given dY: (dw, ds, dkk, dvv, deta, degp, dpp, ddp, dcp)."""
    rows = tl.arange(0, BC)
    kkt = tl.dot(kk, tl.trans(kk), input_precision=PRECISION)
    drhs = backward_substitution(eta[:, None] * pp * kkt, dy, BC, CHUNK)
    da = tl.where(rows[None, :] < rows[:, None], -tl.dot(drhs, tl.trans(y), input_precision=PRECISION), 0.0)
    kw = tl.dot(kk, tl.trans(w), input_precision=PRECISION)
    inner = egp[:, None] * kw - tl.dot(dp * kkt, vv, input_precision=PRECISION)
    ks = kw
    if MOM:
        ks = tl.dot(kk, tl.trans(s), input_precision=PRECISION)
        inner -= cp[:, None] * ks
    deta = tl.sum(drhs * inner, 1) + tl.sum(da * pp * kkt, 1)
    dinner = eta[:, None] * drhs
    degp = tl.sum(dinner * kw, 1)
    dkw = egp[:, None] * dinner
    dkk = tl.dot(dkw, w, input_precision=PRECISION)
    dw = tl.dot(tl.trans(dkw), kk, input_precision=PRECISION)
    dm = -tl.dot(dinner, tl.trans(vv), input_precision=PRECISION)
    ddp = dm * kkt
    dkkt = dm * dp + da * eta[:, None] * pp
    dvv = -tl.dot(tl.trans(dp * kkt), dinner, input_precision=PRECISION)
    dpp = da * eta[:, None] * kkt
    ds = tl.zeros_like(w)
    dcp = tl.zeros_like(deta)
    if MOM:
        dcp = -tl.sum(dinner * ks, 1)
        dks = -cp[:, None] * dinner
        dkk += tl.dot(dks, s, input_precision=PRECISION)
        ds = tl.dot(tl.trans(dks), kk, input_precision=PRECISION)
    dkk += tl.dot(dkkt + tl.trans(dkkt), kk, input_precision=PRECISION)
    return dw, ds, dkk, dvv, deta, degp, dpp, ddp, dcp


@triton.jit
def momentum_coefficients_bwd(lgam, eta, p, pp, to_end, dp, dpp, dd, ddp, dc, dcp, dto_end, dd_end, dc_end,
                              dgs_end, dgam_end, deta, BC: tl.constexpr, PRECISION: tl.constexpr):
    """D = P diag(eta) Gam, c = P (eta exp(lgg)), their _prev and _end rows, Gam_end., Gam_end0:
    their gradients into P, P_prev, to_end, eta and log gamma. Returns (dp, dpp, dto_end, deta, dlgam)."""
    rows = tl.arange(0, BC)
    lgg, lgg_end = momentum_decay(lgam)
    gam = masked_exp(lgg[:, None] - lgg[None, :], rows[None, :] <= rows[:, None])
    egam = tl.exp(lgg)
    ev = eta * egam
    gam_end = tl.exp(lgg_end - lgg)
    dpe = tl.dot(dd, tl.trans(gam), input_precision=PRECISION)
    dppe = tl.dot(ddp, tl.trans(gam), input_precision=PRECISION)
    dgam = tl.dot(tl.trans(p * eta[None, :]), dd, input_precision=PRECISION)
    dgam += tl.dot(tl.trans(pp * eta[None, :]), ddp, input_precision=PRECISION)
    dgam += (to_end * eta)[:, None] * dd_end[None, :]
    dte = tl.sum(gam * dd_end[None, :], 1)
    dev = tl.sum(dc[:, None] * p, 0) + tl.sum(dcp[:, None] * pp, 0) + dc_end * to_end
    dp += dpe * eta[None, :] + dc[:, None] * ev[None, :]
    dpp += dppe * eta[None, :] + dcp[:, None] * ev[None, :]
    deta += tl.sum(dpe * p, 0) + tl.sum(dppe * pp, 0) + dte * to_end + dev * egam
    dto_end += dte * eta + dc_end * ev
    t = dgam * gam
    dlgg = tl.sum(t, 1) - tl.sum(t, 0) + dev * ev - dgam_end * gam_end
    dlgg_end = dgs_end * tl.exp(lgg_end) + tl.sum(dgam_end * gam_end, 0)
    return dp, dpp, dto_end, deta, tl.cumsum(dlgg, 0, reverse=True) + dlgg_end


@triton.jit
def coefficients_bwd(alpha, lgam, eta, deg, degp, dp, dpp, dd, ddp, dc, dcp, dto_end, dd_end, dg_end, dc_end,
                     dgs_end, dgam_end, deta, BC: tl.constexpr, MOM: tl.constexpr, PRECISION: tl.constexpr):
    """Gradients of chunk_coefficients' outputs back to (deta, dalpha, dlgam)."""
    rows = tl.arange(0, BC)
    lg, lgp, lg_end = chunk_decay(alpha)
    p = masked_exp(lg[:, None] - lg[None, :], rows[None, :] <= rows[:, None])
    pp = masked_exp(lgp[:, None] - lg[None, :], rows[None, :] < rows[:, None])
    to_end = tl.exp(lg_end - lg)
    if MOM:
        dp, dpp, dto_end, deta, dlgam = momentum_coefficients_bwd(
            lgam, eta, p, pp, to_end, dp, dpp, dd, ddp, dc, dcp, dto_end, dd_end, dc_end, dgs_end, dgam_end, deta,
            BC, PRECISION)
    else:
        dp += dd * eta[None, :]
        dpp += ddp * eta[None, :]
        deta += tl.sum(dd * p, 0) + tl.sum(ddp * pp, 0) + dd_end * to_end
        dto_end += dd_end * eta
        dlgam = tl.zeros_like(eta)
    dlg = deg * tl.exp(lg)
    dlgp = degp * tl.exp(lgp)
    t = dp * p
    dlg += tl.sum(t, 1) - tl.sum(t, 0)
    t = dpp * pp
    dlgp += tl.sum(t, 1)
    dlg -= tl.sum(t, 0)
    t = dto_end * to_end
    dlg -= t
    dlg_end = tl.sum(t, 0) + dg_end * tl.exp(lg_end)
    dla = tl.cumsum(dlg + dlgp, 0, reverse=True) - dlgp + dlg_end
    return deta, tl.where(alpha > 0, dla / alpha, 0.0), dlgam


@triton.jit
def weight_bwd(w, s, kk, vv, y, dy, eta, egp, pp, dmp, cp, to_end, d_end, g_end, c_end, gs_end, gam_end, dw_end,
               ds_end, BC: tl.constexpr, CHUNK: tl.constexpr, DELTA: tl.constexpr, MOM: tl.constexpr,
               PRECISION: tl.constexpr):
    """One weight's chunk-end state and solve backward, dy the reads' gradient of Y. Returns (dw, ds, dkk,
    dvv, and the coefficients' gradients eta, egp, pp, dmp, cp, to_end, d_end, g_end, c_end, gs_end, gam_end)."""
    dw, ds, dkk, dvv, dy_end, g_to_end, g_d_end, g_g_end, g_c_end, g_gs_end, g_gam_end = delta_end_bwd(
        w, s, kk, vv, y, to_end, d_end, g_end, c_end, gs_end, gam_end, dw_end, ds_end, DELTA, MOM, PRECISION)
    g_eta = tl.zeros_like(eta)
    g_egp = tl.zeros_like(eta)
    g_pp = tl.zeros_like(pp)
    g_dmp = tl.zeros_like(pp)
    g_cp = tl.zeros_like(eta)
    if DELTA:
        dw_s, ds_s, dkk_s, dvv_s, g_eta, g_egp, g_pp, g_dmp, g_cp = delta_solve_bwd(
            w, s, kk, vv, y, dy + dy_end, eta, egp, pp, dmp, cp, BC, CHUNK, MOM, PRECISION)
        dw += dw_s
        ds += ds_s
        dkk += dkk_s
        dvv += dvv_s
    return (dw, ds, dkk, dvv, g_eta, g_egp, g_pp, g_dmp, g_cp, g_to_end, g_d_end, g_g_end, g_c_end, g_gs_end,
            g_gam_end)
