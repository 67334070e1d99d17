"""Backward driver of the Triton HOPE memory op: the chunk loop in reverse. Each chunk's kernel
recomputes that chunk from its chunk-start state (recomputed by the caller) and turns the gradient of its end state
into the gradient of its start state; at every proj-chunk start the projection-read kernel
turns the chunk kernels' k, v, eta, alpha gradients into gradients of a, of the projection
memories' state and of eta_w/eta_b/alpha_w/alpha_b."""
from __future__ import annotations

import torch

from kernels.hope_memory.chunk_fwd import kernel_meta
from kernels.hope_memory.triton_bwd import chunk_bwd_kernel
from kernels.hope_memory.triton_proj_bwd import proj_read_bwd_kernel


def _zeros_or(x, like):
    return torch.zeros_like(like) if x is None else x.float().contiguous().clone()


def memory_backward(do, dw1_final, dw2_final, q, a, kvea, hist_w1, hist_w2, eta_w, eta_b, alpha_w,
                    alpha_b, cu, *, chunk_size, proj_chunk_size, eta_max, selfgen, stopgrad_vhat):
    """Arguments as `chunk_forward` took and returned them (kvea: the k, v, eta, alpha it
    returned), plus the gradients of o (tokens, H, d_h) and of the final state (None: unused).
    Returns float32 gradients (dq, da, dk, dv, deta, dalpha, dw1, dw2, deta_w, deta_b,
    dalpha_w, dalpha_b), None where the input does not exist (titans has no a, selfmod no k...)."""
    k, v, eta, alpha = kvea
    tokens, H, DH = q.shape
    steps = hist_w2.shape[0] - 1
    N, n_mem = hist_w2.shape[1:3]
    depth = 1 if hist_w1 is None else 2
    hist_w1 = hist_w2 if depth == 1 else hist_w1  # stands in at depth 1, never read there
    selfmod = n_mem == 5
    meta = kernel_meta(q, chunk_size, n_mem, depth, hist_w2.shape[4])
    dw2 = _zeros_or(dw2_final, hist_w2[0])
    dw1 = dw2 if depth == 1 else _zeros_or(dw1_final, hist_w1[0])
    dw2c, dw1c = torch.zeros_like(dw2), torch.zeros_like(dw1)
    do = do.reshape(tokens, H, DH).contiguous()
    dq = torch.empty((tokens, H, DH), dtype=torch.float32, device=q.device)
    dk, dv = (torch.empty((n_mem, tokens, H, DH), dtype=torch.float32, device=q.device) for _ in range(2))
    deta, dalpha = (torch.empty((n_mem, tokens, H), dtype=torch.float32, device=q.device) for _ in range(2))
    selfgen = selfgen and selfmod
    if selfmod:
        n_sub = proj_chunk_size // chunk_size
        da = torch.empty((tokens, H, DH), dtype=torch.float32, device=q.device)
        part_w2 = hist_w2.new_empty((n_sub, N, 4) + tuple(hist_w2.shape[3:]))
        part_w1 = part_w2 if depth == 1 else hist_w1.new_empty((n_sub, N, 4) + tuple(hist_w1.shape[3:]))
        part_vec = q.new_empty((n_sub, N, H, 2, DH), dtype=torch.float32)
        part_bias = q.new_empty((n_sub, N, H, 2), dtype=torch.float32)
        dvec = q.new_zeros((H, 2, DH), dtype=torch.float32)
        dbias = q.new_zeros((H, 2), dtype=torch.float32)
    for step in reversed(range(steps)):
        proj_step = step - (step * chunk_size % proj_chunk_size) // chunk_size if selfmod else step
        chunk_bwd_kernel[(N * H, n_mem)](
            k, v, eta, alpha, q, do, hist_w1[step], hist_w2[step], hist_w1[proj_step], hist_w2[proj_step],
            dw1, dw2, dw1c, dw2c, dq, dk, dv, deta, dalpha, cu, step, N, H, tokens,
            SELFGEN=selfgen, V_GRAD=not (selfgen and stopgrad_vhat), **meta)
        if selfmod and step == proj_step:
            proj_read_bwd_kernel[(n_sub, N * H)](
                a, hist_w1[step], hist_w2[step], eta_w, eta_b, alpha_w, alpha_b,
                dk, dv, deta, dalpha, da, part_w1, part_w2, part_vec, part_bias, cu,
                step, N, H, tokens, eta_max, **meta)
            dw2[:, :4] += dw2c[:, :4] + part_w2.sum(0)
            dw2c.zero_()
            if depth == 2:
                dw1[:, :4] += dw1c[:, :4] + part_w1.sum(0)
                dw1c.zero_()
            dvec += part_vec.sum((0, 1))
            dbias += part_bias.sum((0, 1))
    if selfmod:
        return (dq, da, None, None, None, None, dw1 if depth == 2 else None, dw2,
                dvec[:, 0].clone(), dbias[:, 0].clone(), dvec[:, 1].clone(), dbias[:, 1].clone())
    return dq, None, dk[0], dv[0], deta[0], dalpha[0], dw1 if depth == 2 else None, dw2, None, None, None, None
