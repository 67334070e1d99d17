"""The data-parallel engine the Trainer holds (parallel.engine): native FSDP2/replication, or DeepSpeed ZeRO.

The trainer runs the clocked step (docs/model.md section 4) and asks its engine only what differs:
what a forward calls, the backward, which ticking groups hold window sums the trainer divides,
the clip, the optimizer step, dropping a skipped step's gradients, the bytes it reduced, and how
the training state is saved and resumed. Engine is that interface; ENGINES names them. Each class
also has a static prepare_world(world), called before the process group is built.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from hope_dist.checkpoint_manager import CheckpointManager
from hope_dist.clock import ClockGroup
from hope_dist.config import JobConfig
from hope_dist.optim import build_optimizer
from hope_dist.parallel.deepspeed_engine import DeepSpeedEngine
from hope_dist.parallel.grad_sync import clip_grad_norm_


class Engine(Protocol):
    module: nn.Module  # what a forward calls
    optimizer: torch.optim.Optimizer | None  # the training state's "optim" entry (native checkpoints)
    optimizers: list[torch.optim.Optimizer]  # every optimizer whose groups follow the LR schedule

    def backward(self, loss: torch.Tensor) -> None: ...

    def window_groups(self, ticking: list[ClockGroup]) -> list[ClockGroup]:
        """The ticking groups whose gradients are the clock's window sums: the trainer divides and clips them."""

    def clip(self, params: list[torch.Tensor], step_tokens: int, max_norm: float) -> float:
        """Clip the step's gradients to `max_norm` together; the global norm before clipping."""

    def step(self) -> None:
        """Step every optimizer (lr already set) and drop the gradients."""

    def discard(self) -> None:
        """Drop this step's gradients (a skipped step)."""

    def bytes_reduced(self, sent: dict[str, int], ticking: list[ClockGroup]) -> dict[str, int]: ...

    def save(self, state: CheckpointManager, meta: dict, skippable: bool) -> Path: ...

    def resume(self, state: CheckpointManager) -> None: ...


class NativeEngine:
    """FSDP2, TP and pipeline stages as parallelize() left the model; one torch optimizer (AdamW or M3)
    over every clock group; the clocked sync reduced every gradient; DCP checkpoints."""

    def __init__(self, cfg: JobConfig, model: nn.Module, groups: list[ClockGroup], dp_size: int):
        self.module = model
        self.pp = cfg.parallel.pp
        self.optimizer = build_optimizer(groups, cfg.optim, model)
        self.optimizers = [self.optimizer]

    @staticmethod
    def prepare_world(world: int) -> None:
        """Nothing before the process group: one process runs without one."""

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def window_groups(self, ticking: list[ClockGroup]) -> list[ClockGroup]:
        return ticking

    def clip(self, params: list[torch.Tensor], step_tokens: int, max_norm: float) -> float:
        return clip_grad_norm_(params, max_norm, self.pp)

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def discard(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def bytes_reduced(self, sent: dict[str, int], ticking: list[ClockGroup]) -> dict[str, int]:
        return sent

    def save(self, state: CheckpointManager, meta: dict, skippable: bool) -> Path:
        return state.save(meta, skippable)

    def resume(self, state: CheckpointManager) -> None:
        state.resume()


ENGINES: dict[str, type[NativeEngine] | type[DeepSpeedEngine]] = {"native": NativeEngine, "deepspeed": DeepSpeedEngine}
