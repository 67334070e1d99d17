"""DeepSpeed ZeRO (stage 1 or 2) as the data-parallel engine, with the CMS clocks kept (docs/parallel.md, Engines).

DeepSpeed reduces every gradient of its engine at each accumulation boundary (ZeRO-2: at every
backward) and steps every parameter group of its optimizer at every step: it cannot skip a
group. So the parameters are split by clock:
- period-1 groups (all but the clocked CMS levels) belong to one DeepSpeed engine: ZeRO partitions
  their optimizer state (stage 1) and gradients (stage 2). It reduces them as a SUM
  (gradient_allreduce_op), and the division by the step's global token count and the clip
  coefficient reach it as its loss scale, so its update is the native trainer's;
- clocked CMS levels (period > 1) stay outside it, on the native clocked path: the clock banks their
  gradients in float32, BucketSync all-reduces a level once on its tick, a plain AdamW steps it on
  its ticks only. Lost against FSDP2: their AdamW state is replicated on every dp rank, not sharded.
One global gradient norm over both parts clips the step. On CPU DeepSpeed runs on its CPU
accelerator (DS_ACCELERATOR=cpu), which falls back to gloo when oneCCL's bindings are absent.

Checkpoints are DeepSpeed's own (engine.save_checkpoint into step-N/) plus a hope_rank{r}.pt per rank
(clock windows, the clocked levels' AdamW, RNG, data position), committed like DCP ones. A resume
first checks that no file of the folder carries pickled code (deepspeed_checkpoint.py).
The Trainer holds a DeepSpeedEngine (parallel/engine.py names the interface).
"""
from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from hope_dist.checkpoint import CheckpointError, file_digests
from hope_dist.checkpoint_manager import CheckpointManager, RNGState, TrainPosition
from hope_dist.clock import ClockGroup, CMSClock
from hope_dist.config import JobConfig
from hope_dist.optim import build_adamw
from hope_dist.parallel.deepspeed_checkpoint import check_folder, load_tensors
from hope_dist.parallel.deepspeed_config import read_user_config

log = logging.getLogger(__name__)


def deepspeed_config(cfg: JobConfig) -> dict:
    """The generated DeepSpeed config, merged over parallel.ds_config (a JSON/YAML file) when given."""
    p, t = cfg.parallel, cfg.training
    user = read_user_config(p.ds_config, p.zero_stage)
    zero = dict(user.get("zero_optimization") or {})
    dp = p.dp_replicate * p.dp_shard
    return {"steps_per_print": 10**9, "zero_allow_untested_optimizer": True, **user,
            "train_batch_size": t.global_batch, "train_micro_batch_size_per_gpu": t.micro_batch,
            "gradient_accumulation_steps": t.global_batch // (dp * t.micro_batch),
            "gradient_clipping": 0.0, "gradient_allreduce_op": "sum",
            "zero_optimization": {**zero, "stage": p.zero_stage},
            "comms_logger": {"enabled": True, "prof_all": True, "verbose": False, "debug": False}}


def _import_deepspeed():
    """deepspeed on its CPU accelerator without CUDA; quiet loggers (it logs every loss-scale change).
    On CPU its shared-memory comm op is marked unavailable: it serves only inference_all_reduce, which
    training never calls, and its JIT build took 77-220 s on a machine's first start (gloo does the rest)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed

    if os.environ["DS_ACCELERATOR"] == "cpu":  # DeepSpeed keeps edits to this dict (deepspeed/ops/__init__.py)
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.utils.logger.setLevel(logging.WARNING)
    return deepspeed


class DeepSpeedEngine:
    """ZeRO for the period-1 groups, a plain AdamW for the clocked levels; see the module docstring."""

    def __init__(self, cfg: JobConfig, model: nn.Module, groups: list[ClockGroup], dp_size: int):
        deepspeed = _import_deepspeed()
        self.cfg = cfg
        zero_opt = build_adamw([g for g in groups if g.period == 1], cfg.optim)
        zero_opt.state.clear()  # ZeRO swaps the parameters for flat partitions; their state starts on its first step
        self.ds, *_ = deepspeed.initialize(model=model, optimizer=zero_opt, config=deepspeed_config(cfg))
        self.zero = self.ds.optimizer
        self.comms = deepspeed.comm.comms_logger
        self.module = self.ds
        t = cfg.training
        self.n_micro = t.global_batch // (dp_size * t.micro_batch)
        self.micro = self.zero_bytes = 0
        clocked = [g for g in groups if g.period > 1]
        self.optimizer = build_adamw(clocked, cfg.optim) if clocked else None
        self.optimizers = [self.zero] + ([self.optimizer] if self.optimizer is not None else [])

    @staticmethod
    def prepare_world(world: int) -> None:
        """DeepSpeed needs a process group, also for one process."""
        if world == 1 and not dist.is_initialized():
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

    def backward(self, loss: torch.Tensor) -> None:
        """DeepSpeed's backward; the step's last micro-batch is its accumulation boundary. Counts the
        bytes DeepSpeed hands to its collectives meanwhile (its comms logger; ZeRO reduces here)."""
        self.micro += 1
        self.ds.set_gradient_accumulation_boundary(self.micro == self.n_micro)
        self.comms.comms_dict.clear()
        self.ds.backward(loss, scale_wrt_gas=False)
        self.zero_bytes += sum(size * rec[0] for ops in self.comms.comms_dict.values() for size, rec in ops.items())

    def window_groups(self, ticking: list[ClockGroup]) -> list[ClockGroup]:
        return [g for g in ticking if g.period > 1]  # ZeRO's groups: summed over dp, scaled through the loss scale

    def clip(self, params: list[torch.Tensor], step_tokens: int, max_norm: float) -> float:
        """One norm over ZeRO's summed gradients (divided by the step's tokens) and the clocked `params`;
        ZeRO gets the division and the clip coefficient as its loss scale."""
        zero_norm = float(self.zero.scaled_global_norm()) / step_tokens  # its summed gradients' norm, over dp
        norm = math.sqrt(zero_norm ** 2 + sum(p.grad.double().pow(2).sum().item() for p in params))
        coef = min(1.0, max_norm / (norm + 1e-6))
        if coef < 1:
            for p in params:
                p.grad.mul_(coef)
        self.zero.override_loss_scale(step_tokens / coef)  # ZeRO divides its gradients by the loss scale in step()
        return norm

    def step(self) -> None:
        self.ds.step()
        self.zero.override_loss_scale(1.0)  # the next backward is unscaled
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.micro = self.zero_bytes = 0

    def discard(self) -> None:
        """Drop this step's gradients, ZeRO's reduced partitions too (as its own overflow skip does)."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        self.zero.zero_grad(set_to_none=True)
        for k in self.zero.averaged_gradients:
            self.zero.averaged_gradients[k] = None
            self.zero.all_grad_tensors[k] = None
        self.micro = self.zero_bytes = 0

    def bytes_reduced(self, sent: dict[str, int], ticking: list[ClockGroup]) -> dict[str, int]:
        return {**{g.name: sent[g.name] for g in ticking if g.period > 1}, "deepspeed": self.zero_bytes}

    # ------------------------------------------------------------------ checkpoints
    def _local_state(self, state: CheckpointManager) -> dict:
        """This rank's hope_rank{r}.pt: its own clock and RNG (no rank keys: one file per rank), the
        clocked levels' AdamW, the train position."""
        return {CMSClock.KEY: state.trainer.clock.state_dict(), RNGState.KEY: state.rng.state_dict(),
                "optim": self.optimizer.state_dict() if self.optimizer is not None else None,
                TrainPosition.KEY: state.train.state_dict()}

    def save(self, state: CheckpointManager, meta: dict, skippable: bool) -> Path:
        """DeepSpeed's save_checkpoint into step-N/, this rank's hope_rank{r}.pt, then the commit."""
        run, files = state.trainer, state.trainer.checkpointer
        path = files.path(run.step)
        if run.rank == 0 and path.exists():
            shutil.rmtree(path)
        dist.barrier()
        self.ds.save_checkpoint(str(files.dir), tag=path.name, save_latest=False)
        torch.save(self._local_state(state), path / f"hope_rank{run.rank}.pt")
        dist.barrier()
        if run.rank == 0:
            meta = {**meta, "engine": "deepspeed", "zero_stage": self.cfg.parallel.zero_stage}
            files.commit(path, run.step, meta, file_digests(sorted(f for f in path.iterdir() if f.is_file())))
        dist.barrier()
        files.last_step = run.step
        return path

    def resume(self, state: CheckpointManager) -> None:
        """Resume from a DeepSpeed checkpoint of the same dp size, bit for bit."""
        opened = state.open_resume("deepspeed")
        if opened is None:
            return
        path, meta = opened
        run = state.trainer
        if int(meta["layout"]["dp"]) != run.dp_size:
            raise CheckpointError(f"{path} was saved under dp={meta['layout']['dp']}, now dp={run.dp_size}: ZeRO's "
                                  f"optimizer partitions are per dp rank; resume with the saved dp size")
        check_folder(path)  # DeepSpeed's loader unpickles with weights_only=False
        loaded, _ = self.ds.load_checkpoint(str(path.parent), tag=path.name, load_lr_scheduler_states=False)
        if loaded is None:
            raise CheckpointError(f"{path}: DeepSpeed found no checkpoint to load in it")
        local = load_tensors(path / f"hope_rank{run.rank}.pt", map_location=run.device)
        run.clock.load_state_dict(local[CMSClock.KEY])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(local["optim"])
        state.rng.load_state_dict(local[RNGState.KEY])
        state.train.load_state_dict(local[TrainPosition.KEY])
        if run.rank == 0:
            log.info("resumed from %s at step %d (deepspeed)", path, run.step)
