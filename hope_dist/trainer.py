"""The training loop: build everything from a JobConfig, step, log, checkpoint, stop cleanly.

One optimizer step (docs/model.md section 4):
  1. forward/backward every micro-batch of this rank's share with a token-SUM loss;
  2. the CMS clock banks the gradients of levels that do not tick and hands the window sums
     back to those that do;
  3. ticking groups are reduced once over the data-parallel group and divided by the global
     token count of their window (so the result is independent of the data-parallel size);
  4. one global norm clip over what steps now; AdamW (or M3, docs/optim.md) steps only
     parameters with a gradient, so a level's optimizer step count counts its ticks and nothing
     decays between ticks.
"""
from __future__ import annotations

import json
import math
import os
import platform
import signal
import socket
import subprocess
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from hope_dist.checkpoint import Checkpointer, committed_steps
from hope_dist.carried_state import CarriedState, layout_of
from hope_dist.checkpoint_manager import CheckpointManager
from hope_dist.clock import CMSClock, build_clock_groups
from hope_dist.config import JobConfig, OptimConfig
from hope_dist.data import build_train_stream
from hope_dist.data.validation import build_validation_set
from hope_dist.deadline import group_construction
from hope_dist.errors import DataError
from hope_dist.faults import FaultHooks
from hope_dist.footprint import check_memory
from hope_dist.metrics import MetricsLogger
from hope_dist.model import build_model, count_parameters, document_segments
from hope_dist.model.memory_health import STATS as HEALTH_STATS
from hope_dist.parallel.engine import ENGINES, Engine
from hope_dist.parallel.mesh import build_mesh, check_world_size
from hope_dist.parallel.parallelize import parallelize
from hope_dist.parallel.process_group import init_default_group
from hope_dist.parallel.tensor_parallel import loss_context
from kernels.hope_memory import torch_chunked


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Trainer:
    """The loop over one engine (parallel/engine.py: native FSDP2 or DeepSpeed ZeRO). `faults`: what a
    fault test injects (hope_dist/faults.py); nothing by default."""

    def __init__(self, cfg: JobConfig, faults: FaultHooks | None = None):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.faults = faults or FaultHooks()
        self._init_distributed()
        t = cfg.training
        self.device = torch.device(f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        mp = t.mixed_precision
        self.amp_dtype = torch.bfloat16 if mp == "bf16" or (mp == "auto" and self.device.type == "cuda") else None
        torch_chunked.RECOMPUTE = cfg.parallel.memory_op_recompute  # the memory op's per-chunk recompute
        if self.rank == 0:  # the same estimate on every rank; rank 0's refusal ends the job (docs/memory.md)
            check_memory(cfg, self.device, self.amp_dtype)
        torch.manual_seed(t.seed)

        self.data = build_train_stream(cfg.data.paths, cfg.data.weights, seq_len=t.seq_len,
                                       global_batch=t.global_batch, dp_rank=self.dp_rank,
                                       dp_size=self.dp_size, seed=t.seed, eod_id=cfg.data.eod_id,
                                       tokenizer=cfg.data.tokenizer, valid_fraction=cfg.data.valid_fraction,
                                       lanes=cfg.data_in_lanes, lane_groups=cfg.data.lane_groups)
        if self.data.vocab_size > cfg.model.vocab_size:
            raise DataError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's vocabulary "
                f"({self.data.vocab_size}); set --model.vocab_size={self.data.vocab_size} or larger")
        self.eod_id = self.data.eod_id if t.reset_state_at_eod else None
        self.carried = CarriedState(self.rank, self.eod_id, self.device, layout_of(cfg, self.dp_size)) \
            if t.carry_state else None  # the rows' state from one step to the next
        self.valid = None
        if cfg.eval.every > 0:
            self.valid = build_validation_set(cfg.data.paths, cfg.data.valid_paths, cfg.data.valid_fraction,
                                              seq_len=t.seq_len, tokens=cfg.eval.tokens, global_batch=t.global_batch,
                                              dp_rank=self.dp_rank, dp_size=self.dp_size,
                                              vocab_size=cfg.model.vocab_size)

        self.model = build_model(cfg.model, self.device)  # whole and initialised on every rank
        self.parallel = parallelize(self.model, cfg, self.dims, self.device, self.amp_dtype)  # prunes, shards
        self.mixers = {name: block.mixer for name, block in self.model.layers.items()
                       if cfg.model.mixer_spec.memory_health}  # this rank's layers, where they have probes
        self.groups = build_clock_groups(self.model)
        self.clock = CMSClock(self.groups)
        self.sync = self.parallel.sync
        self.engine: Engine = ENGINES[cfg.parallel.engine](cfg, self.model, self.groups, self.dp_size)
        self.optimizer = self.engine.optimizer  # the training state's "optim" entry
        self.sync.attach(self.clock)
        self.checkpointer = Checkpointer(cfg.checkpoint, self.run_dir, cfg.parallel.timeout_s,
                                         before_commit=self.faults.before_commit)  # the step-N folders
        self.training_state = CheckpointManager(self)  # which part of the run each checkpoint entry holds
        self.step = 0
        self.tokens_seen = 0
        self._stop_signal: str | None = None

    # ------------------------------------------------------------------ setup
    def _init_distributed(self) -> None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        check_world_size(self.cfg.parallel, world)
        ENGINES[self.cfg.parallel.engine].prepare_world(world)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if world > 1 and backend == "nccl":
            torch.cuda.set_device(self.local_rank)
        # gloo's own connect timeout is timeout_s; the deadline catches the hangs past it (hope_dist/deadline.py)
        with group_construction(self.cfg.parallel.timeout_s, "process group and device mesh construction"):
            if world > 1 and not dist.is_initialized():
                init_default_group(backend, self.cfg.parallel.timeout_s)
            self.dims = build_mesh(self.cfg.parallel, "cuda" if torch.cuda.is_available() else "cpu")
        self.world = world
        self.dp_rank, self.dp_size = self.dims.dp_rank, self.dims.dp_size
        self.dp_group = self.dims.group("dp")

    def _write_run_info(self) -> None:
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        info = {"git_commit": git_commit(), "torch": torch.__version__, "python": platform.python_version(),
                "host": socket.gethostname(), "world_size": self.world, "device": str(self.device),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with open(self.run_dir / "run_info.jsonl", "a") as f:
            f.write(json.dumps(info) + "\n")

    # ------------------------------------------------------------------ state
    def _meta(self) -> dict:
        """meta.json of a checkpoint of this step (hope_dist.checkpoint)."""
        p = self.cfg.parallel
        return {"step": self.step, "tokens_seen": self.tokens_seen, "git_commit": git_commit(),
                "next_lr": lr_at(self.step, self.cfg.optim, self.cfg.training.steps),
                "layout": {"dp": self.dp_size, "tp": p.tp, "pp": p.pp}, "world_size": self.world,
                "torch": torch.__version__, "config": self.cfg.to_dict(),
                **({"carry_layout": self.carried.layout} if self.carried is not None else {})}

    def save(self, skippable: bool = False) -> Path:
        return self.engine.save(self.training_state, self._meta(), skippable)

    def maybe_resume(self) -> None:
        """Resume from `checkpoint.resume`, if any (the engine's resume: CheckpointManager.resume for native)."""
        self.engine.resume(self.training_state)

    # ------------------------------------------------------------------ loop
    def _request_stop(self, signum, _frame) -> None:
        self._stop_signal = signal.Signals(signum).name

    def _forward_loss(self, tokens: torch.Tensor, labels: torch.Tensor, backward: bool = True,
                      key: str | None = None, carry: torch.Tensor | None = None) -> torch.Tensor:
        """Token-sum loss of one micro-batch (zero off the last pipeline stage), and its backward.
        key: where this micro-batch's carried state lives (training.carry_state); carry: its rows'
        continuation mask (CarriedState.carry_mask)."""
        def segments(t, c=None):
            return document_segments(t, self.eod_id, c) if self.eod_id is not None or c is not None else None

        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            if self.parallel.pipeline is not None:  # every stage's forward (and backward)
                carried = (self.carried, key, carry) if key is not None else None
                return self.parallel.pipeline.step(tokens, labels, segments, backward, carried)
            if key is None:
                logits = self.engine.module(tokens, segments(tokens))
            else:
                logits, state = self.engine.module(tokens, segments(tokens, carry), state=self.carried.get(key),
                                                   return_state=True)
                self.carried.put(key, state)
        loss = self.parallel.loss(logits, labels)  # token sum; vocab-parallel under tp
        if backward:
            self.engine.backward(loss)
        return loss.detach()

    def _global_sums(self, loss_sum: torch.Tensor, tokens: int) -> torch.Tensor:
        """(loss sum, token count) over data-parallel ranks and pipeline stages, float64."""
        stats = torch.stack([loss_sum.double(), torch.tensor(float(tokens), dtype=torch.float64,
                                                             device=self.device)])
        if self.dp_group is not None:
            dist.all_reduce(stats, group=self.dp_group)
        if self.dims.group("pp") is not None:  # only the last stage has the loss
            loss_total = stats[:1].clone()
            dist.all_reduce(loss_total, group=self.dims.group("pp"))
            stats[0] = loss_total[0]
        return stats

    @torch.no_grad()
    def validate(self) -> dict:
        """Mean loss over the held-out set (data/validation.py), the same under every layout."""
        t0 = time.perf_counter()
        loss_sum, tokens = torch.zeros((), device=self.device), 0
        with loss_context(self.parallel.tp_mesh):
            for batch in self.valid.batches():
                for tok, lab in zip(batch["tokens"].split(self.cfg.training.micro_batch),
                                    batch["labels"].split(self.cfg.training.micro_batch)):
                    loss_sum += self._forward_loss(tok.to(self.device), lab.to(self.device), backward=False)
                    tokens += lab.numel()
        stats = self._global_sums(loss_sum, tokens)
        val_loss = (stats[0] / stats[1]).item()
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0)), "val_tokens": int(stats[1].item()),
                "val_time_s": time.perf_counter() - t0}

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        cfg = self.cfg
        batch = self.data.next_batch()
        tokens, labels = batch["tokens"].to(self.device), batch["labels"].to(self.device)
        loss_sum = torch.zeros((), device=self.device)
        probe = cfg.metrics.memory_health and self.step % cfg.metrics.log_every == 0
        for mixer in self.mixers.values():
            mixer.probe_health = probe
        with loss_context(self.parallel.tp_mesh):
            mb = cfg.training.micro_batch
            if self.carried is None:
                for tok, lab in zip(tokens.split(mb), labels.split(mb)):
                    loss_sum += self._forward_loss(tok, lab)
            else:
                carry = self.carried.carry_mask(batch["prev"].to(self.device)).split(mb)
                for i, (tok, lab) in enumerate(zip(tokens.split(mb), labels.split(mb))):
                    loss_sum += self._forward_loss(tok, lab, key=f"g{batch['group']}m{i}", carry=carry[i])
        loss_sum = self.faults.loss(loss_sum, self.step, last_replica=self.dp_rank == self.dp_size - 1)
        stats = self._global_sums(loss_sum, labels.numel())
        step_tokens = int(stats[1].item())
        loss = (stats[0] / stats[1]).item()
        step = self.step
        metrics = {"loss": loss, "lr": lr_at(step, cfg.optim, cfg.training.steps)}
        if probe:
            metrics.update(self._memory_health())
        if not math.isfinite(loss):
            self._discard()
            if cfg.training.nonfinite == "stop":
                raise FloatingPointError(
                    f"non-finite loss ({loss}) at step {step} (training.nonfinite=stop); the newest "
                    f"complete checkpoint is intact; rerun with --training.nonfinite=skip to skip such steps")
            metrics.update(skipped_nonfinite=True, ticked=[], grad_norm=float("nan"), bytes_reduced={})
        else:
            ticking, metrics["bytes_reduced"], metrics["grad_norm"] = self._update(step, step_tokens, metrics["lr"])
            self.clock.finish_tick(ticking)
            metrics["ticked"] = [g.name for g in ticking]
        self.step += 1
        self.tokens_seen += step_tokens
        dt = time.perf_counter() - t0
        metrics.update(tokens_per_s=step_tokens / dt, step_time_s=dt, tokens_seen=self.tokens_seen)
        return metrics

    def _discard(self) -> None:
        """Drop this step's gradients (a skipped step); the clock's windows stay."""
        self.engine.discard()
        self.sync.discard()  # gradients a sharded data-parallel layer still holds
        if self.carried is not None:  # the skipped step's states may be non-finite: rows start afresh
            self.carried.states.clear()

    def _update(self, step: int, step_tokens: int, lr: float) -> tuple[list, dict[str, int], float]:
        """Steps 2-4 of the module docstring; returns (ticking groups, bytes reduced by group, grad norm)."""
        ticking, sent = self.sync.reduce(self.clock, step, step_tokens)
        params = []
        for g in self.engine.window_groups(ticking):
            for _, p in g.params:
                if p.grad is not None:
                    p.grad.div_(g.window_tokens)
                    params.append(p)
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = self.engine.clip(params, step_tokens, clip)
        for opt in self.engine.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_scale"]
        sent = self.engine.bytes_reduced(sent, ticking)  # before the step, which starts the next count
        self.engine.step()
        return ticking, sent, grad_norm

    def _memory_health(self) -> dict:
        """The probes of this step (model/memory_health.py) as flat metrics `mem/L{layer}/{stat}`,
        plus `mem/fw_norm_max` over all layers. Only the first data-parallel replica's probes count
        (its first row is the global batch's), so every layout reports what one process would:
        tensor-parallel ranks hold different heads of a layer (max of maxima, mean of means),
        pipeline stages different layers."""
        local = {name: m.health for name, m in self.mixers.items() if m.health is not None}
        for m in self.mixers.values():
            m.health = None
        parts = [(self.dp_rank, local)]
        if self.world > 1:
            parts = [None] * self.world
            dist.all_gather_object(parts, (self.dp_rank, local))
        per_layer: dict[str, list[dict]] = {}
        for dp_rank, probes in parts:
            for name, h in probes.items():
                if dp_rank == 0:
                    per_layer.setdefault(name, []).append(h)
        out = {}
        for name in sorted(per_layer, key=int):
            hs = per_layer[name]
            for k in HEALTH_STATS:
                vals = [h[k] for h in hs]
                out[f"mem/L{name}/{k}"] = max(vals) if k.endswith("_max") else sum(vals) / len(vals)
        if per_layer:
            out["mem/fw_norm_max"] = max(v for k, v in out.items() if k.endswith("/fw_norm_max"))
        return out

    def _agree_to_stop(self) -> bool:
        """Every rank stops at the same step if any rank got a stop signal."""
        flag = torch.tensor([1.0 if self._stop_signal else 0.0], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def train(self) -> dict | None:
        cfg = self.cfg
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._request_stop)
        self._write_run_info()
        self.maybe_resume()
        logger = MetricsLogger(cfg.metrics, self.run_dir, rank=self.rank, total_steps=cfg.training.steps,
                               start_step=self.step, config=cfg.to_dict())
        counts = count_parameters(self.model)
        parts = ", ".join(f"{k} {v:,}" for k, v in counts.items() if k != "total")
        logger.print(f"parameters: {counts['total']:,} ({parts})")
        logger.print("clock groups: "
                     + ", ".join(f"{g.name} (period {g.period}, lr x{g.lr_scale})" for g in self.groups))
        logger.print(self.parallel.description)
        last = None
        try:
            while self.step < cfg.training.steps:
                last = self.train_step()
                every = cfg.eval.every
                if every > 0 and (self.step % every == 0 or self.step == cfg.training.steps):
                    last.update(self.validate())
                logger.log(self.step - 1, last)
                if last.get("skipped_nonfinite"):
                    logger.print(f"step {self.step - 1}: non-finite loss, update skipped (training.nonfinite=skip)")
                interval = cfg.checkpoint.interval
                if interval > 0 and self.step % interval == 0 and self.step < cfg.training.steps:
                    self.save(skippable=True)  # a full disk stops the run unless checkpoint.on_save_error=continue
                if self._agree_to_stop():  # saved already when the stop falls on an interval step
                    self.checkpointer.wait()  # ... if that save committed (a skipped one leaves last_step unset)
                    saved = self.checkpointer.last_step == self.step
                    path = self.checkpointer.path(self.step) if saved else self.save()
                    self.checkpointer.wait()
                    if self.rank == 0:
                        (self.run_dir / "PREEMPTED").write_text(f"{self._stop_signal or 'peer'} {self.step}\n")
                    logger.print(f"stop requested: saved {path} at step {self.step}; exiting for requeue")
                    return last
            if self.checkpointer.last_step != self.step and self.step not in committed_steps(self.checkpointer.dir):
                self.save()
            self.checkpointer.wait()
            if self.rank == 0:
                (self.run_dir / "PREEMPTED").unlink(missing_ok=True)
                (self.run_dir / "COMPLETE").write_text(f"{self.step}\n")
            return last
        except Exception as e:
            e.add_note(f"[rank {self.rank} of {self.world}, step {self.step}]")
            raise
        finally:
            logger.close()
