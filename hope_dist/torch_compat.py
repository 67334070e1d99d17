"""Every private torch internal hope_dist relies on, behind one small adapter.

torch gives no public way to do a few things the trainer needs, so the code reaches into its
internals here and nowhere else:

- FSDP2 (`torch.distributed.fsdp._fully_shard`): the clocked reduction of CMS levels
  (hope_dist/parallel/fsdp.py) keeps every unit's gradient sync off, takes each parameter's
  unreduced gradient out of FSDP after backward, and on a tick hands a window sum back and runs
  FSDP's own post-backward reduce-scatter for that unit alone. That needs a unit's
  `FSDPParamGroup`s (`FSDPState._fsdp_param_groups`), their `fsdp_params`,
  `_reduce_scatter_comm`, `post_backward()` and `finalize_backward()`, and on each `FSDPParam`
  `_orig_size`, `_unsharded_dtensor_spec`, `_unsharded_param` and `unsharded_accumulated_grad`.
- DCP (`torch.distributed._state_dict_utils`): the async checkpoint's reused CPU buffers
  (hope_dist/checkpoint.py, `ReusedBufferStager`) use `_create_cpu_state_dict`,
  `_copy_state_dict` and `CompanionMismatch`, DTensor-aware copies that DCP's own stager uses,
  and turn off `AsyncStager._synchronize_after_execute`.
- DeviceMesh: the flattened data-parallel dimension (hope_dist/parallel/mesh.py) uses
  `DeviceMesh._flatten`.

tests/unit/test_torch_internals.py checks each of these against the installed torch (existence,
signatures, and a world-size-1 FSDP/DCP run of the same calls); when torch changes one, it fails
naming `torch.__version__` and what changed, and this module is the one place to adapt.
Last checked against torch 2.13 (what scripts/setup.sh installs). Not covered:
`nn.Module._parameters` / `_modules`, which the tensor-parallel and pipeline code edit the way
torch's own parallel APIs do, and the tests' use of `torch.optim._muon` and `torch._inductor.config`.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.distributed._state_dict_utils import CompanionMismatch, _copy_state_dict, _create_cpu_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

__all__ = [
    "CompanionMismatch", "copy_state_dict", "create_cpu_state_dict", "flatten_mesh", "fsdp_param_groups",
    "fsdp_params", "fsdp_reduce_now", "fsdp_reduce_scatter_comm", "fsdp_set_unreduced_grad",
    "fsdp_take_unreduced_grad", "fsdp_unsharded_grad_zeros", "skip_sync_after_stage",
]


# ------------------------------------------------------------------ FSDP2
def fsdp_param_groups(unit: FSDPModule) -> list:
    """The `FSDPParamGroup`s of one `fully_shard` unit (one per unit in practice)."""
    return fully_shard.state(unit)._fsdp_param_groups


def fsdp_params(unit: FSDPModule) -> list:
    """The unit's `FSDPParam`s: FSDP's record of each parameter (`.sharded_param` is the
    module's Parameter)."""
    return [fp for group in fsdp_param_groups(unit) for fp in group.fsdp_params]


def fsdp_reduce_scatter_comm(unit: FSDPModule) -> Any:
    """The reduce-scatter object the unit calls (what `set_custom_reduce_scatter` installed)."""
    return fsdp_param_groups(unit)[0]._reduce_scatter_comm


def fsdp_reduce_now(unit: FSDPModule) -> None:
    """Run FSDP's post-backward for this unit alone, now: reduce-scatter the unsharded gradients it
    holds into the sharded `.grad`s (the caller turns gradient sync on around it)."""
    for group in fsdp_param_groups(unit):
        group.post_backward()
        group.finalize_backward()


def fsdp_unsharded_grad_zeros(fsdp_param) -> torch.Tensor:
    """Zeros shaped like this rank's unsharded gradient of one parameter: the whole tensor over
    dp, this rank's shard over tp (a DTensor on the tp mesh then, like FSDP's own gradient)."""
    local = torch.zeros(fsdp_param._orig_size, dtype=torch.float32, device=fsdp_param.device)
    if not fsdp_param.is_dtensor:
        return local
    spec = fsdp_param._unsharded_dtensor_spec
    return DTensor.from_local(local, spec.mesh, spec.placements, run_check=False,
                              shape=spec.shape, stride=spec.stride)


def fsdp_take_unreduced_grad(fsdp_param) -> torch.Tensor | None:
    """This rank's unreduced gradient that FSDP accumulated since the last take; FSDP forgets it.
    None before the parameter's first forward or when nothing accumulated."""
    if not hasattr(fsdp_param, "_unsharded_param"):  # no forward yet
        return None
    grads = [g for g in (fsdp_param.unsharded_accumulated_grad, fsdp_param._unsharded_param.grad) if g is not None]
    fsdp_param.unsharded_accumulated_grad = None
    fsdp_param._unsharded_param.grad = None
    return sum(grads[1:], grads[0]) if grads else None


def fsdp_set_unreduced_grad(fsdp_param, grad: torch.Tensor) -> None:
    """Hand FSDP an unreduced gradient to reduce-scatter at the next `fsdp_reduce_now`."""
    fsdp_param.unsharded_accumulated_grad = grad


# ------------------------------------------------------------------ DCP
# DCP warns on every save and load without a process group that it assumes one process. A
# single-process run (or tools reading a checkpoint) does that on purpose and cannot act on it.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized",
                        category=UserWarning, module=r"torch\.distributed\.checkpoint")


def create_cpu_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """CPU buffers shaped like `state_dict` (DTensors as their local shards)."""
    return _create_cpu_state_dict(state_dict)


def copy_state_dict(state_dict: dict[str, Any], buffers: dict[str, Any]) -> dict[str, Any]:
    """Copy `state_dict` into `buffers` (made by create_cpu_state_dict) and return them; raises
    CompanionMismatch when the structure no longer matches."""
    return _copy_state_dict(state_dict, buffers, non_blocking=False)


def skip_sync_after_stage(stager_cls: type) -> type:
    """Class decorator for an `AsyncStager`: DCP's async save then does not call
    `synchronize_staging()` right after `stage()` (its private `_synchronize_after_execute`, read by
    `should_synchronize_after_execute`)."""
    stager_cls._synchronize_after_execute = False
    return stager_cls


# ------------------------------------------------------------------ DeviceMesh
def flatten_mesh(mesh, name: str):
    """`mesh` (a multi-dimensional slice of a DeviceMesh) flattened into one dimension `name`,
    registered on the root mesh so `root[name]` finds it."""
    return mesh._flatten(name)
