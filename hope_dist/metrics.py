"""Per-step metrics: a progress bar, a JSONL file and wandb (offline without an API key).

Only rank 0 writes; the JSONL file is appended and flushed each step so a crash loses nothing.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tqdm import tqdm

from hope_dist.config import MetricsConfig


class MetricsLogger:
    def __init__(self, cfg: MetricsConfig, run_dir: Path, *, rank: int, total_steps: int,
                 start_step: int, config: dict[str, Any]):
        self.cfg = cfg
        self.active = rank == 0
        self.bar = None
        self.file = None
        self.wandb = None
        self.last_val = None
        if not self.active:
            return
        if cfg.jsonl:
            self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True)
        if cfg.wandb:
            import wandb

            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            self.wandb = wandb.init(project=cfg.wandb_project, dir=str(run_dir), config=config,
                                    mode=mode, name=run_dir.name, resume="allow")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.active:
            return
        if self.file is not None:
            self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        if "val_loss" in metrics:
            self.last_val = metrics["val_loss"]
        if self.bar is not None:
            self.bar.update(step + 1 - self.bar.n)
            if step % self.cfg.log_every == 0 or "val_loss" in metrics:
                extra = {"fw_norm": f"{metrics['mem/fw_norm_max']:.3g}"} if "mem/fw_norm_max" in metrics else {}
                if self.last_val is not None:
                    extra["val_loss"] = f"{self.last_val:.4f}"
                self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                     tok_s=f"{metrics['tokens_per_s']:.0f}",
                                     ticked=",".join(metrics["ticked"]) or "-", **extra)

    def print(self, msg: str) -> None:
        if self.active:
            (self.bar.write if self.bar is not None else print)(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
