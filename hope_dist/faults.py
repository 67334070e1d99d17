"""Faults a test or bench/chaos.py injects into a real training run (docs/launch.md, docs/reliability.md).

The trainer and the checkpointer hold a FaultHooks and call it at the two places a fault lands; the
default injects nothing. In-process tests pass one to Trainer(cfg, faults=...); jobs started as
processes (torchrun, SLURM, the chaos driver) set the environment variables below, which only the
entry point (hope_dist/pretrain.py) reads, through FaultHooks.from_env.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

NONFINITE_ENV = "HOPE_INJECT_NONFINITE_STEP"  # the last data-parallel replica's loss turns NaN at this step
STALL_ENV = "HOPE_DIST_CKPT_STALL_BEFORE_COMMIT"  # a save of this step stalls (an hour) right before its marker
DELAY_ENV = "HOPE_DIST_CKPT_COMMIT_DELAY_MS"  # every save waits this long before its marker (a fault lands inside)
STALL_S = 3600.0
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FaultHooks:
    nonfinite_step: int | None = None
    stall_before_commit: int | None = None
    commit_delay_s: float = 0.0
    sleep: Callable[[float], None] = time.sleep

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> FaultHooks:
        def step(name: str) -> int | None:
            value = int(env.get(name, "-1"))
            return value if value >= 0 else None

        return cls(nonfinite_step=step(NONFINITE_ENV), stall_before_commit=step(STALL_ENV),
                   commit_delay_s=float(env.get(DELAY_ENV, "0")) / 1000)

    def loss(self, loss_sum: torch.Tensor, step: int, last_replica: bool) -> torch.Tensor:
        """This rank's loss sum, NaN at `nonfinite_step` on the last replica (all its tp/pp ranks, as a real one)."""
        return loss_sum + float("nan") if step == self.nonfinite_step and last_replica else loss_sum

    def before_commit(self, path: Path, step: int) -> None:
        """Called by rank 0 after a save's files are written, before its marker."""
        if step == self.stall_before_commit:
            log.info("checkpoint: stalling before committing %s (%s)", path, STALL_ENV)
            self.sleep(STALL_S)
        if self.commit_delay_s:
            self.sleep(self.commit_delay_s)
