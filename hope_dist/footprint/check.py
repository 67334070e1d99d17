"""Stop a job whose estimated memory per device exceeds the device's, before the first step.

The budget is `training.device_memory_gb`, or else a CUDA device's total memory; CPU jobs are not
checked unless the key is set, and 0 turns the check off. The refusal names the estimate by part and
the cheapest setting of micro-batch, activation checkpointing and the memory op's recompute that fits.
"""
from __future__ import annotations

import logging

import torch

from hope_dist.config import JobConfig
from hope_dist.errors import UserError
from hope_dist.footprint.estimate import Estimate, cheapest_fit, estimate

log = logging.getLogger(__name__)


class MemoryBudgetError(UserError):
    """The job would run out of device memory at its first step."""

    label = "memory error"


def device_budget(cfg: JobConfig, device: torch.device) -> float | None:
    """Bytes the job must fit in on `device`, or None: no check."""
    gb = cfg.training.device_memory_gb
    if gb is not None:
        return gb * 1e9 if gb > 0 else None
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return None


def _current(cfg: JobConfig) -> dict[str, str]:
    t, p = cfg.training, cfg.parallel
    return {"--training.micro_batch": str(t.micro_batch),
            "--parallel.activation_checkpoint": str(p.activation_checkpoint).lower(),
            "--parallel.memory_op_recompute": str(p.memory_op_recompute).lower()}


def check_memory(cfg: JobConfig, device: torch.device, amp_dtype: torch.dtype | None) -> Estimate | None:
    """The job's estimate when it fits its budget (None: not checked); else MemoryBudgetError, one line."""
    budget = device_budget(cfg, device)
    if budget is None:
        return None
    est = estimate(cfg, amp_dtype, device.type)
    log.info("memory estimate per device: %s; budget %.1f GB", est.describe(), budget / 1e9)
    if est.total <= budget:
        return est
    source = (f"training.device_memory_gb={cfg.training.device_memory_gb}" if cfg.training.device_memory_gb
              else f"the total memory of {device}")
    fit = cheapest_fit(cfg, amp_dtype, budget, device.type)
    if fit is None:
        fix = ("no micro-batch, activation checkpointing or memory-op recompute setting fits: spread the model over "
               "more GPUs (parallel.dp_shard, tp, pp) or shorten training.seq_len")
    else:
        overrides, fitting = fit
        now = _current(cfg)
        changed = " ".join(o for o in overrides if now[o.split("=")[0]] != o.split("=", 1)[1])
        fix = f"{changed} fits ({fitting.total / 1e9:.1f} GB)"
    raise MemoryBudgetError(
        f"the job needs an estimated {est.describe()} per device at training.micro_batch={cfg.training.micro_batch}, "
        f"more than {budget / 1e9:.1f} GB ({source}): {fix}; every setting: "
        f"python -m tools.estimate_memory CONFIG (docs/memory.md)")
