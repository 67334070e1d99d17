"""The one place that makes the single-device model run on a mesh, in torchtitan's order:
pipeline stage split, then tensor parallel, then activation checkpointing, then FSDP2 (or, under
parallel.engine=deepspeed, no sharding here: the trainer hands the model to DeepSpeed ZeRO).

The model is built and initialised whole on every rank first (same seed, so every layout starts
from the single-process weights); the split prunes it and TP keeps each rank's shards.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.utils.checkpoint import checkpoint

from hope_dist.config import JobConfig
from hope_dist.model import HopeModel
from hope_dist.parallel.fsdp import FSDPClockedSync, apply_fsdp
from hope_dist.parallel.grad_sync import BucketSync
from hope_dist.parallel.mesh import ParallelDims
from hope_dist.parallel.pipeline import Pipeline, split_model
from hope_dist.parallel.tensor_parallel import apply_tp, vocab_parallel_loss


@dataclass
class ParallelModel:
    """What the trainer drives: `model` is this rank's (pruned, sharded) HopeModel."""

    model: HopeModel
    sync: BucketSync | FSDPClockedSync
    pipeline: Pipeline | None
    tp_mesh: DeviceMesh | None
    description: str

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_loss(logits, labels, self.tp_mesh)


def apply_activation_checkpointing(model: HopeModel) -> None:
    """Recompute each block's activations in backward (names and hooks unchanged)."""
    for block in model.layers.values():
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def parallelize(model: HopeModel, cfg: JobConfig, dims: ParallelDims, device: torch.device,
                amp_dtype: torch.dtype | None = None) -> ParallelModel:
    """amp_dtype: the autocast dtype of the forward (None: float32), for the pipeline's shapes."""
    p = cfg.parallel
    mesh = dims.mesh
    tp_mesh = mesh["tp"] if p.tp > 1 else None
    lines = [f"layout: pp={p.pp} dp_replicate={p.dp_replicate} dp_shard={p.dp_shard} tp={p.tp}"]
    if p.pp > 1:
        views, stage_ids, n_stages, split = split_model(model, cfg, dims.pp_rank)
        lines.append(f"pipeline: {p.pp_schedule}, {p.pp_microbatches} microbatches per micro-batch\n{split}")
    if tp_mesh is not None:
        apply_tp(model, tp_mesh)
    if p.activation_checkpoint:
        apply_activation_checkpointing(model)
    if p.engine == "deepspeed":  # ZeRO partitions over all dp ranks; clocked levels: BucketSync (deepspeed_engine.py)
        lines.append(f"engine: deepspeed ZeRO-{p.zero_stage} over dp={dims.dp_size}")
        sync = BucketSync(dims.group("dp"))
    elif p.dp_shard > 1:
        fsdp_mesh = mesh["dp_replicate", "dp_shard"] if p.dp_replicate > 1 else mesh["dp_shard"]
        sync = FSDPClockedSync(apply_fsdp(model, fsdp_mesh))
    else:
        sync = BucketSync(dims.group("dp"))
    pipeline = None
    if p.pp > 1:  # stages are built last, around the sharded layers
        pipeline = Pipeline(views, stage_ids, n_stages, cfg, device, dims.group("pp"),
                            functools.partial(vocab_parallel_loss, mesh=tp_mesh), amp_dtype or torch.float32)
    return ParallelModel(model, sync, pipeline, tp_mesh, "\n".join(lines))
