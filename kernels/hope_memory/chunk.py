"""Triton path of the HOPE memory op (docs/model.md section 2): `chunk_hope_memory`, the entry
point of `hope_memory(..., impl="triton")`. It has no checks of its own: `hope_memory` validates
every input once, the Triton limits included (kernels/hope_memory/__init__.py, `_check_triton`).

The op is registered as two torch.library custom ops (`hope_dist::hope_memory_fwd` / `_bwd`,
joined by register_autograd, which makes the autograd.Function), so torch.compile keeps it
in the graph as one opaque node. The forward saves only its inputs; the backward recomputes the
chunk-start states (chunk_fwd.py without the read-out) and runs the chunk loop in reverse
(chunk_bwd.py): the (C x C) solves and every per-token piece are recomputed from the chunk-start
state in the backward's kernels, which costs one more chunk forward and saves the float32 history of
T/C states per layer between the forward and the backward. Packed documents (`cu_seqlens`) run as
a batch of documents whose chunks are counted from each document's start. No host sync: the chunk
count comes from `max_seqlen` (an int that `hope_memory` takes or computes from the host offsets),
never from reading `cu_seqlens`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kernels.hope_memory.chunk_bwd import memory_backward
from kernels.hope_memory.chunk_fwd import chunk_forward
from kernels.hope_memory.common import initial_memory_state
from kernels.hope_memory.types import MemoryParams, MemoryState


def _flat(x):
    """(B, T, ...) -> contiguous (B * T, ...), the kernels' token layout."""
    return None if x is None else x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).contiguous()


def _f32(x):
    return None if x is None else x.float().contiguous()


def _empty_or(x, like):
    """x, or an empty float32 tensor where the state has no such part (fake and real ops agree)."""
    return like.new_empty(0, dtype=torch.float32) if x is None else x


@torch.library.custom_op("hope_dist::hope_memory_fwd", mutates_args=())
def _forward_op(q: Tensor, a: Tensor | None, k: Tensor | None, v: Tensor | None, eta: Tensor | None,
                alpha: Tensor | None, w1: Tensor | None, w2: Tensor, s1: Tensor | None, s2: Tensor | None,
                eta_w: Tensor | None, eta_b: Tensor | None, alpha_w: Tensor | None, alpha_b: Tensor | None,
                gamma: Tensor | None, cu: Tensor, chunk_size: int, proj_chunk_size: int, eta_max: float,
                selfgen: bool, stopgrad_vhat: bool, w1_delta: bool, max_seqlen: int
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """o (B, T, H, d_h) and the float32 final state (w1, w2, s1, s2), an empty tensor for a part
    the state does not have. stopgrad_vhat is only for the backward."""
    o, hist, _ = chunk_forward(
        *map(_flat, (q, a, k, v, eta, alpha)), tuple(map(_f32, (w1, w2, s1, s2))),
        *map(_f32, (eta_w, eta_b, alpha_w, alpha_b, gamma)), cu, chunk_size=chunk_size,
        proj_chunk_size=proj_chunk_size, eta_max=eta_max, selfgen=selfgen, w1_delta=w1_delta, max_seqlen=max_seqlen)
    return (o.view(q.shape), *(_empty_or(None if x is None else x[-1].clone(), q) for x in hist))


@_forward_op.register_fake
def _(q, a, k, v, eta, alpha, w1, w2, s1, s2, *rest):
    return (torch.empty_like(q), *(_empty_or(None if x is None else x.new_empty(x.shape, dtype=torch.float32), q)
                                   for x in (w1, w2, s1, s2)))


@torch.library.custom_op("hope_dist::hope_memory_bwd", mutates_args=())
def _backward_op(do: Tensor, dw1_final: Tensor, dw2_final: Tensor, ds1_final: Tensor, ds2_final: Tensor,
                 q: Tensor, a: Tensor | None, k: Tensor | None, v: Tensor | None, eta: Tensor | None,
                 alpha: Tensor | None, w1: Tensor | None, w2: Tensor, s1: Tensor | None, s2: Tensor | None,
                 eta_w: Tensor | None, eta_b: Tensor | None, alpha_w: Tensor | None, alpha_b: Tensor | None,
                 gamma: Tensor | None, cu: Tensor, chunk_size: int, proj_chunk_size: int, eta_max: float,
                 selfgen: bool, stopgrad_vhat: bool, w1_delta: bool, max_seqlen: int) -> list[Tensor]:
    """Gradients of (q, a, k, v, eta, alpha, w1, w2, s1, s2, eta_w, eta_b, alpha_w, alpha_b, gamma)
    in their dtypes and shapes; an input that is None gets an empty tensor. d*_final: the final
    state's gradients (empty: none). Recomputes the chunk-start states (one forward without the
    read-out) instead of saving them."""
    inputs = (q, a, k, v, eta, alpha, w1, w2, s1, s2, eta_w, eta_b, alpha_w, alpha_b, gamma)
    flat, state, weights = list(map(_flat, inputs[:6])), tuple(map(_f32, inputs[6:10])), list(map(_f32, inputs[10:]))
    opts = dict(chunk_size=chunk_size, proj_chunk_size=proj_chunk_size, eta_max=eta_max, selfgen=selfgen,
                w1_delta=w1_delta)
    _, hist, kvea = chunk_forward(*flat, state, *weights, cu, readout=False, max_seqlen=max_seqlen, **opts)
    finals = tuple(None if g.numel() == 0 else g for g in (dw1_final, dw2_final, ds1_final, ds2_final))
    grads = memory_backward(do.reshape(flat[0].shape), finals, flat[0], flat[1], kvea, hist, *weights, cu,
                            stopgrad_vhat=stopgrad_vhat, **opts)
    return [do.new_empty(0) if x is None else g.reshape(x.shape).to(x.dtype) for g, x in zip(grads, inputs)]


@_backward_op.register_fake
def _(do, dw1_final, dw2_final, ds1_final, ds2_final, *inputs_and_config):
    inputs = inputs_and_config[:15]
    return [do.new_empty(0) if x is None else torch.empty_like(x) for x in inputs]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:16])
    ctx.config = inputs[16:]


def _backward(ctx, do, *d_final):
    *tensors, cu = ctx.saved_tensors
    d_final = [do.new_empty(0) if g is None else g for g in d_final]
    grads = _backward_op(do, *d_final, *tensors, cu, *ctx.config)
    return (*(None if x is None else g for g, x in zip(grads, tensors)), None, *[None] * len(ctx.config))


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def chunk_hope_memory(q, params: MemoryParams, *, a=None, k=None, v=None, eta=None, alpha=None,
                      initial_state: MemoryState | None = None, output_final_state=False,
                      cu_seqlens=None, max_seqlen=None, chunk_size=64, proj_chunk_size=64,
                      eta_max=1.0, selfgen=True, stopgrad_vhat=True, w1_delta=True):
    """Triton HOPE memory op; same contract as `kernels.hope_memory.hope_memory`, which validates
    the arguments and calls this (call that, not this: nothing is checked here). The final state is
    float32 whatever the input dtype. With cu_seqlens, max_seqlen (an int, the longest document)
    sets the chunk count."""
    B, T = q.shape[:2]
    if cu_seqlens is None:
        N = B
        cu = torch.arange(0, (B + 1) * T, T, device=q.device, dtype=torch.int64)
        max_seqlen = T
    else:
        N = cu_seqlens.numel() - 1
        cu = cu_seqlens.to(device=q.device, dtype=torch.int64)
    state = initial_state if initial_state is not None else initial_memory_state(params, N)
    outs = _forward_op(
        q, a, k, v, eta, alpha, *state, params.eta_w, params.eta_b, params.alpha_w, params.alpha_b, params.gamma,
        cu, chunk_size, proj_chunk_size, float(eta_max), bool(selfgen) and a is not None, bool(stopgrad_vhat),
        bool(w1_delta) and params.w1 is not None, int(max_seqlen))
    if not output_final_state:
        return outs[0], None
    return outs[0], MemoryState(*(None if x is None else f for f, x in zip(outs[1:], state)))
