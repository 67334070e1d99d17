"""Backward kernel of `proj_read_fwd_kernel`: from the gradients of one proj-chunk's k, v, eta,
alpha (summed here over the per-memory parts the chunk kernels wrote) to the gradients of a, of
the four projection memories' proj-chunk-start state and of eta_w/eta_b/alpha_w/alpha_b. Every
(sub-chunk, document, head) program writes its own partial weight gradients; the caller sums."""
from __future__ import annotations

import triton
import triton.language as tl

from kernels.hope_memory.triton_utils import (
    chunk_range,
    load_matrix,
    load_scalars,
    load_tokens,
    memory_read,
    memory_read_bwd,
    store_matrix,
    store_tokens,
)


@triton.jit
def summed_parts(ptr, t0, ntok, h, H, TOKENS, N_MEM: tl.constexpr, BC: tl.constexpr, D: tl.constexpr):
    """Sum over memories of a (N_MEM, tokens, H, D) per-memory gradient (D = 1: (N_MEM, tokens, H))."""
    part = TOKENS * H * D
    if D == 1:
        total = load_scalars(ptr, t0, ntok, h, H, 0.0, BC)
        for mm in tl.static_range(1, N_MEM):
            total += load_scalars(ptr + mm * part, t0, ntok, h, H, 0.0, BC)
    else:
        total = load_tokens(ptr, t0, ntok, h, H, BC, D)
        for mm in tl.static_range(1, N_MEM):
            total += load_tokens(ptr + mm * part, t0, ntok, h, H, BC, D)
    return total


@triton.jit
def l2norm_bwd(x, dy):
    """Gradient of x / sqrt(||x||^2 + 1e-6) over rows."""
    inv = 1.0 / tl.sqrt(tl.sum(x * x, 1) + 1e-6)
    y = x * inv[:, None]
    return inv[:, None] * (dy - y * tl.sum(y * dy, 1)[:, None])


@triton.jit
def proj_read_bwd_kernel(
    a_ptr, w1_ptr, w2_ptr, eta_w_ptr, eta_b_ptr, alpha_w_ptr, alpha_b_ptr,
    dk_ptr, dv_ptr, deta_ptr, dalpha_ptr, da_ptr, dw1_ptr, dw2_ptr, dvec_ptr, dbias_ptr, cu_ptr,
    step, N, H, TOKENS, eta_max,
    CHUNK: tl.constexpr, BC: tl.constexpr, DH: tl.constexpr, DM: tl.constexpr,
    DEPTH: tl.constexpr, N_MEM: tl.constexpr, PRECISION: tl.constexpr,
):
    """w1/w2: the proj-chunk-start state (N, N_MEM, H, ...). Writes da (tokens, H, DH) and, for
    program (sub, n*H + h), the partials dw1/dw2[sub, n, 0:4, h], dvec[sub, n, h] = (d eta_w,
    d alpha_w) (2, DH) and dbias[sub, n, h] = (d eta_b, d alpha_b)."""
    sub = tl.program_id(0)
    nh = tl.program_id(1)
    n = nh // H
    h = nh % H
    t0, ntok = chunk_range(cu_ptr, n, (step + sub) * CHUNK, CHUNK)
    a = load_tokens(a_ptr, t0, ntok, h, H, BC, DH)
    dk = summed_parts(dk_ptr, t0, ntok, h, H, TOKENS, N_MEM, BC, DH)
    dv = summed_parts(dv_ptr, t0, ntok, h, H, TOKENS, N_MEM, BC, DH)
    deta = summed_parts(deta_ptr, t0, ntok, h, H, TOKENS, N_MEM, BC, 1)
    dalpha = summed_parts(dalpha_ptr, t0, ntok, h, H, TOKENS, N_MEM, BC, 1)

    mat = DM * DH
    src = (n * N_MEM * H + h) * mat
    dst = ((sub * N + n) * 4 * H + h) * mat
    cols = tl.arange(0, DH)
    eta_w = tl.load(eta_w_ptr + h * DH + cols).to(tl.float32)
    alpha_w = tl.load(alpha_w_ptr + h * DH + cols).to(tl.float32)
    eta_b = tl.load(eta_b_ptr + h).to(tl.float32)
    alpha_b = tl.load(alpha_b_ptr + h).to(tl.float32)
    da = tl.zeros((BC, DH), dtype=tl.float32)
    for mm in tl.static_range(4):
        w1 = load_matrix(w1_ptr + src + mm * H * mat, DH, DM)
        w2 = load_matrix(w2_ptr + src + mm * H * mat, DM, DH)
        out = memory_read(a, w1, w2, DEPTH, PRECISION)
        if mm == 0:
            dout = l2norm_bwd(out, dk)
        elif mm == 1:
            dout = l2norm_bwd(out, dv)
        elif mm == 2:
            s = tl.sigmoid(tl.sum(out * eta_w[None, :], 1) + eta_b)
            dlogit = deta * eta_max * s * (1.0 - s)
            dout = dlogit[:, None] * eta_w[None, :]
            tl.store(dvec_ptr + (nh + sub * N * H) * 2 * DH + cols, tl.sum(dlogit[:, None] * out, 0))
            tl.store(dbias_ptr + (nh + sub * N * H) * 2, tl.sum(dlogit, 0))
        else:
            s = tl.sigmoid(tl.sum(out * alpha_w[None, :], 1) + alpha_b)
            dlogit = dalpha * s * (1.0 - s)
            dout = dlogit[:, None] * alpha_w[None, :]
            tl.store(dvec_ptr + (nh + sub * N * H) * 2 * DH + DH + cols, tl.sum(dlogit[:, None] * out, 0))
            tl.store(dbias_ptr + (nh + sub * N * H) * 2 + 1, tl.sum(dlogit, 0))
        dz, dw1, dw2 = memory_read_bwd(a, w1, w2, dout, DEPTH, PRECISION)
        da += dz
        store_matrix(dw2_ptr + dst + mm * H * mat, dw2, DM, DH)
        if DEPTH == 2:
            store_matrix(dw1_ptr + dst + mm * H * mat, dw1, DH, DM)
    store_tokens(da_ptr, da, t0, ntok, h, H, BC, DH)
