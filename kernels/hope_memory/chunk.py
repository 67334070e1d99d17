"""Triton path of the HOPE memory op (docs/model.md section 2): `chunk_hope_memory`, the entry
point of `hope_memory(..., impl="triton")`. It has no checks of its own: `hope_memory` validates
every input once, the Triton limits included (kernels/hope_memory/__init__.py, `_check_triton`).

The op is registered as two torch.library custom ops (`hope_dist::hope_memory_fwd` / `_bwd`,
joined by register_autograd, which makes the autograd.Function), so torch.compile keeps it
in the graph as one opaque node. The forward saves only its inputs; the backward recomputes the
chunk-start states (chunk_fwd.py without the read-out) and runs the chunk loop in reverse
(chunk_bwd.py). Packed documents (`cu_seqlens`) run as a batch of documents whose chunks are
counted from each document's start. No host sync: the chunk count comes from `max_seqlen` (an
int that `hope_memory` takes or computes from the host offsets), never from reading `cu_seqlens`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kernels.hope_memory.chunk_bwd import memory_backward
from kernels.hope_memory.chunk_fwd import chunk_forward
from kernels.hope_memory.types import MemoryParams, MemoryState


def _flat(x):
    """(B, T, ...) -> contiguous (B * T, ...), the kernels' token layout."""
    return None if x is None else x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).contiguous()


def _f32(x):
    return None if x is None else x.float().contiguous()


@torch.library.custom_op("hope_dist::hope_memory_fwd", mutates_args=())
def _forward_op(q: Tensor, a: Tensor | None, k: Tensor | None, v: Tensor | None, eta: Tensor | None,
                alpha: Tensor | None, w1: Tensor | None, w2: Tensor, eta_w: Tensor | None,
                eta_b: Tensor | None, alpha_w: Tensor | None, alpha_b: Tensor | None, cu: Tensor,
                chunk_size: int, proj_chunk_size: int, eta_max: float, selfgen: bool,
                stopgrad_vhat: bool, max_seqlen: int) -> tuple[Tensor, Tensor, Tensor]:
    """o (B, T, H, d_h) and the float32 final state w1 (empty at depth 1), w2. stopgrad_vhat is
    only for the backward."""
    o, hist_w1, hist_w2, _ = chunk_forward(
        *map(_flat, (q, a, k, v, eta, alpha)), *map(_f32, (w1, w2, eta_w, eta_b, alpha_w, alpha_b)), cu,
        chunk_size=chunk_size, proj_chunk_size=proj_chunk_size, eta_max=eta_max, selfgen=selfgen, max_seqlen=max_seqlen)
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
                 chunk_size: int, proj_chunk_size: int, eta_max: float, selfgen: bool,
                 stopgrad_vhat: bool, max_seqlen: int) -> list[Tensor]:
    """Gradients of (q, a, k, v, eta, alpha, w1, w2, eta_w, eta_b, alpha_w, alpha_b) in their
    dtypes and shapes; an input that is None gets an empty tensor. Recomputes the chunk-start
    states (one forward without the read-out) instead of saving them."""
    inputs = (q, a, k, v, eta, alpha, w1, w2, eta_w, eta_b, alpha_w, alpha_b)
    flat, weights = list(map(_flat, inputs[:6])), list(map(_f32, inputs[6:]))
    opts = dict(chunk_size=chunk_size, proj_chunk_size=proj_chunk_size, eta_max=eta_max, selfgen=selfgen)
    _, hist_w1, hist_w2, kvea = chunk_forward(*flat, *weights, cu, readout=False, max_seqlen=max_seqlen, **opts)
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
                      cu_seqlens=None, max_seqlen=None, chunk_size=64, proj_chunk_size=64,
                      eta_max=1.0, selfgen=True, stopgrad_vhat=True):
    """Triton HOPE memory op; same contract as `kernels.hope_memory.hope_memory`, which validates
    the arguments and calls this (call that, not this: nothing is checked here). No momentum, and
    at depth 2 only W1's gated update (hope_memory's w1_delta=False; there is no other). The final
    state is float32 whatever the input dtype. With cu_seqlens, max_seqlen (an int, the longest
    document) sets the chunk count."""
    depth = 1 if params.w1 is None else 2
    B, T = q.shape[:2]
    if cu_seqlens is None:
        N = B
        cu = torch.arange(0, (B + 1) * T, T, device=q.device, dtype=torch.int64)
        max_seqlen = T
    else:
        N = cu_seqlens.numel() - 1
        cu = cu_seqlens.to(device=q.device, dtype=torch.int64)
    if initial_state is None:
        w2 = params.w2.unsqueeze(0).expand(N, *params.w2.shape)
        w1 = None if depth == 1 else params.w1.unsqueeze(0).expand(N, *params.w1.shape)
    else:
        w1, w2 = initial_state.w1, initial_state.w2
    o, w1_final, w2_final = _forward_op(
        q, a, k, v, eta, alpha, w1, w2, params.eta_w, params.eta_b, params.alpha_w, params.alpha_b, cu,
        chunk_size, proj_chunk_size, float(eta_max), bool(selfgen) and a is not None, bool(stopgrad_vhat),
        int(max_seqlen))
    if not output_final_state:
        return o, None
    return o, MemoryState(None if depth == 1 else w1_final, w2_final)
