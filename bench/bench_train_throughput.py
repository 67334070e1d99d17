"""Training tokens/s of several configs in one run, on the same data and machine.

    python bench/bench_train_throughput.py configs/tiny.yaml configs/tiny_transformer.yaml --steps 30
    python bench/bench_train_throughput.py configs/quality/hope_2m.yaml --also "--model.cms_in_context=true ..."

Each config trains `--steps` optimizer steps through the real Trainer (data pipeline, clocks,
optimizer) with checkpoints and metrics files off; the first `--warmup` steps are dropped and the
median step time of the rest gives tokens/s. `--also OVERRIDES` measures every config a second time
with those overrides (one shell-quoted string), e.g. an option on and off. Also reports tokens per
CPU-second of this process
(which other jobs on a shared machine barely move) and parameter counts, so budgets compare.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import tempfile
import time


import torch

from hope_dist.config import load_config
from hope_dist.model import count_parameters
from hope_dist.trainer import Trainer


def measure(config: str, steps: int, warmup: int, overrides: list[str], label: str) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(config, [f"--run_dir={run_dir}", f"--training.steps={steps}",
                                   "--metrics.wandb=false", "--checkpoint.interval=0", *overrides])
        trainer = Trainer(cfg)
        times, cpu, losses = [], [], []
        for _ in range(steps):
            c0 = time.process_time()
            m = trainer.train_step()
            cpu.append(time.process_time() - c0)
            times.append(m["step_time_s"])
            losses.append(m["loss"])
        step_time = statistics.median(times[warmup:])
        tokens = cfg.training.global_batch * cfg.training.seq_len
        return {"config": label, "params": count_parameters(trainer.model)["total"],
                "step_s": step_time, "tokens_per_s": tokens / step_time,
                "tokens_per_cpu_s": tokens / statistics.median(cpu[warmup:]), "last_loss": losses[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--also", default=None, help="overrides for a second measurement of every config")
    args, overrides = parser.parse_known_args()
    torch.set_num_threads(args.threads)
    runs = [(c, overrides, c) for c in args.configs]
    if args.also:
        runs += [(c, overrides + shlex.split(args.also), f"{c} {args.also}") for c in args.configs]
    rows = [measure(c, args.steps, args.warmup, o, label) for c, o, label in runs]
    print("| config | params | step (s) | tokens/s | tokens per CPU-s | ratio (CPU-s) | loss at end |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['params']:,} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | "
              f"{r['tokens_per_cpu_s']:.0f} | {r['tokens_per_cpu_s'] / rows[0]['tokens_per_cpu_s']:.2f} | "
              f"{r['last_loss']:.3f} |")


if __name__ == "__main__":
    main()
