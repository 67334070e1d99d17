"""Newton-Schulz orthogonalisation of a whole matrix, also when it is sharded (FSDP2 and/or TP).

The iteration is Muon's quintic with torch.optim.Muon's own coefficients and epsilon, read from
its public signature. torch's helper (`torch.optim._muon._zeropower_via_newtonschulz`) is private
and always computes in bfloat16; we compute in float32, so that every (dp, tp) layout orthogonalises
the same numbers to float32 accuracy and trains like one process.

Sharded matrices: every rank all-gathers the full matrix (`DTensor.full_tensor()`), runs the same
iteration on it, and keeps its own shard of the result (a Replicate -> Shard redistribute, which is
local chunking, no communication). The orthogonal factor of a matrix is not a per-shard function,
so this is exact where orthogonalising each shard would not be.
"""
from __future__ import annotations

import inspect

import torch
from torch.distributed.tensor import DTensor, Replicate

_MUON = inspect.signature(torch.optim.Muon).parameters
NS_COEFFICIENTS: tuple[float, float, float] = _MUON["ns_coefficients"].default
NS_EPS: float = _MUON["eps"].default


def newton_schulz(m: torch.Tensor, steps: int) -> torch.Tensor:
    """Approximately U V^T of m = U S V^T (singular values land in about [0.5, 1.5], as in Muon),
    in float32. NS(c m) = NS(m) for c > 0: the input is scaled to unit Frobenius norm first."""
    a, b, c = NS_COEFFICIENTS
    x = m.float()
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / x.norm().clamp(min=NS_EPS)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def orthogonalize(local: torch.Tensor, like: torch.Tensor, steps: int) -> torch.Tensor:
    """newton_schulz of the whole matrix whose shard on this rank is `local`, laid out like the
    parameter `like`; returns this rank's shard of the result (newton_schulz(local) when `like` is not a
    DTensor). For a DTensor a collective over its mesh: every rank holding `like` must call it."""
    if not isinstance(like, DTensor):
        return newton_schulz(local, steps)
    mesh, placements = like.device_mesh, like.placements
    shard = DTensor.from_local(local, mesh, placements, run_check=False, shape=like.shape, stride=like.stride())
    full = newton_schulz(shard.full_tensor(), steps)
    replicated = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, placements).to_local()
