"""Small @triton.jit helpers shared by the HOPE memory kernels: activations, tile loads, one
memory's read-out M(z), the chunk's token range and the in-chunk decay factors."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def silu(x):
    return x * tl.sigmoid(x)


@triton.jit
def dsilu(x):
    """d silu(x) / dx."""
    s = tl.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


@triton.jit
def l2norm(x):
    """Rows of x over sqrt(||x||^2 + 1e-6), as naive.l2norm."""
    return x / tl.sqrt(tl.sum(x * x, 1) + 1e-6)[:, None]


@triton.jit
def chunk_range(cu_ptr, n, first_token, CHUNK: tl.constexpr):
    """Global index of the chunk's first token and its number of tokens (0 once the document
    ended) for document `n`, whose `first_token` is counted from the document start."""
    bos = tl.load(cu_ptr + n).to(tl.int64)
    eos = tl.load(cu_ptr + n + 1).to(tl.int64)
    t0 = bos + first_token
    ntok = tl.minimum(tl.maximum(eos - t0, 0), CHUNK)
    return t0, ntok


@triton.jit
def load_tokens(ptr, t0, ntok, h, H, BC: tl.constexpr, D: tl.constexpr, AGAIN: tl.constexpr = False):
    """(BC, D) float32 tile of a (tokens, H, D) tensor; rows past `ntok` read as 0. AGAIN: a second
    read of a tile read before, as a load the compiler does not merge with the first (`load_matrix`)."""
    rows = tl.arange(0, BC)
    cols = tl.arange(0, D)
    offs = (t0 + rows[:, None]) * (H * D) + h * D + cols[None, :]
    if AGAIN:
        x = tl.load(ptr + offs, mask=rows[:, None] < ntok, other=0.0, eviction_policy="evict_first")
    else:
        x = tl.load(ptr + offs, mask=rows[:, None] < ntok, other=0.0)
    return x.to(tl.float32)


@triton.jit
def store_tokens(ptr, x, t0, ntok, h, H, BC: tl.constexpr, D: tl.constexpr):
    rows = tl.arange(0, BC)
    cols = tl.arange(0, D)
    offs = (t0 + rows[:, None]) * (H * D) + h * D + cols[None, :]
    tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=rows[:, None] < ntok)


@triton.jit
def load_scalars(ptr, t0, ntok, h, H, other, BC: tl.constexpr):
    """(BC,) float32 per-token scalars of a (tokens, H) tensor; rows past `ntok` read `other`."""
    rows = tl.arange(0, BC)
    return tl.load(ptr + (t0 + rows) * H + h, mask=rows < ntok, other=other).to(tl.float32)


@triton.jit
def load_matrix(ptr, R: tl.constexpr, C: tl.constexpr, AGAIN: tl.constexpr = False):
    """(R, C) row-major float32 matrix. AGAIN: a second read of a matrix read before, as a distinct
    load (another eviction policy; CSE merges identical loads). Triton keeps one shared-memory copy
    of a dot operand from its first use to its last, so reading a tile again for a late use, instead
    of keeping it, is what keeps a kernel within an H100's shared memory (docs/triton.md)."""
    offs = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
    if AGAIN:
        return tl.load(ptr + offs, eviction_policy="evict_first")
    return tl.load(ptr + offs)


@triton.jit
def store_matrix(ptr, x, R: tl.constexpr, C: tl.constexpr):
    tl.store(ptr + tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :], x)


@triton.jit
def memory_read(z, w1, w2, DEPTH: tl.constexpr, PRECISION: tl.constexpr):
    """M(z) for the rows of z (BC, d_h): z + silu(z W2^T) W1^T (depth 2) or z W2^T (depth 1).
    w1 is (d_h, d_m), w2 is (d_m, d_h)."""
    pre = tl.dot(z, tl.trans(w2), input_precision=PRECISION)
    if DEPTH == 2:
        out = z + tl.dot(silu(pre), tl.trans(w1), input_precision=PRECISION)
    else:
        out = pre
    return out


@triton.jit
def masked_exp(x, mask):
    """exp(x) where mask, exactly 0 elsewhere (no inf outside the mask, so no inf * 0)."""
    return tl.exp(tl.where(mask, x, float("-inf")))


@triton.jit
def ddsilu(x):
    """d^2 silu(x) / dx^2."""
    s = tl.sigmoid(x)
    return s * (1.0 - s) * (2.0 + x * (1.0 - 2.0 * s))


@triton.jit
def memory_read_bwd(z, w1, w2, dout, DEPTH: tl.constexpr, PRECISION: tl.constexpr):
    """Gradients (dz, dw1, dw2) of memory_read(z, w1, w2) given d M(z) = dout; dw1 is 0 for
    depth 1."""
    pre = tl.dot(z, tl.trans(w2), input_precision=PRECISION)
    if DEPTH == 2:
        dw1 = tl.dot(tl.trans(dout), silu(pre), input_precision=PRECISION)
        dpre = tl.dot(dout, w1, input_precision=PRECISION) * dsilu(pre)
        dz = dout + tl.dot(dpre, w2, input_precision=PRECISION)
    else:
        dw1 = tl.zeros_like(w1)
        dpre = dout
        dz = tl.dot(dpre, w2, input_precision=PRECISION)
    return dz, dw1, tl.dot(tl.trans(dpre), z, input_precision=PRECISION)


@triton.jit
def chunk_decay(alpha):
    """Per-token log of the cumulative in-chunk decay, inclusive (lg) and exclusive (lgp) of the
    token, and of the whole chunk. log(0) is clamped at -200 (exp of it is 0 in float32)."""
    la = tl.maximum(tl.log(alpha), -200.0)
    lg = tl.cumsum(la, 0)
    return lg, lg - la, tl.sum(la, 0)


def tape_size(BC: int, DH: int, DM: int) -> int:
    """float32 elements of one program's tape (see `tape_slots`)."""
    return BC * (3 * DM + 2 * DH)


@triton.jit
def tape_slots(ptr, row, BC: tl.constexpr, DH: tl.constexpr, DM: tl.constexpr):
    """Pointers of the (BC x .) tiles of tape row `row`: u, Y2, kk1 (x DM), vv1, Y1 (x DH). The tape
    carries a chunk's solved rows from the chunk kernel to the read-out and backward kernels, so that
    no one kernel holds the solves and everything after them (shared memory, docs/triton.md)."""
    u = ptr + row.to(tl.int64) * (BC * (3 * DM + 2 * DH))
    y2 = u + BC * DM
    kk1 = y2 + BC * DM
    vv1 = kk1 + BC * DM
    return u, y2, kk1, vv1, vv1 + BC * DH
