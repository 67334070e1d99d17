"""Forward driver of the Triton HOPE memory op: the Python loop over chunks (sequential: each
chunk starts from the previous chunk's end state) launching the forward kernels, each parallel
over documents x heads (x memories)."""
from __future__ import annotations

import torch
import triton

from kernels.hope_memory.triton_fwd import chunk_fwd_kernel
from kernels.hope_memory.triton_proj import proj_read_fwd_kernel


def dot_precision(q: torch.Tensor) -> str:
    """float32 inputs keep float32-accurate dots (the 1e-4 contract): 3xTF32 on tensor cores on a
    GPU ("ieee" FMA dots spill badly there), exact under the CPU interpreter; bf16/fp16 inputs
    use tf32."""
    if q.dtype != torch.float32:
        return "tf32"
    return "tf32x3" if q.is_cuda else "ieee"


def kernel_meta(q: torch.Tensor, chunk_size: int, n_mem: int, depth: int, DM: int) -> dict:
    """Compile-time constants shared by the forward and backward kernels."""
    return dict(CHUNK=chunk_size, BC=max(16, triton.next_power_of_2(chunk_size)), DH=q.shape[-1], DM=DM,
                DEPTH=depth, N_MEM=n_mem, PRECISION=dot_precision(q))


def n_chunks(max_seqlen: int, chunk_size: int) -> int:
    """Chunks of the longest document (at least 1, so empty inputs still give a final state)."""
    return max(1, triton.cdiv(max_seqlen, chunk_size))


def chunk_forward(q, a, k, v, eta, alpha, w1, w2, eta_w, eta_b, alpha_w, alpha_b, cu, *,
                   chunk_size, proj_chunk_size, eta_max, selfgen, max_seqlen, readout=True):
    """q, a, k, v: (tokens, H, d_h), eta, alpha: (tokens, H), contiguous (a for selfmod, the
    others for titans); w1/w2: float32 (N, n_mem, H, ., .) initial state; cu: (N + 1,) int64
    offsets of the documents in the token axis. Returns o (tokens, H, d_h), the state history
    (n_chunks + 1, N, n_mem, H, ., .) of every chunk start (the last entry is the final state;
    hist_w1 is None at depth 1) and the k, v, eta, alpha the memories used (float32 for selfmod).
    max_seqlen: an int bound on the documents' lengths (the chunk count; no read of cu).
    readout=False (the backward's recomputation of the states) skips M_o's read-out: o is None."""
    tokens, H, DH = q.shape
    N, n_mem = w2.shape[:2]
    depth = 1 if w1 is None else 2
    steps = n_chunks(max_seqlen, chunk_size)
    hist_w2 = w2.new_empty((steps + 1,) + tuple(w2.shape))
    hist_w2[0] = w2
    hist_w1 = hist_w2
    if depth == 2:
        hist_w1 = w1.new_empty((steps + 1,) + tuple(w1.shape))
        hist_w1[0] = w1
    if n_mem == 5:
        k = q.new_empty((tokens, H, DH), dtype=torch.float32)
        v = torch.empty_like(k)
        eta = q.new_empty((tokens, H), dtype=torch.float32)
        alpha = torch.empty_like(eta)
    o = torch.empty_like(q) if readout else None
    meta = kernel_meta(q, chunk_size, n_mem, depth, w2.shape[3])
    proj_step = 0
    for step in range(steps):
        if n_mem == 5 and (step * chunk_size) % proj_chunk_size == 0:
            proj_step = step
            proj_read_fwd_kernel[(proj_chunk_size // chunk_size, N * H)](
                a, hist_w1[step], hist_w2[step], eta_w, eta_b, alpha_w, alpha_b,
                k, v, eta, alpha, cu, step, N, H, eta_max, **meta)
        chunk_fwd_kernel[(N * H, n_mem)](
            k, v, eta, alpha, q, o,
            hist_w1[step], hist_w2[step], hist_w1[proj_step], hist_w2[proj_step],
            hist_w1[step + 1], hist_w2[step + 1], cu, step, N, H, SELFGEN=selfgen, READOUT=readout, **meta)
    return o, hist_w1 if depth == 2 else None, hist_w2, (k, v, eta, alpha)
