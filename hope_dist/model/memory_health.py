"""Memory health: what the fast weights do inside the recurrence, cheap enough to log every step.

A run whose memories are about to blow up shows it here first: the fast weights' norm at the end
of a document grows, the inner loss grows, eta climbs or alpha drops. One sample is probed per
layer and step (the longest document of the micro-batch's first row, exactly as training runs it:
same conv features, a fresh state at the document start), without gradients. The document is read
in proj_chunk_size segments with the state carried (equal to one call by the op's contract), so the
chunk-start state of every segment is at hand for eta, alpha and the inner loss.
"""
from __future__ import annotations

import torch

from kernels.hope_memory import hope_memory
from kernels.hope_memory.common import heads_first, initial_memory_state, apply_memory, projections
from kernels.hope_memory.types import MemoryParams

STATS = ("fw_norm_max", "fw_norm_mean", "eta_mean", "alpha_mean", "inner_loss", "kv_cos", "write_rel")


def longest_document(seg: torch.Tensor | None, length: int) -> slice:
    """The token range of the longest document in one row's segment ids (the whole row if None)."""
    if seg is None:
        return slice(0, length)
    counts = torch.bincount(seg)
    doc = int(counts.argmax())
    start = int(counts[:doc].sum())
    return slice(start, start + int(counts[doc]))


@torch.no_grad()
def memory_health(q: torch.Tensor, params: MemoryParams, inputs: dict, common: dict) -> dict[str, float]:
    """q (1, T, H, d_h) and the op's inputs for one document; common: the op's chunk/flag kwargs.
    Returns STATS: the final fast weights' Frobenius norm (max and mean over memories and heads,
    W1 and W2 together), the mean eta and alpha, the mean inner loss 1/2 ||M_o(k) - vhat||^2 of
    M_o, all at the last proj_chunk_size boundary, and the mean cosine of k_t and v_t (near 1: the
    memory is asked to map each key to itself, and writes nothing useful), and how far the document
    moved the fast weights from M_0, ||W_end - M_0|| / ||M_0|| (mean over memories and heads)."""
    span = common["proj_chunk_size"]
    selfmod = "a" in inputs
    state = initial_memory_state(params, 1)
    etas, alphas, losses, cos = [], [], [], []
    for t0 in range(0, q.shape[1], span):
        part = {n: x[:, t0:t0 + span] for n, x in inputs.items()}
        w1, w2 = state.w1, state.w2
        if selfmod:
            given = (heads_first(part["eta"]), heads_first(part["alpha"])) if "eta" in part else None
            k, v, eta, alpha = projections(None if w1 is None else w1[:, :4], w2[:, :4], heads_first(part["a"]),
                                           params, common["eta_max"], common["rate_norm"], given)
        else:
            k, v, eta, alpha = (heads_first(part[n]) for n in ("k", "v", "eta", "alpha"))
        o1, o2 = (None if w1 is None else w1[:, -1:]), w2[:, -1:]
        vhat = apply_memory(o1, o2, v) if selfmod and common["selfgen"] else v
        losses.append(0.5 * (apply_memory(o1, o2, k) - vhat).square().sum(-1).flatten())
        cos.append(((k * v).sum(-1) / (k.norm(dim=-1) * v.norm(dim=-1)).clamp_min(1e-12)).flatten())
        etas.append(eta.flatten())
        alphas.append(alpha.flatten())
        _, state = hope_memory(q[:, t0:t0 + span], params, **part, **common, initial_state=state,
                               output_final_state=True)
    norms = _frobenius(state.w1, state.w2)
    moved = _frobenius(None if state.w1 is None else state.w1 - params.w1, state.w2 - params.w2)
    return {"fw_norm_max": float(norms.max()), "fw_norm_mean": float(norms.mean()),
            "eta_mean": float(torch.cat(etas).mean()), "alpha_mean": float(torch.cat(alphas).mean()),
            "inner_loss": float(torch.cat(losses).mean()), "kv_cos": float(torch.cat(cos).mean()),
            "write_rel": float((moved / _frobenius(params.w1, params.w2)).mean())}


def _frobenius(w1, w2) -> torch.Tensor:
    """||W1||^2 + ||W2||^2, square-rooted, per memory and head (W1 None at depth 1)."""
    sq = w2.square().sum((-1, -2))
    return (sq if w1 is None else sq + w1.square().sum((-1, -2))).sqrt()
