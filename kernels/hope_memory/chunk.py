"""Triton path of the HOPE memory op (HOPE_SPEC section 2): the autograd Function and
`chunk_hope_memory`, the entry point of `hope_memory(..., impl="triton")`.

The recurrence is sequential over chunks and parallel over (document, head, memory): a Python
loop over chunks launches, at every proj-chunk boundary, `proj_read_fwd_kernel` (k, v, eta, alpha
of the whole proj-chunk from the projection memories' chunk-start state) and, every chunk,
`chunk_fwd_kernel` (targets, gradients, WY solve, chunk-end state, M_o's read-out). Packed
batches (`cu_seqlens`) run as documents: every chunk index is counted from its document's start.
"""
from __future__ import annotations

import torch

from kernels.hope_memory.chunk_bwd import memory_backward
from kernels.hope_memory.chunk_fwd import memory_forward
from kernels.hope_memory.types import MemoryParams, MemoryState

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"chunk_hope_memory: {msg}")


def _check_tokens(name: str, x: torch.Tensor | None, shape: tuple, device: torch.device) -> None:
    _check(x is not None, f"`{name}` is required for this memory configuration")
    _check(tuple(x.shape) == shape, f"`{name}` has shape {tuple(x.shape)}, expected {shape}")
    _check(x.dtype in _FLOAT_DTYPES, f"`{name}` has dtype {x.dtype}; use float32, bfloat16 or float16")
    _check(x.device == device, f"`{name}` is on {x.device} but q is on {device}; move it")


def _validate(q, params, a, k, v, eta, alpha, initial_state, cu_seqlens, chunk, proj_chunk):
    """Shape/dtype/device checks with errors that say what to change; returns (N, depth, d_m)."""
    _check(q.dim() == 4, f"q must be (B, T, H, d_h), got shape {tuple(q.shape)}")
    B, T, H, DH = q.shape
    _check(q.dtype in _FLOAT_DTYPES, f"q has dtype {q.dtype}; use float32, bfloat16 or float16")
    if params.gamma is not None:
        raise NotImplementedError(
            "chunk_hope_memory: Titans momentum (params.gamma) is not implemented in the Triton "
            'kernels; call hope_memory(..., impl="torch") for momentum')
    for name, d in (("d_h", DH), ("d_m", params.w2.shape[2] if params.w1 is not None else DH)):
        _check(d >= 16 and d & (d - 1) == 0,
               f"{name} = {d}: the Triton kernels need a power of two >= 16; use impl=\"torch\"")
    n_mem = params.w2.shape[0]
    _check(n_mem in (1, 5), f"params.w2 stacks {n_mem} memories; expected 5 (selfmod) or 1 (titans)")
    depth = 1 if params.w1 is None else 2
    DM = params.w2.shape[2] if depth == 2 else DH
    w2_shape = (n_mem, H, DM, DH)
    _check(tuple(params.w2.shape) == w2_shape,
           f"params.w2 has shape {tuple(params.w2.shape)}, expected {w2_shape}")
    if depth == 2:
        _check(tuple(params.w1.shape) == (n_mem, H, DH, DM),
               f"params.w1 has shape {tuple(params.w1.shape)}, expected {(n_mem, H, DH, DM)}")
    _check(chunk >= 1, f"chunk = {chunk} must be >= 1")
    _check(proj_chunk >= chunk and proj_chunk % chunk == 0,
           f"proj_chunk = {proj_chunk} must be a positive multiple of chunk = {chunk}")
    if n_mem == 5:
        _check_tokens("a", a, (B, T, H, DH), q.device)
        for name in ("eta_w", "alpha_w"):
            t = getattr(params, name)
            _check(t is not None and tuple(t.shape) == (H, DH), f"params.{name} must be (H, d_h) = {(H, DH)}")
        for name in ("eta_b", "alpha_b"):
            t = getattr(params, name)
            _check(t is not None and tuple(t.shape) == (H,), f"params.{name} must be (H,) = {(H,)}")
    else:
        _check_tokens("k", k, (B, T, H, DH), q.device)
        _check_tokens("v", v, (B, T, H, DH), q.device)
        _check_tokens("eta", eta, (B, T, H), q.device)
        _check_tokens("alpha", alpha, (B, T, H), q.device)
    if cu_seqlens is None:
        N = B
    else:
        _check(B == 1, f"with cu_seqlens the batch must be 1 (packed), got B = {B}")
        _check(cu_seqlens.dim() == 1 and cu_seqlens.numel() >= 2 and not cu_seqlens.is_floating_point(),
               "cu_seqlens must be an integer tensor (N + 1,) of document offsets")
        _check(int(cu_seqlens[0]) == 0 and int(cu_seqlens[-1]) == T and bool((cu_seqlens.diff() >= 0).all()),
               f"cu_seqlens must rise from 0 to T = {T}, got {cu_seqlens.tolist()}")
        N = cu_seqlens.numel() - 1
    if initial_state is not None:
        _check(initial_state.s1 is None and initial_state.s2 is None,
               "initial_state carries momenta; the Triton kernels have no momentum, use impl=\"torch\"")
        _check(tuple(initial_state.w2.shape) == (N,) + w2_shape,
               f"initial_state.w2 has shape {tuple(initial_state.w2.shape)}, expected {(N,) + w2_shape}")
        if depth == 2:
            _check(initial_state.w1 is not None and tuple(initial_state.w1.shape) == (N, n_mem, H, DH, DM),
                   f"initial_state.w1 must be {(N, n_mem, H, DH, DM)}")
    return N, depth, DM


class HopeMemoryFunction(torch.autograd.Function):
    """Triton forward and backward. Inputs are the public tensors with the initial state w1/w2
    already (N, n_mem, H, ., .); returns o, final w1 (None at depth 1), final w2. Saves only the
    chunk-start states (and selfmod's k, v, eta, alpha): the backward recomputes the rest."""

    @staticmethod
    def forward(ctx, q, a, k, v, eta, alpha, w1, w2, eta_w, eta_b, alpha_w, alpha_b, cu_seqlens, config):
        chunk, proj_chunk, eta_max, selfgen, _ = config
        B, T, H, DH = q.shape
        if cu_seqlens is None:
            cu = torch.arange(0, (B + 1) * T, T, device=q.device, dtype=torch.int64)
        else:
            cu = cu_seqlens.to(device=q.device, dtype=torch.int64).contiguous()
        flat = [None if x is None else x.reshape(B * T, *x.shape[2:]).contiguous() for x in (q, a, k, v, eta, alpha)]
        weights = [None if x is None else x.float().contiguous() for x in (w1, w2, eta_w, eta_b, alpha_w, alpha_b)]
        o, hist_w1, hist_w2, kvea = memory_forward(
            *flat, *weights, cu, chunk=chunk, proj_chunk=proj_chunk, eta_max=eta_max, selfgen=selfgen)
        ctx.save_for_backward(flat[0], flat[1], *kvea, hist_w1, hist_w2, *weights[2:], cu)
        ctx.config = config
        ctx.shapes = [None if x is None else (x.shape, x.dtype) for x in (q, a, k, v, eta, alpha, w1, w2,
                                                                       eta_w, eta_b, alpha_w, alpha_b)]
        return o.view(B, T, H, DH), None if hist_w1 is None else hist_w1[-1].clone(), hist_w2[-1].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dw1_final, dw2_final):
        chunk, proj_chunk, eta_max, selfgen, stopgrad_vhat = ctx.config
        q, a, k, v, eta, alpha, hist_w1, hist_w2, eta_w, eta_b, alpha_w, alpha_b, cu = ctx.saved_tensors
        grads = memory_backward(
            do, dw1_final, dw2_final, q, a, (k, v, eta, alpha), hist_w1, hist_w2, eta_w, eta_b,
            alpha_w, alpha_b, cu, chunk=chunk, proj_chunk=proj_chunk, eta_max=eta_max,
            selfgen=selfgen, stopgrad_vhat=stopgrad_vhat)
        out = [None if g is None or sd is None or not need else g.reshape(sd[0]).to(sd[1])
               for g, sd, need in zip(grads, ctx.shapes, ctx.needs_input_grad)]
        return (*out, None, None)


def chunk_hope_memory(q, params: MemoryParams, *, a=None, k=None, v=None, eta=None, alpha=None,
                      initial_state: MemoryState | None = None, output_final_state=False,
                      cu_seqlens=None, chunk=64, proj_chunk=64, eta_max=1.0, selfgen=True,
                      stopgrad_vhat=True):
    """Triton HOPE memory op; same contract as `kernels.hope_memory.hope_memory`."""
    N, depth, DM = _validate(q, params, a, k, v, eta, alpha, initial_state, cu_seqlens, chunk, proj_chunk)
    if initial_state is None:
        w2 = params.w2.unsqueeze(0).expand(N, *params.w2.shape)
        w1 = None if depth == 1 else params.w1.unsqueeze(0).expand(N, *params.w1.shape)
    else:
        w1, w2 = initial_state.w1, initial_state.w2
    o, w1_final, w2_final = HopeMemoryFunction.apply(
        q, a, k, v, eta, alpha, w1, w2, params.eta_w, params.eta_b, params.alpha_w, params.alpha_b,
        cu_seqlens, (chunk, proj_chunk, float(eta_max), bool(selfgen) and a is not None, bool(stopgrad_vhat)))
    final = MemoryState(w1_final, w2_final) if output_final_state else None
    return o, final
