"""Forward kernel: the chunk-start reads of the four projection memories (k, v, eta, alpha of
docs/model.md section 2.3) for every token of one proj-chunk, in parallel over
(sub-chunk, document x head)."""
from __future__ import annotations

import triton
import triton.language as tl

from kernels.hope_memory.triton_utils import (
    chunk_range,
    load_matrix,
    l2norm,
    load_tokens,
    memory_read,
    store_tokens,
)


@triton.jit
def proj_read_fwd_kernel(
    a_ptr, w1_ptr, w2_ptr, eta_w_ptr, eta_b_ptr, alpha_w_ptr, alpha_b_ptr,
    k_ptr, v_ptr, eta_ptr, alpha_ptr, cu_ptr,
    step, N, H, eta_max,
    CHUNK: tl.constexpr, BC: tl.constexpr, DH: tl.constexpr, DM: tl.constexpr,
    DEPTH: tl.constexpr, N_MEM: tl.constexpr, PRECISION: tl.constexpr,
):
    """a: (tokens, H, DH); w1/w2: this step's state (N, N_MEM, H, ...) float32; writes k, v
    (tokens, H, DH) and eta, alpha (tokens, H) float32 for sub-chunk program_id(0) of the
    proj-chunk starting at chunk `step`."""
    sub = tl.program_id(0)
    nh = tl.program_id(1)
    n = nh // H
    h = nh % H
    t0, ntok = chunk_range(cu_ptr, n, (step + sub) * CHUNK, CHUNK)
    a = load_tokens(a_ptr, t0, ntok, h, H, BC, DH)
    mat = DM * DH
    mem_stride = H * mat
    base = (n * N_MEM * H + h) * mat

    mk = memory_read(a, load_matrix(w1_ptr + base, DH, DM), load_matrix(w2_ptr + base, DM, DH),
                     DEPTH, PRECISION)
    base += mem_stride
    mv = memory_read(a, load_matrix(w1_ptr + base, DH, DM), load_matrix(w2_ptr + base, DM, DH),
                     DEPTH, PRECISION)
    base += mem_stride
    me = memory_read(a, load_matrix(w1_ptr + base, DH, DM), load_matrix(w2_ptr + base, DM, DH),
                     DEPTH, PRECISION)
    base += mem_stride
    ma = memory_read(a, load_matrix(w1_ptr + base, DH, DM), load_matrix(w2_ptr + base, DM, DH),
                     DEPTH, PRECISION)

    store_tokens(k_ptr, l2norm(mk), t0, ntok, h, H, BC, DH)
    store_tokens(v_ptr, l2norm(mv), t0, ntok, h, H, BC, DH)

    cols = tl.arange(0, DH)
    eta_w = tl.load(eta_w_ptr + h * DH + cols).to(tl.float32)
    alpha_w = tl.load(alpha_w_ptr + h * DH + cols).to(tl.float32)
    eta_b = tl.load(eta_b_ptr + h).to(tl.float32)
    alpha_b = tl.load(alpha_b_ptr + h).to(tl.float32)
    eta = eta_max * tl.sigmoid(tl.sum(me * eta_w[None, :], 1) + eta_b)
    alpha = tl.sigmoid(tl.sum(ma * alpha_w[None, :], 1) + alpha_b)
    rows = tl.arange(0, BC)
    tl.store(eta_ptr + (t0 + rows) * H + h, eta, mask=rows < ntok)
    tl.store(alpha_ptr + (t0 + rows) * H + h, alpha, mask=rows < ntok)
