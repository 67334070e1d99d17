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
(clock windows, the clocked levels' AdamW, RNG, data position), committed like DCP ones.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from hope_dist.checkpoint import DEEPSPEED_MODEL, CheckpointError, _commit, _digests
from hope_dist.checkpoint_manager import RNGState, TrainPosition
from hope_dist.clock import CMSClock
from hope_dist.config import ConfigError, JobConfig
from hope_dist.trainer import Trainer, build_optimizer

log = logging.getLogger(__name__)

# DeepSpeed keys the trainer sets itself, and the hope_dist key that sets them
OWNED = {"train_batch_size": "training.global_batch", "train_micro_batch_size_per_gpu": "training.micro_batch",
         "gradient_accumulation_steps": "training.global_batch", "gradient_clipping": "optim.grad_clip",
         "gradient_allreduce_op": "(always sum: token-sum loss)", "optimizer": "optim.*", "scheduler": "optim.*",
         "fp16": "training.mixed_precision", "bf16": "training.mixed_precision", "comms_logger": "(bytes_reduced)"}


def deepspeed_config(cfg: JobConfig) -> dict:
    """The generated DeepSpeed config, merged over parallel.ds_config (a JSON/YAML file) when given."""
    p, t = cfg.parallel, cfg.training
    user = {}
    if p.ds_config is not None:
        try:
            user = yaml.safe_load(Path(p.ds_config).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"parallel.ds_config={p.ds_config!r} is not a readable JSON/YAML file ({e})") from None
        if not isinstance(user, dict):
            raise ConfigError(f"parallel.ds_config={p.ds_config!r} must hold a mapping (a DeepSpeed config)")
    for key, ours in OWNED.items():
        if key in user:
            raise ConfigError(f"parallel.ds_config={p.ds_config!r} sets {key!r}, which hope_dist sets from {ours}: "
                              f"remove it from the file")
    zero = dict(user.get("zero_optimization") or {})
    if zero.get("stage", p.zero_stage) != p.zero_stage:
        raise ConfigError(f"parallel.ds_config={p.ds_config!r} has zero_optimization.stage={zero['stage']} but "
                          f"parallel.zero_stage={p.zero_stage}: set --parallel.zero_stage={zero['stage']} (1 or 2) to "
                          f"match, or drop the stage from the file")
    if zero.get("offload_optimizer") or zero.get("offload_param"):
        raise ConfigError(f"parallel.ds_config={p.ds_config!r} enables ZeRO offload, which this engine does not "
                          f"support (it needs DeepSpeed's CPU Adam ops): remove offload_optimizer/offload_param")
    dp = p.dp_replicate * p.dp_shard
    return {"steps_per_print": 10**9, "zero_allow_untested_optimizer": True, **user,
            "train_batch_size": t.global_batch, "train_micro_batch_size_per_gpu": t.micro_batch,
            "gradient_accumulation_steps": t.global_batch // (dp * t.micro_batch),
            "gradient_clipping": 0.0, "gradient_allreduce_op": "sum",
            "zero_optimization": {**zero, "stage": p.zero_stage},
            "comms_logger": {"enabled": True, "prof_all": True, "verbose": False, "debug": False}}


def _import_deepspeed():
    """deepspeed on its CPU accelerator without CUDA; quiet loggers (it logs every loss-scale change)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    return deepspeed


def read_model(path: Path) -> dict[str, torch.Tensor]:
    """The model's full tensors from a DeepSpeed checkpoint folder, keyed as in HopeModel.state_dict()."""
    return torch.load(Path(path) / DEEPSPEED_MODEL, map_location="cpu", weights_only=False)["module"]


class DeepSpeedTrainer(Trainer):
    """The Trainer with DeepSpeed ZeRO for the period-1 parameters; see the module docstring."""

    def _init_distributed(self) -> None:
        if int(os.environ.get("WORLD_SIZE", "1")) == 1 and not dist.is_initialized():  # DeepSpeed needs a group
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        super()._init_distributed()

    def _build_optimizer(self) -> torch.optim.Optimizer | None:
        deepspeed = _import_deepspeed()
        zero_opt = build_optimizer([g for g in self.groups if g.period == 1], self.cfg.optim)
        zero_opt.state.clear()  # ZeRO swaps the parameters for flat partitions; their state starts on its first step
        self.engine, *_ = deepspeed.initialize(model=self.model, optimizer=zero_opt, config=deepspeed_config(self.cfg))
        self.comms = deepspeed.comm.comms_logger
        self.forward_module = self.engine
        t = self.cfg.training
        self.n_micro = t.global_batch // (self.dp_size * t.micro_batch)
        self.micro = 0
        self.zero_bytes = 0
        clocked = [g for g in self.groups if g.period > 1]
        return build_optimizer(clocked, self.cfg.optim) if clocked else None

    def _backward(self, loss: torch.Tensor) -> None:
        """DeepSpeed's backward; the step's last micro-batch is its accumulation boundary. Counts the
        bytes DeepSpeed hands to its collectives meanwhile (its comms logger; ZeRO reduces here)."""
        self.micro += 1
        self.engine.set_gradient_accumulation_boundary(self.micro == self.n_micro)
        self.comms.comms_dict.clear()
        self.engine.backward(loss, scale_wrt_gas=False)
        self.zero_bytes += sum(size * rec[0] for ops in self.comms.comms_dict.values() for size, rec in ops.items())

    def _discard(self) -> None:
        """Drop this step's gradients, ZeRO's reduced partitions too (as its own overflow skip does)."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        zero = self.engine.optimizer
        zero.zero_grad(set_to_none=True)
        for k in zero.averaged_gradients:
            zero.averaged_gradients[k] = None
            zero.all_grad_tensors[k] = None
        self.micro = self.zero_bytes = 0

    def _update(self, step: int, step_tokens: int, lr: float) -> tuple[list, dict[str, int], float]:
        ticking, sent = self.sync.reduce(self.clock, step, step_tokens)  # banks and reduces the clocked levels
        sent = {g.name: sent[g.name] for g in ticking if g.period > 1}
        sent["deepspeed"] = self.zero_bytes
        params = []
        for g in ticking:
            for _, p in g.params:
                if g.period > 1 and p.grad is not None:
                    p.grad.div_(g.window_tokens)
                    params.append(p)
        zero = self.engine.optimizer
        zero_norm = float(zero.scaled_global_norm()) / step_tokens  # its summed gradients' norm, over dp
        norm = math.sqrt(zero_norm ** 2 + sum(p.grad.double().pow(2).sum().item() for p in params))
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        coef = min(1.0, clip / (norm + 1e-6))
        if coef < 1:
            for p in params:
                p.grad.mul_(coef)
        zero.override_loss_scale(step_tokens / coef)  # ZeRO divides its gradients by the loss scale in step()
        optimizers = [zero] + ([self.optimizer] if self.optimizer is not None else [])
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_scale"]
        self.engine.step()
        zero.override_loss_scale(1.0)  # the next backward is unscaled
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.micro = self.zero_bytes = 0
        return ticking, sent, norm

    # ------------------------------------------------------------------ checkpoints
    def _local_state(self) -> dict:
        """This rank's hope_rank{r}.pt: its own clock and RNG (no rank keys: one file per rank), the
        clocked levels' AdamW, the train position."""
        return {CMSClock.KEY: self.clock.state_dict(), RNGState.KEY: self.checkpoint.rng.state_dict(),
                "optim": self.optimizer.state_dict() if self.optimizer is not None else None,
                TrainPosition.KEY: self.checkpoint.train.state_dict()}

    def save(self, skippable: bool = False) -> Path:
        """DeepSpeed's save_checkpoint into step-N/, this rank's hope_rank{r}.pt, then the commit."""
        path = self.ckpt.path(self.step)
        if self.rank == 0 and path.exists():
            shutil.rmtree(path)
        dist.barrier()
        self.engine.save_checkpoint(str(self.ckpt.dir), tag=path.name, save_latest=False)
        torch.save(self._local_state(), path / f"hope_rank{self.rank}.pt")
        dist.barrier()
        if self.rank == 0:
            meta = {**self._meta(), "engine": "deepspeed", "zero_stage": self.cfg.parallel.zero_stage}
            _commit(path, self.step, meta, _digests(path, sorted(f for f in path.iterdir() if f.is_file())))
            self.ckpt._prune()
        dist.barrier()
        self.ckpt.last_step = self.step
        return path

    def maybe_resume(self) -> None:
        """Resume from a DeepSpeed checkpoint of the same dp size, bit for bit."""
        opened = self.checkpoint.open_resume("deepspeed")
        if opened is None:
            return
        path, meta = opened
        if int(meta["layout"]["dp"]) != self.dp_size:
            raise CheckpointError(f"{path} was saved under dp={meta['layout']['dp']}, now dp={self.dp_size}: ZeRO's "
                                  f"optimizer partitions are per dp rank; resume with the saved dp size")
        loaded, _ = self.engine.load_checkpoint(str(path.parent), tag=path.name, load_lr_scheduler_states=False)
        if loaded is None:
            raise CheckpointError(f"{path}: DeepSpeed found no checkpoint to load in it")
        state = torch.load(path / f"hope_rank{self.rank}.pt", map_location=self.device, weights_only=False)
        self.clock.load_state_dict(state[CMSClock.KEY])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optim"])
        self.checkpoint.rng.load_state_dict(state[RNGState.KEY])
        self.checkpoint.train.load_state_dict(state[TrainPosition.KEY])
        if self.rank == 0:
            log.info("resumed from %s at step %d (deepspeed)", path, self.step)
