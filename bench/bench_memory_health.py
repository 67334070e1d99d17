"""Cost of the memory-health probes (model/memory_health.py): training steps with the probe on at
every step (the default, metrics.log_every=1) against the probe off, alternating in one process.

    python bench/bench_memory_health.py configs/tiny.yaml --steps 40 --threads 1

Reports the median CPU seconds per step of each and the overhead; CPU time, so other jobs on a
shared machine barely move it.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time


import torch

from hope_dist.config import load_config
from hope_dist.trainer import Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args, overrides = p.parse_known_args()
    torch.set_num_threads(args.threads)
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for probe in (True, False):
            cfg = load_config(args.config, [f"--run_dir={tmp}/{probe}", "--metrics.wandb=false", "--eval.every=0",
                                            "--checkpoint.interval=0", f"--metrics.memory_health={probe}",
                                            f"--training.steps={args.steps}", *overrides])
            trainers[probe] = Trainer(cfg)
        cpu = {True: [], False: []}
        for _ in range(args.steps):
            for probe, trainer in trainers.items():
                c0 = time.process_time()
                trainer.train_step()
                cpu[probe].append(time.process_time() - c0)
    on, off = (statistics.median(cpu[k][args.warmup:]) for k in (True, False))
    print(f"| config | probe on (CPU s/step) | probe off | overhead |\n|---|---:|---:|---:|\n"
          f"| {args.config} {' '.join(overrides)} | {on:.4f} | {off:.4f} | {100 * (on / off - 1):+.1f}% |")


if __name__ == "__main__":
    main()
