"""Backward driver of the Triton HOPE memory op: the chunk loop in reverse. Each chunk's kernels
recompute that chunk from its chunk-start state (recomputed by the caller): the chunk kernel writes
the tape of solved rows, M_o's read-out backward its gradient parts, and the backward chunk kernel
turns those and the gradient of the end state into the gradient of its start state (three kernels,
not one, to fit an H100's shared memory: docs/triton.md); at every proj-chunk start the
projection-read kernel turns the chunk kernels' k, v, eta, alpha gradients into gradients of a,
of the projection memories' state and of eta_w/eta_b/alpha_w/alpha_b."""
from __future__ import annotations

import torch

from kernels.hope_memory.chunk_fwd import chunk_launch, kernel_meta, memory_groups, new_tape
from kernels.hope_memory.chunk_bwd_kernel import chunk_bwd_kernel
from kernels.hope_memory.proj_read_bwd_kernel import proj_read_bwd_kernel
from kernels.hope_memory.readout_kernel import read_grad_size, readout_bwd_kernel


def _zeros_or(x, like):
    return torch.zeros_like(like) if x is None else x.float().contiguous().clone()


def _proj_buffers(q, hist, n_sub, N, H, DH):
    """Per-(sub-chunk, document) partial gradients of the projection memories' state and read-outs."""
    part = tuple(None if x is None else x.new_empty((n_sub, N, 4) + tuple(x.shape[3:])) for x in hist[:2])
    return (part[1] if part[0] is None else part[0], part[1], q.new_empty((n_sub, N, H, 2, DH), dtype=torch.float32),
            q.new_empty((n_sub, N, H, 2), dtype=torch.float32))


def memory_backward(do, finals, q, a, kvea, hist, eta_w, eta_b, alpha_w, alpha_b, gamma, cu, *, chunk_size,
                    proj_chunk_size, eta_max, selfgen, stopgrad_vhat, w1_delta):
    """Arguments as `chunk_forward` took and returned them (kvea: the k, v, eta, alpha it
    returned; hist: its state history), plus the gradients of o (tokens, H, d_h) and of the final
    state (w1, w2, s1, s2; None: unused). Returns float32 gradients (dq, da, dk, dv, deta, dalpha,
    dw1, dw2, ds1, ds2, deta_w, deta_b, dalpha_w, dalpha_b, dgamma), None where the input does not
    exist (titans has no a, selfmod no k...)."""
    k, v, eta, alpha = kvea
    tokens, H, DH = q.shape
    steps = hist[1].shape[0] - 1
    N, n_mem = hist[1].shape[1:3]
    selfmod, momentum = n_mem == 5, gamma is not None
    meta = kernel_meta(q, chunk_size, n_mem, 1 if hist[0] is None else 2, hist[1].shape[4], w1_delta, momentum)
    proj_meta = {n: x for n, x in meta.items() if n not in ("DELTA1", "MOM")}
    stand = [hist[1] if x is None else x for x in hist]  # never read where absent
    grads = [None if x is None else _zeros_or(g, x[0]) for g, x in zip(finals, hist)]
    d_state = [grads[1] if g is None else g for g in grads]
    dw1c, dw2c = torch.zeros_like(d_state[0]), torch.zeros_like(d_state[1])
    do = do.reshape(tokens, H, DH).contiguous()
    dq = torch.zeros((tokens, H, DH), dtype=torch.float32, device=q.device)
    dk, dv = (torch.empty((n_mem, tokens, H, DH), dtype=torch.float32, device=q.device) for _ in range(2))
    deta, dalpha = (torch.empty((n_mem, tokens, H), dtype=torch.float32, device=q.device) for _ in range(2))
    dgamma = q.new_zeros((N, n_mem, H), dtype=torch.float32)
    selfgen = selfgen and selfmod
    gamma_or = stand[1] if gamma is None else gamma
    tape = new_tape(q, meta, N, H, n_mem)
    rgrad = q.new_empty(N * H * read_grad_size(meta["BC"], DH, meta["DM"]), dtype=torch.float32)
    if selfmod:
        n_sub = proj_chunk_size // chunk_size
        da = torch.empty((tokens, H, DH), dtype=torch.float32, device=q.device)
        part_w1, part_w2, part_vec, part_bias = _proj_buffers(q, hist, n_sub, N, H, DH)
        dvec, dbias = q.new_zeros((H, 2, DH), dtype=torch.float32), q.new_zeros((H, 2), dtype=torch.float32)
    for step in reversed(range(steps)):
        proj_step = step - (step * chunk_size % proj_chunk_size) // chunk_size if selfmod else step
        for first, count, is_o in memory_groups(n_mem):
            start, grad_state = [x[step] for x in stand], (stand[0][proj_step], stand[1][proj_step])
            chunk_launch(step, first, count, is_o, k, v, eta, alpha, gamma_or, start, grad_state,
                         [x[step + 1] for x in stand], tape, cu, N, H, meta, SELFGEN=selfgen, TAPE=True)
            if is_o:
                readout_bwd_kernel[(N * H,)](k, eta, alpha, gamma_or, q, do, dq, *start, tape, rgrad, cu, step, N, H,
                                            **meta)
            chunk_bwd_kernel[(N * H, count)](
                k, v, eta, alpha, gamma_or, *start, *grad_state, *d_state, dw1c, dw2c, dk, dv, deta, dalpha, dgamma,
                tape, rgrad, cu, step, N, H, tokens, first, SELFGEN=selfgen, V_GRAD=not (selfgen and stopgrad_vhat),
                IS_O=is_o, **meta)
        if selfmod and step == proj_step:
            proj_read_bwd_kernel[(n_sub, N * H)](
                a, stand[0][step], stand[1][step], eta_w, eta_b, alpha_w, alpha_b,
                dk, dv, deta, dalpha, da, part_w1, part_w2, part_vec, part_bias, cu,
                step, N, H, tokens, eta_max, **proj_meta)
            for d, dc, part in ((d_state[1], dw2c, part_w2), (grads[0], dw1c, part_w1)):
                if d is not None:
                    d[:, :4] += dc[:, :4] + part.sum(0)
                    dc.zero_()
            dvec += part_vec.sum((0, 1))
            dbias += part_bias.sum((0, 1))
    dgamma = dgamma.sum((0, 1)) if momentum else None
    if selfmod:
        return (dq, da, None, None, None, None, *grads, dvec[:, 0].clone(), dbias[:, 0].clone(),
                dvec[:, 1].clone(), dbias[:, 1].clone(), dgamma)
    return (dq, None, dk[0], dv[0], deta[0], dalpha[0], *grads, None, None, None, None, dgamma)
