"""Optimizer step time of optim.name=m3 against adamw on CPU, for configs/tiny.yaml's model and a
larger one, in one run.

    python bench/bench_optim.py [--repeat 3] [--threads 1]

Both optimizers are built as the trainer builds them (build_optimizer on the clock groups), with
random gradients. Per model and optimizer, CPU seconds of this process (other jobs on a shared
machine barely move them; with --threads 1 they are the work done), median over --repeat:
  - every level: one step in which every clock group ticks, averaged over f = optim.slow_every
    consecutive steps, so M3's slow step (one more Newton-Schulz per matrix every f steps) counts;
  - clocked: the mean step under the CMS clocks, sum over clock groups of (its step / its period);
  - fwd+bwd: one forward and backward of the config's global batch, to put the step in scale.
Prints a markdown table for docs/optim.md.
"""
from __future__ import annotations

import argparse
import statistics
import time


import torch
import torch.nn.functional as F

from hope_dist.clock import build_clock_groups
from hope_dist.config import load_config
from hope_dist.model import build_model
from hope_dist.optim import hidden_matrices
from hope_dist.optim import build_optimizer

LARGER = ["--model.vocab_size=16000", "--model.d_model=256", "--model.n_layers=4", "--model.n_heads=4",
          "--model.cms=[{width: 1024, period: 1}, {width: 1024, period: 4}, {width: 1024, period: 16}, "
          "{width: 1024, period: 64}]"]


def cpu_seconds(fn, calls: int) -> float:
    t0 = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - t0) / calls


def step_times(model, groups, optim_cfg, repeat: int) -> dict:
    """CPU seconds of one optimizer step: every group ticking, and each group alone."""
    opt = build_optimizer(groups, optim_cfg, model)
    f = optim_cfg.slow_every

    def step(ticking):
        def run():
            for g in groups:
                for _, p in g.params:
                    p.grad = torch.randn_like(p) * 1e-3 if g in ticking else None
            opt.step()
        return run

    every = statistics.median(cpu_seconds(step(groups), f) for _ in range(repeat))
    per_group = {g.name: statistics.median(cpu_seconds(step([g]), f) for _ in range(repeat)) for g in groups}
    clocked = sum(per_group[g.name] / g.period for g in groups)
    return {"every": every, "clocked": clocked}


def forward_backward(model, cfg, repeat: int) -> float:
    t = cfg.training
    tokens = torch.randint(0, cfg.model.vocab_size, (t.global_batch, t.seq_len + 1))

    def run():
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum").backward()
        model.zero_grad(set_to_none=True)

    return statistics.median(cpu_seconds(run, 1) for _ in range(repeat))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU seconds, median of {args.repeat}\n")
    print("| model | params | M3 matrices | fwd+bwd (s) | optimizer | step, every level (s) | step, clocked (s) "
          "| m3 / adamw, every level | m3 / adamw, clocked | clocked step / fwd+bwd |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for label, overrides in (("tiny.yaml", []), ("larger", LARGER)):
        cfg = load_config("configs/tiny.yaml", overrides)
        model = build_model(cfg.model)
        groups = build_clock_groups(model)
        n_params = sum(p.numel() for p in model.parameters())
        n_matrix = sum(p.numel() for p in model.parameters() if id(p) in hidden_matrices(model))
        fb = forward_backward(model, cfg, args.repeat)
        times = {}
        for name in ("adamw", "m3"):
            optim_cfg = load_config("configs/tiny.yaml", [*overrides, f"--optim.name={name}"]).optim
            times[name] = step_times(model, groups, optim_cfg, args.repeat)
        for name, t in times.items():
            ratio = (f"{t['every'] / times['adamw']['every']:.1f}x | {t['clocked'] / times['adamw']['clocked']:.1f}x"
                     if name == "m3" else " | ")
            print(f"| {label} | {n_params:,} | {n_matrix:,} | {fb:.3f} | {name} | {t['every']:.4f} | "
                  f"{t['clocked']:.4f} | {ratio} | {t['clocked'] / fb:.2f} |", flush=True)


if __name__ == "__main__":
    main()
