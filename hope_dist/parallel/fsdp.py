"""FSDP2 units along the CMS clocks, and their clocked reduction.

Units (the model's parallel plan, model/parallel_plan.fsdp_units): every CMS level of every
block is its own `fully_shard` unit (so it can skip its reduction between ticks), the rest of each
block is one unit, and so are the embedding, the final norm and the head. There is no unit at the
model's root: the pipeline's stage views are then plain modules, and the pipeline does not force a
reduction of every unit after backward.

All units keep `requires_gradient_sync(False)`: during backward FSDP2 only accumulates each
unit's unsharded gradient locally. After the step's last micro-batch `FSDPClockedSync` banks the
clocked levels' gradients in the clock's float32 window accumulators and reduce-scatters exactly
the units whose clock group ticks, once, as a SUM over the data-parallel ranks (HSDP adds the
all-reduce over dp_replicate). The bytes are counted inside the reduce-scatter FSDP calls, from
the buffer it hands to torch.distributed.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Shard

from hope_dist.clock import CMSClock
from hope_dist.model.parallel_plan import fsdp_units
from hope_dist.torch_compat import (fsdp_params, fsdp_reduce_now, fsdp_reduce_scatter_comm, fsdp_set_unreduced_grad,
                                    fsdp_take_unreduced_grad, fsdp_unsharded_grad_zeros)


class CountingReduceScatter:
    """FSDP2's reduce-scatter (its `ReduceScatter` comm interface: allocate + call), counting
    the bytes of every input it hands to the collective."""

    def __init__(self):
        self.bytes = 0

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        self.bytes += input_tensor.numel() * input_tensor.element_size()
        return dist.reduce_scatter_single(output=output_tensor, input=input_tensor, group=group, op=op,
                                          async_op=async_op)


def _shard_dim(size: int):
    """FSDP shards each parameter on its first axis that splits evenly over `size` ranks and that
    tp does not shard (no padding: the reduced buffers are exactly the gradients), else axis 0."""

    def placement(p: nn.Parameter) -> Shard:
        tp_dims = {pl.dim for pl in p.placements if isinstance(pl, Shard)} if isinstance(p, DTensor) else set()
        shape = p.to_local().shape if isinstance(p, DTensor) else p.shape
        for dim, n in enumerate(shape):
            if n % size == 0 and dim not in tp_dims:
                return Shard(dim)
        return Shard(0)

    return placement


def apply_fsdp(model: nn.Module, mesh: DeviceMesh) -> dict[str, list[FSDPModule]]:
    """Shard `model` (a HopeModel or a stage's part of one) over `mesh` (dp_shard, or
    (dp_replicate, dp_shard) for HSDP); returns the units by clock group name."""
    units: dict[str, list[FSDPModule]] = defaultdict(list)
    placement = _shard_dim(mesh.size(-1))

    def shard(module: nn.Module, group: str) -> None:
        unit = fully_shard(module, mesh=mesh, shard_placement_fn=placement)
        unit.set_reshard_after_forward(True, recurse=False)  # also as a root: free gathered weights
        unit.set_requires_gradient_sync(False, recurse=False)
        unit.set_gradient_divide_factor(1.0)  # token-SUM loss: reduce as a sum
        unit.set_force_sum_reduction_for_comms(True)
        unit.set_custom_reduce_scatter(CountingReduceScatter())
        units[group].append(unit)

    for module, group in fsdp_units(model):
        shard(module, group)
    return dict(units)


class FSDPClockedSync:
    """Reduce the ticking units' window gradients once per tick; see the module docstring.

    The window sums of the clocked levels live in the clock's float32 accumulators (so they are
    checkpointed like every other training state): each step they are taken out of FSDP, and on
    a tick handed back to it as the reduce-scatter input."""

    def __init__(self, units: dict[str, list[FSDPModule]]):
        self.units = units
        self.fsdp_params = {id(fp.sharded_param): fp for group_units in units.values() for unit in group_units
                            for fp in fsdp_params(unit)}

    def attach(self, clock: CMSClock) -> None:
        """Size the clock's accumulators of clocked levels like this rank's unsharded gradients."""
        for g in clock.groups:
            if g.period > 1:
                for name, p in g.params:
                    clock.acc[name] = fsdp_unsharded_grad_zeros(self.fsdp_params[id(p)])

    def discard(self) -> None:
        """Drop this step's unreduced gradients (a skipped step); the clock's windows stay."""
        for fsdp_param in self.fsdp_params.values():
            fsdp_take_unreduced_grad(fsdp_param)

    def _reduce_unit(self, unit: FSDPModule) -> int:
        comm = fsdp_reduce_scatter_comm(unit)
        before = comm.bytes
        unit.set_requires_gradient_sync(True, recurse=False)
        fsdp_reduce_now(unit)
        unit.set_requires_gradient_sync(False, recurse=False)
        return comm.bytes - before

    def reduce(self, clock: CMSClock, step: int, step_tokens: int) -> tuple[list, dict[str, int]]:
        ticking = clock.ticking(step)
        ticks = {g.name for g in ticking}
        for g in clock.groups:
            g.window_tokens += step_tokens
            if g.period == 1:
                continue
            for name, p in g.params:
                fsdp_param, acc = self.fsdp_params[id(p)], clock.acc[name]
                pending = fsdp_take_unreduced_grad(fsdp_param)
                if pending is not None:
                    acc.add_(pending)
                if g.name in ticks:  # the window sum becomes the reduce-scatter input
                    fsdp_set_unreduced_grad(fsdp_param, acc.clone())
                    acc.zero_()
        sent = {g.name: sum(self._reduce_unit(unit) for unit in self.units.get(g.name, [])) for g in ticking}
        return ticking, sent
