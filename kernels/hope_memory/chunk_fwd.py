"""Forward driver of the Triton HOPE memory op: the Python loop over chunks (sequential: each
chunk starts from the previous chunk's end state) launching the forward kernels, each parallel
over documents x heads (x memories)."""
from __future__ import annotations

import torch
import triton

from kernels.hope_memory.triton_utils import tape_size
from kernels.hope_memory.chunk_fwd_kernel import chunk_fwd_kernel
from kernels.hope_memory.proj_read_fwd_kernel import proj_read_fwd_kernel
from kernels.hope_memory.readout_kernel import readout_fwd_kernel


def dot_precision(q: torch.Tensor) -> str:
    """float32 inputs keep float32-accurate dots (the 1e-4 contract): 3xTF32 on tensor cores on a
    GPU ("ieee" FMA dots spill badly there), exact under the CPU interpreter; bf16/fp16 inputs
    use tf32."""
    if q.dtype != torch.float32:
        return "tf32"
    return "tf32x3" if q.is_cuda else "ieee"


def kernel_meta(q: torch.Tensor, chunk_size: int, n_mem: int, depth: int, DM: int, w1_delta: bool,
                momentum: bool) -> dict:
    """Compile-time constants shared by the forward and backward kernels."""
    return dict(CHUNK=chunk_size, BC=max(16, triton.next_power_of_2(chunk_size)), DH=q.shape[-1], DM=DM,
                DEPTH=depth, N_MEM=n_mem, DELTA1=w1_delta and depth == 2, MOM=momentum,
                PRECISION=dot_precision(q))


def n_chunks(max_seqlen: int, chunk_size: int) -> int:
    """Chunks of the longest document (at least 1, so empty inputs still give a final state)."""
    return max(1, triton.cdiv(max_seqlen, chunk_size))


def memory_groups(n_mem: int):
    """(first memory, count, IS_O) of the chunk kernels' launches: the projection memories
    (selfmod) and M_o, the last memory, whose read-out has kernels of its own."""
    return ([(0, n_mem - 1, False)] if n_mem > 1 else []) + [(n_mem - 1, 1, True)]


def new_tape(q: torch.Tensor, meta: dict, N: int, H: int, n_mem: int) -> torch.Tensor:
    """Scratch for one launch group's tapes (`triton_utils.tape_slots`), reused every chunk."""
    rows = max(1, n_mem - 1) * N * H
    return q.new_empty(rows * tape_size(meta["BC"], meta["DH"], meta["DM"]), dtype=torch.float32)


def chunk_launch(step, first, count, is_o, k, v, eta, alpha, gamma, start, grad_state, end, tape, cu, N, H, meta,
                 **flags):
    """One chunk of memories first..first+count-1: chunk-end state into `end`, the tape when flags has TAPE=True."""
    chunk_fwd_kernel[(N * H, count)](k, v, eta, alpha, gamma, *start, *grad_state, *end, tape, cu, step, N, H, first,
                                     IS_O=is_o, **meta, **flags)


def _history(x, steps):
    """(steps + 1, *x.shape) buffer with x as entry 0; None for None."""
    if x is None:
        return None
    hist = x.new_empty((steps + 1,) + tuple(x.shape))
    hist[0] = x
    return hist


def chunk_forward(q, a, k, v, eta, alpha, state, eta_w, eta_b, alpha_w, alpha_b, gamma, cu, *,
                  chunk_size, proj_chunk_size, eta_max, selfgen, w1_delta, max_seqlen, readout=True):
    """q, a, k, v: (tokens, H, d_h), eta, alpha: (tokens, H), contiguous (a for selfmod, the
    others for titans); state: float32 (w1, w2, s1, s2), each (N, n_mem, H, ., .) or None (w1 at
    depth 1, the momenta without momentum); gamma: (H,) float32 momentum logit or None; cu: (N + 1,)
    int64 offsets of the documents in the token axis. Returns o (tokens, H, d_h), the state history
    (w1, w2, s1, s2), each (n_chunks + 1, N, n_mem, H, ., .) or None, holding every chunk start (the
    last entry is the final state) and the k, v, eta, alpha the memories used (float32 for selfmod).
    max_seqlen: an int bound on the documents' lengths (the chunk count; no read of cu).
    readout=False (the backward's recomputation of the states) skips M_o's read-out: o is None."""
    tokens, H, DH = q.shape
    w2 = state[1]
    N, n_mem = w2.shape[:2]
    steps = n_chunks(max_seqlen, chunk_size)
    hist = [_history(x, steps) for x in state]
    stand = [hist[1] if x is None else x for x in hist]  # never read where absent
    if n_mem == 5:
        k = q.new_empty((tokens, H, DH), dtype=torch.float32)
        v = torch.empty_like(k)
        eta = q.new_empty((tokens, H), dtype=torch.float32)
        alpha = torch.empty_like(eta)
    o = torch.empty_like(q) if readout else None
    meta = kernel_meta(q, chunk_size, n_mem, 1 if state[0] is None else 2, w2.shape[3], w1_delta, gamma is not None)
    proj_meta = {n: x for n, x in meta.items() if n not in ("DELTA1", "MOM")}
    gamma = w2 if gamma is None else gamma
    tape = new_tape(q, meta, N, H, 1)
    proj_step = 0
    for step in range(steps):
        if n_mem == 5 and (step * chunk_size) % proj_chunk_size == 0:
            proj_step = step
            proj_read_fwd_kernel[(proj_chunk_size // chunk_size, N * H)](
                a, stand[0][step], stand[1][step], eta_w, eta_b, alpha_w, alpha_b,
                k, v, eta, alpha, cu, step, N, H, eta_max, **proj_meta)
        for first, count, is_o in memory_groups(n_mem):
            chunk_launch(step, first, count, is_o, k, v, eta, alpha, gamma, [x[step] for x in stand],
                         (stand[0][proj_step], stand[1][proj_step]), [x[step + 1] for x in stand], tape, cu, N, H,
                         meta, SELFGEN=selfgen, TAPE=readout and is_o)
        if readout:
            readout_fwd_kernel[(N * H,)](k, eta, alpha, gamma, q, o, *(x[step] for x in stand), tape, cu, step, N, H,
                                         **meta)
    return o, hist, (k, v, eta, alpha)
