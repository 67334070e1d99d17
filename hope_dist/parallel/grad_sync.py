"""Clocked gradient reduction for pure replication, and the global gradient norm.

`BucketSync` (dp_shard = 1): the CMS clock banks the clocked groups' gradients locally in
float32; each ticking clock group is then reduced as one flat float32 bucket (one all-reduce
per group per tick) and groups that do not tick hand nothing to the collective. The byte
counts are read off the real buckets handed to torch.distributed, not from a formula.
The FSDP2 counterpart is fsdp.FSDPClockedSync; both return (ticking groups, bytes by group).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from hope_dist.clock import CMSClock


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class BucketSync:
    """All-reduce (sum) the ticking groups' gradients over `group`; None means one dp rank."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group

    def attach(self, clock: CMSClock) -> None:
        """The clock's own accumulators (shaped like the parameters) are what this sync reduces."""

    def discard(self) -> None:
        """Nothing to drop: this step's gradients are the parameters' .grad (zero_grad clears them)."""

    def reduce(self, clock: CMSClock, step: int, step_tokens: int) -> tuple[list, dict[str, int]]:
        ticking = clock.advance(step, step_tokens)
        sent: dict[str, int] = {}
        for g in ticking:
            params = [p for _, p in g.params if p.grad is not None]
            for p in params:  # tp: a replicated parameter used on local heads has a Partial grad
                if isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
                    p.grad = p.grad.redistribute(placements=p.placements)
            grads = [_local(p.grad) for p in params]
            if not grads or self.group is None:
                sent[g.name] = 0
                continue
            bucket = torch.cat([t.reshape(-1).float() for t in grads])
            dist.all_reduce(bucket, group=self.group)
            sent[g.name] = bucket.numel() * bucket.element_size()
            offset = 0
            for t in grads:
                n = t.numel()
                t.copy_(bucket[offset:offset + n].view_as(t))
                offset += n
        return ticking, sent


def _copies(p: torch.Tensor, world: int, pp: int) -> int:
    """How many ranks hold each element of p's gradient: the world over the pipeline stages
    and over the mesh dimensions p is sharded on."""
    distinct = pp
    if isinstance(p, DTensor):
        for dim, placement in enumerate(p.placements):
            if isinstance(placement, Shard):
                distinct *= p.device_mesh.size(dim)
    return world // distinct


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float, pp: int = 1) -> float:
    """One global L2 norm over `params`' gradients on every rank (DTensor shards, tp/dp
    replicas and pipeline stages each counted once), then scale them to at most max_norm."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    total = torch.zeros((), dtype=torch.float64, device=params[0].device if params else "cpu")
    for p in params:
        g = _local(p.grad)
        total += g.double().pow(2).sum() / _copies(p, world, pp)
    if world > 1:
        dist.all_reduce(total)
    norm = math.sqrt(total.item())
    coef = max_norm / (norm + 1e-6)
    if coef < 1:
        for p in params:
            _local(p.grad).mul_(coef)
    return norm
