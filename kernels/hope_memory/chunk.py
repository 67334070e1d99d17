"""Triton path of the HOPE memory op (HOPE_SPEC section 2): `chunk_hope_memory`, the entry
point of `hope_memory(..., impl="triton")`, with input checks that name the problem.

The op is registered as two torch.library custom ops (`hope_dist::hope_memory_fwd` / `_bwd`,
joined by register_autograd, which makes the autograd.Function), so torch.compile keeps it
in the graph as one opaque node. The forward saves only its inputs; the backward recomputes the
chunk-start states (chunk_fwd.py without the read-out) and runs the chunk loop in reverse
(chunk_bwd.py). Packed documents (`cu_seqlens`) run as a batch of documents whose chunks are
counted from each document's start. No host sync: the chunk count comes from `max_seqlen` (an
int, given or computed from host offsets `cu_seqlens_cpu`), never from reading `cu_seqlens`.
"""
from __future__ import annotations

import torch
from torch import Tensor

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


def _validate(q, params, a, k, v, eta, alpha, initial_state, cu_seqlens, cu_seqlens_cpu, chunk, proj_chunk):
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
        if not torch.compiler.is_compiling():  # reading the values would break the graph
            cu = (cu_seqlens_cpu if cu_seqlens_cpu is not None else cu_seqlens.cpu()).tolist()
            _check(cu[0] == 0 and cu[-1] == T and all(e >= s for s, e in zip(cu[:-1], cu[1:])),
                   f"cu_seqlens must rise from 0 to T = {T}, got {cu}")
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


def _flat(x):
    """(B, T, ...) -> contiguous (B * T, ...), the kernels' token layout."""
    return None if x is None else x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).contiguous()


def _f32(x):
    return None if x is None else x.float().contiguous()


@torch.library.custom_op("hope_dist::hope_memory_fwd", mutates_args=())
def _forward_op(q: Tensor, a: Tensor | None, k: Tensor | None, v: Tensor | None, eta: Tensor | None,
                alpha: Tensor | None, w1: Tensor | None, w2: Tensor, eta_w: Tensor | None,
                eta_b: Tensor | None, alpha_w: Tensor | None, alpha_b: Tensor | None, cu: Tensor,
                chunk: int, proj_chunk: int, eta_max: float, selfgen: bool,
                stopgrad_vhat: bool, max_seqlen: int) -> tuple[Tensor, Tensor, Tensor]:
    """o (B, T, H, d_h) and the float32 final state w1 (empty at depth 1), w2. stopgrad_vhat is
    only for the backward."""
    o, hist_w1, hist_w2, _ = memory_forward(
        *map(_flat, (q, a, k, v, eta, alpha)), *map(_f32, (w1, w2, eta_w, eta_b, alpha_w, alpha_b)), cu,
        chunk=chunk, proj_chunk=proj_chunk, eta_max=eta_max, selfgen=selfgen, max_seqlen=max_seqlen)
    w1_final = w2.new_empty(0, dtype=torch.float32) if hist_w1 is None else hist_w1[-1].clone()
    return o.view(q.shape), w1_final, hist_w2[-1].clone()


@_forward_op.register_fake
def _(q, a, k, v, eta, alpha, w1, w2, eta_w, eta_b, alpha_w, alpha_b, cu, *config):
    w1_final = w2.new_empty(0, dtype=torch.float32) if w1 is None else w1.new_empty(w1.shape, dtype=torch.float32)
    return torch.empty_like(q), w1_final, w2.new_empty(w2.shape, dtype=torch.float32)


@torch.library.custom_op("hope_dist::hope_memory_bwd", mutates_args=())
def _backward_op(do: Tensor, dw1_final: Tensor | None, dw2_final: Tensor | None, q: Tensor,
                 a: Tensor | None, k: Tensor | None, v: Tensor | None, eta: Tensor | None,
                 alpha: Tensor | None, w1: Tensor | None, w2: Tensor, eta_w: Tensor | None,
                 eta_b: Tensor | None, alpha_w: Tensor | None, alpha_b: Tensor | None, cu: Tensor,
                 chunk: int, proj_chunk: int, eta_max: float, selfgen: bool,
                 stopgrad_vhat: bool, max_seqlen: int) -> list[Tensor]:
    """Gradients of (q, a, k, v, eta, alpha, w1, w2, eta_w, eta_b, alpha_w, alpha_b) in their
    dtypes and shapes; an input that is None gets an empty tensor. Recomputes the chunk-start
    states (one forward without the read-out) instead of saving them."""
    inputs = (q, a, k, v, eta, alpha, w1, w2, eta_w, eta_b, alpha_w, alpha_b)
    flat, weights = list(map(_flat, inputs[:6])), list(map(_f32, inputs[6:]))
    opts = dict(chunk=chunk, proj_chunk=proj_chunk, eta_max=eta_max, selfgen=selfgen)
    _, hist_w1, hist_w2, kvea = memory_forward(*flat, *weights, cu, readout=False, max_seqlen=max_seqlen, **opts)
    grads = memory_backward(
        do.reshape(flat[0].shape), None if dw1_final is None or w1 is None else dw1_final, dw2_final,
        flat[0], flat[1], kvea, hist_w1, hist_w2, *weights[2:], cu, stopgrad_vhat=stopgrad_vhat, **opts)
    return [do.new_empty(0) if x is None else g.reshape(x.shape).to(x.dtype) for g, x in zip(grads, inputs)]


@_backward_op.register_fake
def _(do, dw1_final, dw2_final, q, a, k, v, eta, alpha, w1, w2, eta_w, eta_b, alpha_w, alpha_b, cu, *config):
    return [do.new_empty(0) if x is None else torch.empty_like(x)
            for x in (q, a, k, v, eta, alpha, w1, w2, eta_w, eta_b, alpha_w, alpha_b)]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:13])
    ctx.config = inputs[13:]


def _backward(ctx, do, dw1_final, dw2_final):
    *tensors, cu = ctx.saved_tensors
    grads = _backward_op(do, dw1_final, dw2_final, *tensors, cu, *ctx.config)
    return (*(None if x is None else g for g, x in zip(grads, tensors)), None, *[None] * len(ctx.config))


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def chunk_hope_memory(q, params: MemoryParams, *, a=None, k=None, v=None, eta=None, alpha=None,
                      initial_state: MemoryState | None = None, output_final_state=False,
                      cu_seqlens=None, cu_seqlens_cpu=None, max_seqlen=None, chunk=64, proj_chunk=64,
                      eta_max=1.0, selfgen=True, stopgrad_vhat=True, w1_delta=True):
    """Triton HOPE memory op; same contract as `kernels.hope_memory.hope_memory` (momentum and
    W1's delta rule excepted: call it with w1_delta=False at depth 2). The final state is float32 whatever the input dtype. max_seqlen (the longest
    document) sets the chunk count; when None it comes from the host offsets cu_seqlens_cpu (or,
    one sync, from a copy of cu_seqlens)."""
    N, depth, _ = _validate(q, params, a, k, v, eta, alpha, initial_state, cu_seqlens, cu_seqlens_cpu,
                            chunk, proj_chunk)
    if depth == 2 and w1_delta:
        raise NotImplementedError(
            "chunk_hope_memory: W1's delta rule (w1_delta=True, the default) is not implemented in the "
            'Triton kernels yet; call hope_memory(..., impl="torch"), or w1_delta=False for the gated update')
    B, T = q.shape[:2]
    if cu_seqlens is None:
        cu = torch.arange(0, (B + 1) * T, T, device=q.device, dtype=torch.int64)
        max_seqlen = T
    else:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int64)
        if max_seqlen is None:
            host = cu_seqlens_cpu if cu_seqlens_cpu is not None else cu_seqlens.cpu()
            max_seqlen = int(host.diff().max())
    if initial_state is None:
        w2 = params.w2.unsqueeze(0).expand(N, *params.w2.shape)
        w1 = None if depth == 1 else params.w1.unsqueeze(0).expand(N, *params.w1.shape)
    else:
        w1, w2 = initial_state.w1, initial_state.w2
    o, w1_final, w2_final = _forward_op(
        q, a, k, v, eta, alpha, w1, w2, params.eta_w, params.eta_b, params.alpha_w, params.alpha_b, cu,
        chunk, proj_chunk, float(eta_max), bool(selfgen) and a is not None, bool(stopgrad_vhat), int(max_seqlen))
    if not output_final_state:
        return o, None
    return o, MemoryState(None if depth == 1 else w1_final, w2_final)
