"""Tensor parallelism by heads (docs/model.md section 5), applied to the single-device model.

What each parameter becomes is the model's parallel plan (hope_dist/model/parallel_plan.py); this
file only carries the plan's kinds out with DTensor:
- colwise / rowwise nn.Linear: torch's ColwiseParallel / RowwiseParallel. In the mixer the input
  projections are column-parallel, so each rank gets whole heads; W_out is row-parallel. In a CMS
  level gate/up are column-parallel and down row-parallel; an in-context level's deviation of the
  down projection is sharded like it and the op sums over the tp group itself
  (kernels/cms_in_context/chunk.py).
- heads: sharded on the head axis, and the module computes with its local shards (`LocalShards`):
  the memory op sees plain tensors of this rank's heads, so the fast-weight state of a head lives
  on one rank and is never communicated.
- vocab_embedding / vocab_head: vocab-parallel; the head returns this rank's logit columns and
  `vocab_parallel_loss` computes the cross-entropy over the vocabulary shards.
- local / replicated: a Replicate DTensor used through its local copy (gradient Partial: summed
  over tp / Replicate), so the whole model is DTensors on one mesh for FSDP2, clipping and checkpoints.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, loss_parallel,
                                               parallelize_module)

from hope_dist.model.parallel_plan import ParamPlan, model_plan, tp_group_users


class LocalShards:
    """Forward pre/post hooks: `module` computes with the local tensors of its DTensor
    parameters. The backward of `to_local` hands each parameter a DTensor gradient with the
    given placement: Shard for per-head parameters, Partial for a replicated parameter used on
    this rank's heads only (summed over tp later), Replicate where every rank computes the same."""

    def __init__(self, module: nn.Module, grad_placements: dict[str, tuple]):
        self.grad_placements = grad_placements
        self.saved: list[dict[str, nn.Parameter]] = []
        module.register_forward_pre_hook(self.pre)
        module.register_forward_hook(self.post)

    def pre(self, module: nn.Module, _args) -> None:
        saved = {name: module._parameters[name] for name in self.grad_placements}
        self.saved.append(saved)
        for name, param in saved.items():
            module._parameters[name] = param.to_local(grad_placements=self.grad_placements[name])

    def post(self, module: nn.Module, _args, _out) -> None:
        module._parameters.update(self.saved.pop())


def _distribute_params(module: nn.Module, mesh: DeviceMesh, placements: dict[str, tuple],
                       grad_placements: dict[str, tuple]) -> None:
    for name, placement in placements.items():
        param = module._parameters[name]
        module._parameters[name] = nn.Parameter(distribute_tensor(param.data, mesh, placement),
                                                requires_grad=param.requires_grad)
    LocalShards(module, grad_placements)


# torch's parallel style for each plan kind that a whole module carries (an nn.Linear or the embedding)
_MODULE_STYLES = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel,
                  "vocab_embedding": lambda: RowwiseParallel(input_layouts=Replicate()),
                  "vocab_head": lambda: ColwiseParallel(output_layouts=Shard(-1))}


def _by_module(plan: dict[str, ParamPlan]) -> dict[str, dict[str, ParamPlan]]:
    """{module path: {parameter name: plan}}; '' is the root."""
    out: dict[str, dict[str, ParamPlan]] = defaultdict(dict)
    for key, p in plan.items():
        path, _, name = key.rpartition(".")
        out[path][name] = p
    return out


def _module_styles(plan: dict[str, ParamPlan]) -> dict:
    """{module path: torch's parallel style} for the plan's colwise, rowwise and vocab kinds."""
    styles = {}
    for path, params in _by_module(plan).items():
        kinds = {p.tp for p in params.values()}
        if kinds & _MODULE_STYLES.keys():
            (kind,) = kinds  # a Linear's weight and bias split alike
            styles[path] = _MODULE_STYLES[kind]()
    return styles


def _shard_locally_used(root: nn.Module, mesh: DeviceMesh, plan: dict[str, ParamPlan]) -> None:
    """The heads / local / replicated parameters of the plan: DTensors the module uses locally."""
    for path, params in _by_module(plan).items():
        placements, grads = {}, {}
        for name, p in params.items():
            if p.tp == "heads":
                placements[name] = grads[name] = (Shard(p.head_axis),)
            elif p.tp in ("local", "replicated"):
                placements[name] = (Replicate(),)
                grads[name] = (Partial(),) if p.tp == "local" else (Replicate(),)
        if placements:
            _distribute_params(root.get_submodule(path), mesh, placements, grads)


def apply_tp(model: nn.Module, mesh: DeviceMesh) -> None:
    """Shard `model` (a HopeModel, possibly a pipeline stage's part of one) over `mesh` by heads,
    as its parallel plan says."""
    cfg = model.cfg
    tp = mesh.size()
    if cfg.n_heads % tp:
        raise ValueError(f"parallel.tp={tp} does not divide model.n_heads={cfg.n_heads}")
    if cfg.vocab_size % tp:
        raise ValueError(f"model.vocab_size={cfg.vocab_size} is not divisible by parallel.tp={tp}: the "
                         f"embedding and head are vocab-parallel; pad the vocabulary to a multiple of {tp}")
    if cfg.tie_embeddings:
        raise ValueError("model.tie_embeddings=true is not supported with parallel.tp > 1")
    plan = model_plan(model)  # checked when the model was built
    parallelize_module(model, mesh, _module_styles(plan))
    _shard_locally_used(model, mesh, plan)
    for block in model.layers.values():
        for module in tp_group_users(block):
            module.tp_group = mesh.get_group()


def vocab_parallel_loss(logits: torch.Tensor, labels: torch.Tensor, mesh: DeviceMesh | None) -> torch.Tensor:
    """Token-sum cross-entropy of local logit columns (B, T, V/tp) against labels (B, T);
    the same plain scalar on every tp rank. Backward must also run inside `loss_context`."""
    if mesh is None:
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum")
    full = DTensor.from_local(logits.float().flatten(0, 1), mesh, (Shard(1),), run_check=False)
    return F.cross_entropy(full, labels.flatten(), reduction="sum").to_local()


def loss_context(mesh: DeviceMesh | None):
    """loss_parallel() under tp (vocab-sharded softmax), a no-op context otherwise."""
    return loss_parallel() if mesh is not None else contextlib.nullcontext()
