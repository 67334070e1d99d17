"""Memory per GPU of a training job before it runs (hope_dist/footprint, docs/memory.md).

    python -m tools.estimate_memory configs/hope_1b3.yaml [--world 32] [--budget-gb 70] [--key.sub=value ...]

For each config, at its layout (parallel.*; --world fills dp_shard as launch/resolve_job.py does):
the parts of the estimate (parameters, gradients, clock windows, optimizer, activations), the
activations each layer adds, with and without activation checkpointing and the memory op's
recompute, and the cheapest setting that fits in --budget-gb. Traced for a CUDA device under the
config's mixed precision (bf16 by default). The 1.3B configs take minutes on a CPU.
"""
from __future__ import annotations

import argparse

import torch

from hope_dist.config import load_config
from hope_dist.footprint import cheapest_fit, estimate, with_overrides
from hope_dist.footprint.estimate import runs_triton

SETTINGS = {"none": (), "memory-op recompute": ("--parallel.memory_op_recompute=true",),
            "activation checkpointing": ("--parallel.activation_checkpoint=true",)}


def _layout_fill(cfg, world: int | None) -> list[str]:
    """launch/resolve_job.py's fill: dp_shard = world / (pp x tp x dp_replicate) when the config leaves it at 1."""
    p = cfg.parallel
    model_parallel = p.pp * p.tp * p.dp_replicate
    if world and p.dp_shard == 1 and world != model_parallel and world % model_parallel == 0:
        return [f"--parallel.dp_shard={world // model_parallel}"]
    return []


def report(path: str, overrides: list[str], world: int | None, budget_gb: float) -> list[str]:
    cfg = load_config(path, overrides)
    cfg = load_config(path, overrides + _layout_fill(cfg, world))
    amp = None if cfg.training.mixed_precision == "fp32" else torch.bfloat16
    p, t = cfg.parallel, cfg.training
    lines = [f"{path}: pp={p.pp} dp_replicate={p.dp_replicate} dp_shard={p.dp_shard} tp={p.tp}, "
             f"micro_batch={t.micro_batch} x seq_len={t.seq_len}, activation_checkpoint={p.activation_checkpoint}, "
             f"memory_op_recompute={p.memory_op_recompute}",
             f"  estimate: {estimate(cfg, amp).describe()}"]
    triton = runs_triton(cfg, "cuda")
    if triton:
        lines.append("  memory op on CUDA: Triton, saving chunk states and inputs (traced as the op's recompute)")
    for name, extra in SETTINGS.items():
        if name == "memory-op recompute" and (triton or not cfg.model.mixer_spec.recurrent):
            continue
        est = estimate(with_overrides(cfg, ("--parallel.memory_op_recompute=false",
                                            "--parallel.activation_checkpoint=false") + extra), amp)
        lines.append(f"  {name:<25} per layer {est.layer_bytes / 1e9:6.2f} GB, activations "
                     f"{est.parts['activations'] / 1e9:7.1f} GB, total {est.total / 1e9:7.1f} GB")
    fit = cheapest_fit(cfg, amp, budget_gb * 1e9)
    lines.append(f"  cheapest within {budget_gb:g} GB: " + (" ".join(fit[0]) + f" ({fit[1].describe()})" if fit
                                                            else "none (more GPUs or a shorter seq_len)"))
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", help="YAML configs")
    parser.add_argument("--world", type=int, help="GPUs of the launch (fills parallel.dp_shard)")
    parser.add_argument("--budget-gb", type=float, default=70.0, help="memory per GPU to fit in (80 GB H100: 70)")
    args, overrides = parser.parse_known_args(argv)
    for path in args.configs:
        print("\n".join(report(path, overrides, args.world, args.budget_gb)), flush=True)


if __name__ == "__main__":
    main()
