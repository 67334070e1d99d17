"""The private torch internals behind hope_dist/torch_compat.py still exist and behave as the adapter
assumes. A failure names the installed torch version and what changed: adapt torch_compat.py (the
one module that touches them), not its callers."""
from __future__ import annotations

import inspect

import pytest
import torch
import torch.distributed as dist
from torch import nn

from hope_dist import torch_compat


def changed(what: str) -> str:
    return (f"torch {torch.__version__}: {what}. hope_dist/torch_compat.py relies on it; "
            "adapt that module to this torch version")


def require(cond: bool, what: str) -> None:
    if not cond:
        pytest.fail(changed(what), pytrace=False)


def params_of(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_private_functions_have_the_expected_signatures():
    from torch.distributed import _state_dict_utils as sdu
    from torch.distributed.checkpoint.staging import AsyncStager
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    for name in ("_copy_state_dict", "_create_cpu_state_dict", "CompanionMismatch"):
        require(hasattr(sdu, name), f"torch.distributed._state_dict_utils.{name} is gone")
    require(params_of(sdu._copy_state_dict)[:3] == ["state_dict", "copy_state_dict", "non_blocking"],
            f"_copy_state_dict's signature is now {inspect.signature(sdu._copy_state_dict)}")
    require(params_of(sdu._create_cpu_state_dict)[:1] == ["state_dict"],
            f"_create_cpu_state_dict's signature is now {inspect.signature(sdu._create_cpu_state_dict)}")
    require(issubclass(sdu.CompanionMismatch, Exception), "CompanionMismatch is no longer an Exception")
    for name in ("post_backward", "finalize_backward"):
        require(callable(getattr(FSDPParamGroup, name, None)), f"FSDPParamGroup.{name} is gone")
    finalize = FSDPParamGroup.finalize_backward
    require(params_of(finalize) == ["self"],
            f"FSDPParamGroup.finalize_backward's signature is now {inspect.signature(finalize)}")
    post = inspect.signature(FSDPParamGroup.post_backward).parameters
    require(all(p.kind == p.VAR_POSITIONAL or p.default is not p.empty for n, p in post.items() if n != "self"),
            f"FSDPParamGroup.post_backward now needs arguments: {inspect.signature(FSDPParamGroup.post_backward)}")
    require("mesh_dim_name" in params_of(DeviceMesh._flatten) if hasattr(DeviceMesh, "_flatten") else False,
            "DeviceMesh._flatten(mesh_dim_name) is gone or renamed its argument")

    @torch_compat.skip_sync_after_stage
    class Stager(AsyncStager):
        def stage(self, state_dict):
            return state_dict

        def synchronize_staging(self):
            pass

    require(Stager().should_synchronize_after_execute is False,
            "AsyncStager.should_synchronize_after_execute no longer reads _synchronize_after_execute")


def test_state_dict_copies_into_reused_buffers():
    state = {"w": torch.arange(6.0).view(2, 3), "nested": {"b": torch.ones(2)}, "step": 3}
    buffers = torch_compat.create_cpu_state_dict(state)
    copied = torch_compat.copy_state_dict(state, buffers)
    require(copied["w"].data_ptr() == buffers["w"].data_ptr() and torch.equal(copied["w"], state["w"])
            and torch.equal(copied["nested"]["b"], state["nested"]["b"]),
            "_copy_state_dict no longer copies into the given buffers")
    with pytest.raises(torch_compat.CompanionMismatch):
        torch_compat.copy_state_dict({"w": state["w"], "other": torch.zeros(1)}, buffers)


@pytest.fixture
def world_of_one(tmp_path):
    """A one-rank gloo process group, destroyed afterwards."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fsdp_internals_reduce_a_handed_back_gradient(world_of_one):
    """The clocked reduction's calls on a real one-rank FSDP2 unit: take the unreduced gradient out,
    hand a different one back, reduce now, and find it in the sharded .grad."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from hope_dist.parallel.fsdp import CountingReduceScatter

    class Recording(CountingReduceScatter):  # one rank allocates the buffers but skips the collective
        allocations = 0

        def allocate(self, size, *, dtype, device):
            self.allocations += 1
            return super().allocate(size, dtype=dtype, device=device)

    mesh = init_device_mesh("cpu", (1,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    unit = fully_shard(model[0], mesh=mesh)
    unit.set_requires_gradient_sync(False, recurse=False)
    unit.set_custom_reduce_scatter(Recording())
    try:
        groups = torch_compat.fsdp_param_groups(unit)
    except AttributeError as e:
        pytest.fail(changed(f"fully_shard.state(unit)._fsdp_param_groups: {e}"), pytrace=False)
    require(isinstance(groups, list) and len(groups) == 1, f"a unit now has param groups {groups!r}")
    for attr in ("fsdp_params", "_reduce_scatter_comm"):
        require(hasattr(groups[0], attr), f"FSDPParamGroup has no attribute {attr}")
    require(isinstance(torch_compat.fsdp_reduce_scatter_comm(unit), Recording),
            "FSDPParamGroup._reduce_scatter_comm is not what set_custom_reduce_scatter installed")
    (fp,) = torch_compat.fsdp_params(unit)
    for attr in ("sharded_param", "_orig_size", "_unsharded_dtensor_spec", "is_dtensor", "device",
                 "unsharded_accumulated_grad"):
        require(hasattr(fp, attr), f"FSDPParam has no attribute {attr}")
    require(fp.sharded_param is model[0].weight, "FSDPParam.sharded_param is not the module's Parameter")
    zeros = torch_compat.fsdp_unsharded_grad_zeros(fp)
    require(zeros.shape == (4, 4) and zeros.dtype == torch.float32, f"FSDPParam._orig_size is {fp._orig_size}")

    require(torch_compat.fsdp_take_unreduced_grad(fp) is None, "an FSDPParam before any forward has a gradient")
    x = torch.randn(3, 4)
    model(x).sum().backward()
    require(hasattr(fp, "_unsharded_param"), "FSDPParam has no _unsharded_param after a forward")
    pending = torch_compat.fsdp_take_unreduced_grad(fp)
    require(pending is not None and torch.allclose(pending, x.sum(0).expand(4, 4)),
            "the unreduced gradient is no longer in FSDPParam.unsharded_accumulated_grad / _unsharded_param.grad")
    require(model[0].weight.grad is None, "FSDP reduced a gradient while gradient sync was off")

    handed = torch.arange(16.0).view(4, 4)
    torch_compat.fsdp_set_unreduced_grad(fp, handed.clone())
    unit.set_requires_gradient_sync(True, recurse=False)
    torch_compat.fsdp_reduce_now(unit)
    unit.set_requires_gradient_sync(False, recurse=False)
    grad = model[0].weight.grad
    require(grad is not None and torch.equal(grad.full_tensor(), handed),
            "post_backward() + finalize_backward() no longer reduce-scatter the handed-back gradient into .grad")
    require(torch_compat.fsdp_reduce_scatter_comm(unit).allocations > 0,
            "the reduction no longer goes through the installed reduce-scatter object")


def test_device_mesh_flatten(world_of_one):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("a", "b"))
    flat = torch_compat.flatten_mesh(mesh["a", "b"], "ab")
    require(flat.size() == 1 and flat.mesh_dim_names == ("ab",),
            f"DeviceMesh._flatten now gives {flat!r}, not a one-dimensional mesh named 'ab'")
