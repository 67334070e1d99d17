"""Data-parallel gradient reduction on the clock's ticks, with the bytes actually reduced.

Each ticking clock group is reduced as one flat float32 bucket (one all-reduce per group per
tick); groups that do not tick hand nothing to the collective. The byte counts are read off
the real buckets handed to torch.distributed, not computed from a formula.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from hope_dist.clock import ClockGroup


class GradSync:
    """All-reduce (sum) the ticking groups' gradients over `group`; None means a single rank."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.size = dist.get_world_size(group) if group is not None else 1

    def reduce(self, groups: list[ClockGroup]) -> dict[str, int]:
        sent: dict[str, int] = {}
        for g in groups:
            grads = [p.grad for _, p in g.params if p.grad is not None]
            if not grads or self.size == 1:
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
        return sent
