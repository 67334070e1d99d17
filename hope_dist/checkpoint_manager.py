"""The training state of a checkpoint: which component owns which entry, how a save assembles them
into one DCP state dict and how a resume restores them under any layout (docs/checkpoints.md).

  model, optim   the model's and optimizer's state dicts, layout-free (DCP reshards them)
  clock          CMSClock (hope_dist/clock.py): one entry per data-parallel rank, re-split across dp sizes
  rng            RNGState: one entry per global rank
  train          TrainPosition: step, tokens seen and the data stream's position
  carry          CarriedState (training.carry_state): each global rank's carried fast-weight states

The files themselves (commit marker, manifest, async writes) are hope_dist.checkpoint's Checkpointer.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_state_dict)

from hope_dist.carried_state import CarriedState
from hope_dist.checkpoint import (Checkpointer, CheckpointError, check_model_config, read_meta, stored_keys,
                                  verify_distributed)
from hope_dist.clock import CMSClock
from hope_dist.config import JobConfig

log = logging.getLogger(__name__)

# Optimizer state and param-group settings keyed by parameter name, not group index: pipeline
# stages hold different groups under the same index, and checkpoints must not depend on that.
OPTIM_BY_NAME = StateDictOptions(flatten_optimizer_state_dict=True)
# What to do with a checkpoint of the other parallel.engine, by the engine that wrote it
OTHER_ENGINE = {"deepspeed": "resume it with --parallel.engine=deepspeed (or export-hf it and import-hf the folder)",
                "native": "resume it with --parallel.engine=native (or start a new run_dir)"}


class TrainingRun(Protocol):
    """What the manager reads of the trainer (hope_dist.trainer.Trainer), and the position it sets on resume."""

    cfg: JobConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None
    clock: CMSClock
    checkpointer: Checkpointer
    data: Any  # the train stream: state_dict / load_state_dict
    carried: CarriedState | None
    rank: int
    dp_rank: int
    dp_size: int
    device: torch.device
    step: int
    tokens_seen: int


class RNGState:
    """This rank's torch generators (CPU, and CUDA on a GPU). Every global rank has its own entry
    "rank<r>" (flattened rng.rank<r>.cpu, .cuda): ranks of a layout draw different numbers."""

    KEY = "rng"

    def __init__(self, rank: int, device: torch.device):
        self.rank, self.device = rank, device

    @staticmethod
    def rank_key(rank: int) -> str:
        return f"rank{rank}"

    @classmethod
    def parse_key(cls, flat_key: str) -> int | None:
        """The global rank of a flattened checkpoint key of the RNG entry; None for another part's key."""
        parts = flat_key.split(".", 2)
        if len(parts) < 3 or parts[0] != cls.KEY or not parts[1].startswith("rank"):
            return None
        rank = parts[1].removeprefix("rank")
        return int(rank) if rank.isdigit() else None

    def state_dict(self) -> dict[str, torch.Tensor]:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def load_state_dict(self, rng: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(rng["cpu"].cpu())
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"].cpu(), self.device)

    def checkpoint_state(self) -> dict:
        """This rank's share of the checkpoint's RNG entry."""
        return {self.rank_key(self.rank): self.state_dict()}

    def stored_in(self, keys: set[str]) -> bool:
        """Whether a checkpoint with these flattened keys holds this rank's generators (one written
        with fewer ranks may not: this rank's then stay seeded)."""
        return f"{self.KEY}.{self.rank_key(self.rank)}.cpu" in keys

    def load_checkpoint_state(self, loaded: dict) -> None:
        self.load_state_dict(loaded[self.rank_key(self.rank)])


class TrainPosition:
    """Where training stands: the trainer's step and tokens seen, and its data stream's position
    (a count of global samples, so the same on every rank and valid under any dp size)."""

    KEY = "train"

    def __init__(self, trainer: TrainingRun):
        self.trainer = trainer

    def state_dict(self) -> dict:
        t = self.trainer
        return {"step": t.step, "tokens_seen": t.tokens_seen, "data": t.data.state_dict()}

    def load_state_dict(self, train: dict) -> None:
        t = self.trainer
        t.step = int(train["step"])
        t.tokens_seen = int(train["tokens_seen"])
        t.data.load_state_dict(train["data"])


class CheckpointManager:
    """Saves and resumes a Trainer's state through its Checkpointer (trainer.checkpointer); see the module
    docstring. Native engine only: parallel.engine=deepspeed writes its own files (deepspeed_engine.py)."""

    def __init__(self, trainer: TrainingRun):
        self.trainer = trainer
        self.rng = RNGState(trainer.rank, trainer.device)
        self.train = TrainPosition(trainer)

    def state(self) -> dict:
        """The full training state as a DCP state dict. Rank-specific entries are keyed by rank
        (DCP dedups replicated entries by key); the LR schedule is a function of the step."""
        t = self.trainer
        model_sd, optim_sd = get_state_dict(t.model, t.optimizer, options=OPTIM_BY_NAME)
        state = {"model": model_sd, "optim": optim_sd, CMSClock.KEY: t.clock.checkpoint_state(t.dp_rank),
                 RNGState.KEY: self.rng.checkpoint_state(), TrainPosition.KEY: self.train.state_dict()}
        if t.carried is not None:
            state[CarriedState.KEY] = t.carried.checkpoint_state()
        return state

    def save(self, meta: dict, skippable: bool = False) -> Path:
        return self.trainer.checkpointer.save(self.trainer.step, self.state(), meta, skippable)

    def open_resume(self, engine: str) -> tuple[Path, dict] | None:
        """The checkpoint `checkpoint.resume` names and its meta.json, checked for the job's model
        config, the parallel.engine `engine` and every shard; None when there is none to resume."""
        t = self.trainer
        path = t.checkpointer.resume_path()
        if path is None:
            return None
        meta = read_meta(path)
        check_model_config(path, meta, t.cfg.model)
        saved = "deepspeed" if meta.get("engine") == "deepspeed" else "native"
        if saved != engine:
            raise CheckpointError(f"{path} was written by parallel.engine={saved}: {OTHER_ENGINE[saved]}")
        verify_distributed(path)
        return path, meta

    def resume(self) -> None:
        """Load the checkpoint `checkpoint.resume` names, from any (dp, tp, pp) layout: DCP
        reshards model and optimizer; the clock's window sums are re-split (CMSClock.resplit);
        RNG streams of ranks the checkpoint did not have stay seeded. A weights-only checkpoint
        (tools/convert.py import-hf without a base) sets the model and starts at step 0."""
        t = self.trainer
        opened = self.open_resume("native")
        if opened is None:
            return
        path, meta = opened
        keys = stored_keys(path)
        state = self.state()
        if not any(k.startswith("optim.") for k in keys):
            state = {"model": state["model"]}
            t.checkpointer.load(path, state)
            set_model_state_dict(t.model, state["model"])
            if t.rank == 0:
                log.info("initialised the model from %s (weights only); training starts at step 0", path)
            return
        saved_dp = int(meta["layout"]["dp"])
        state[CMSClock.KEY] = t.clock.load_target(saved_dp)
        has_rng = self.rng.stored_in(keys)
        if not has_rng:
            state.pop(RNGState.KEY)
        if t.carried is not None:
            state[CarriedState.KEY] = t.carried.load_target(keys)
        t.checkpointer.load(path, state)
        set_state_dict(t.model, t.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=OPTIM_BY_NAME)
        t.clock.load_checkpoint_state(state[CMSClock.KEY], t.dp_rank, t.dp_size)
        if has_rng:
            self.rng.load_checkpoint_state(state[RNGState.KEY])
        self.train.load_state_dict(state[TrainPosition.KEY])
        if t.carried is not None:
            t.carried.load_checkpoint_state(state[CarriedState.KEY], meta.get("carry_layout"))
        if t.rank == 0:
            layout = f" (saved under dp={saved_dp}, now dp={t.dp_size})" if saved_dp != t.dp_size else ""
            log.info("resumed from %s at step %d%s", path, t.step, layout)
