"""The rank layout: a (pp, dp_replicate, dp_shard, tp) DeviceMesh and the groups cut from it.

The product of the four sizes must equal the world size; otherwise a ConfigError names the sizes
and a layout that fits, before any process group exists. tp is the innermost dimension (the
ranks of a node), pp the outermost, as in torchtitan.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from hope_dist.config import ConfigError, ParallelConfig
from hope_dist.torch_compat import flatten_mesh

DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


def check_world_size(p: ParallelConfig, world: int) -> None:
    """Fail before any work starts when the layout does not fit the ranks, and suggest one."""
    product = p.pp * p.dp_replicate * p.dp_shard * p.tp
    if product == world:
        return
    fit = world // (p.pp * p.tp) if world % (p.pp * p.tp) == 0 else None
    hint = (f"keep pp={p.pp}, tp={p.tp} and use --parallel.dp_shard={fit} --parallel.dp_replicate=1"
            if fit else f"e.g. --parallel.dp_replicate={world} --parallel.dp_shard=1 --parallel.tp=1 --parallel.pp=1")
    raise ConfigError(
        f"parallel layout pp={p.pp} x dp_replicate={p.dp_replicate} x dp_shard={p.dp_shard} x tp={p.tp} "
        f"= {product} ranks, but the world size is {world}: {hint}")


@dataclass
class ParallelDims:
    """Sizes, the mesh (None on a single process) and this rank's coordinates."""

    cfg: ParallelConfig
    mesh: DeviceMesh | None
    dp_mesh: DeviceMesh | None = None  # dp_replicate x dp_shard flattened

    @property
    def dp_size(self) -> int:
        return self.cfg.dp_replicate * self.cfg.dp_shard

    def _sub(self, name: str) -> DeviceMesh:
        return self.dp_mesh if name == "dp" else self.mesh[name]

    def _coord(self, name: str) -> int:
        return self._sub(name).get_local_rank() if self.mesh is not None else 0

    @property
    def dp_rank(self) -> int:
        return self._coord("dp")

    @property
    def pp_rank(self) -> int:
        return self._coord("pp")

    def group(self, name: str) -> dist.ProcessGroup | None:
        """The process group of mesh dimension `name` (pp, dp, dp_shard, tp...), None if size 1."""
        if self.mesh is None or self._sub(name).size() == 1:
            return None
        return self._sub(name).get_group()


def build_mesh(p: ParallelConfig, device_type: str) -> ParallelDims:
    """World mesh with the flattened `dp` (= dp_replicate x dp_shard) dimension added."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    check_world_size(p, world)
    if world == 1:
        return ParallelDims(p, None)
    mesh = init_device_mesh(device_type, (p.pp, p.dp_replicate, p.dp_shard, p.tp), mesh_dim_names=DIMS)
    return ParallelDims(p, mesh, flatten_mesh(mesh["dp_replicate", "dp_shard"], "dp"))
