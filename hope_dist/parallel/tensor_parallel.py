"""Tensor parallelism by heads (docs/model.md section 5), applied to the single-device model.

- Mixer: the input projections (a, q, g; titans also k, v and the eta/alpha rates) are
  column-parallel, so each rank gets whole heads; W_out is row-parallel. The memories' initial
  weights, the per-head read-outs and the causal convolutions are sharded on their head axis,
  and the mixer computes with their local shards (`LocalShards`): the memory op sees plain
  tensors of this rank's heads, so the fast-weight state of a head lives on one rank and is
  never communicated.
- CMS levels: gate/up column-parallel, down row-parallel. An in-context level's deviation of the
  down projection is sharded like it (this rank's hidden columns): the op sums its products over
  the tp group itself (kernels/cms_in_context/chunk.py).
- Embedding and LM head vocab-parallel; the head returns this rank's logit columns and
  `vocab_parallel_loss` computes the cross-entropy over the vocabulary shards.
- Every other parameter (the RMSNorms) becomes a Replicate DTensor used through its local
  copy, so the whole model is DTensors on one mesh for FSDP2, clipping and checkpoints.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, loss_parallel,
                                               parallelize_module)

from hope_dist.model.memory_mixer import MemoryMixer

# head axis of the mixer's own parameters
_HEAD_DIM = {"mem_w1": 1, "mem_w2": 1, "eta_w": 0, "eta_b": 0, "alpha_w": 0, "alpha_b": 0, "gamma": 0}


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


def _replicate_rest(module: nn.Module, mesh: DeviceMesh, grad: tuple) -> None:
    """Make every plain parameter of `module`'s tree a Replicate DTensor used locally."""
    for sub in module.modules():
        names = [n for n, p in sub._parameters.items() if p is not None and not isinstance(p, DTensor)]
        if names:
            _distribute_params(sub, mesh, {n: (Replicate(),) for n in names}, {n: grad for n in names})


def _mixer_plan(mixer: nn.Module) -> dict:
    plan = {f"proj.{name}": ColwiseParallel() for name in mixer.proj}
    if isinstance(mixer, MemoryMixer) and not mixer.selfmod:
        plan.update({f"rates.{name}": ColwiseParallel() for name in mixer.rates})
    plan["out"] = RowwiseParallel()
    return plan


def _shard_memory_mixer(mixer: MemoryMixer, mesh: DeviceMesh) -> None:
    own = {n: (Shard(_HEAD_DIM[n]),) for n, p in mixer._parameters.items() if p is not None}
    _distribute_params(mixer, mesh, own, own)
    for conv in mixer.conv.values():  # channels are heads x d_h, head-major
        _distribute_params(conv, mesh, {"weight": (Shard(0),)}, {"weight": (Shard(0),)})
    # one RMSNorm weight shared by all heads, applied here to this rank's heads only
    _distribute_params(mixer.out_norm, mesh, {"weight": (Replicate(),)}, {"weight": (Partial(),)})


def apply_tp(model: nn.Module, mesh: DeviceMesh) -> None:
    """Shard `model` (a HopeModel, possibly a pipeline stage's part of one) over `mesh` by heads."""
    cfg = model.cfg
    tp = mesh.size()
    if cfg.n_heads % tp:
        raise ValueError(f"parallel.tp={tp} does not divide model.n_heads={cfg.n_heads}")
    if cfg.vocab_size % tp:
        raise ValueError(f"model.vocab_size={cfg.vocab_size} is not divisible by parallel.tp={tp}: the "
                         f"embedding and head are vocab-parallel; pad the vocabulary to a multiple of {tp}")
    if cfg.tie_embeddings:
        raise ValueError("model.tie_embeddings=true is not supported with parallel.tp > 1")
    if model.tok_embeddings is not None:
        parallelize_module(model.tok_embeddings, mesh, RowwiseParallel(input_layouts=Replicate()))
    if model.output is not None:
        parallelize_module(model.output, mesh, ColwiseParallel(output_layouts=Shard(-1)))
    for block in model.layers.values():
        plan = {f"mixer.{k}": v for k, v in _mixer_plan(block.mixer).items()}
        for i in range(len(block.cms.levels)):
            plan.update({f"cms.levels.{i}.mlp.gate": ColwiseParallel(),
                         f"cms.levels.{i}.mlp.up": ColwiseParallel(),
                         f"cms.levels.{i}.mlp.down": RowwiseParallel()})
        parallelize_module(block, mesh, plan)
        for level in block.cms.levels:
            level.tp_group = mesh.get_group()
        if isinstance(block.mixer, MemoryMixer):
            _shard_memory_mixer(block.mixer, mesh)
        else:
            _replicate_rest(block.mixer, mesh, (Partial(),))
    _replicate_rest(model, mesh, (Replicate(),))


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
