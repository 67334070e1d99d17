"""Stability of every mixer: long runs, several seeds, fp32, bf16 autocast and larger learning rates;
per run, whether it finished (or the step it failed at), its final loss and the largest fast-weight
norm its memory-health probes saw.

    python bench/bench_stability.py --steps 2000 --seeds 0 1 2 --jobs 2 --out docs/stability
    python bench/bench_stability.py --quality 2m --steps 1000 --jobs 2 --out docs/stability_quality

Default: configs/tiny.yaml on the quickstart data with --model.mixer=each of --mixers. With
--quality SIZE: the quality models (configs/quality/MODEL_SIZE.yaml, on the pinned quality corpus)
at their swept learning rate (the lowest final validation loss in --sweep-results, the config's lr
if none) and at twice it, with validation off. A variant is a precision and a multiple of that base
learning rate (VARIANTS). Each run is a real `pretrain.py` process, so a crash or non-finite loss
(training.nonfinite=stop) ends only that run. Results: OUT.json (appended as runs finish, so an
interrupted sweep keeps what it measured) and OUT.md (a table).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"fp32": ("fp32", 1.0), "bf16": ("bf16", 1.0), "lr3x": ("fp32", 3.0),  # name: (precision, lr multiple)
            "fp32-lr2x": ("fp32", 2.0), "bf16-lr2x": ("bf16", 2.0)}
DEFAULT_VARIANTS = {"tiny": ["fp32", "bf16", "lr3x"], "quality": ["fp32", "bf16", "fp32-lr2x", "bf16-lr2x"]}


def targets(args) -> dict[str, tuple[Path, list[str], float]]:
    """What to train: name -> (config, overrides, base learning rate)."""
    from bench import bench_quality
    from hope_dist.config import load_config

    if args.quality is None:
        lr = load_config(ROOT / args.config, []).optim.lr
        return {m: (ROOT / args.config, [f"--model.mixer={m}"], lr) for m in args.mixers}
    q = SimpleNamespace(models=args.models, size=args.quality, extra=args.extra)
    lrs = bench_quality.best_lrs(bench_quality.read_results(args.sweep_results), q)
    bench_quality.ensure_data(q)
    return {m: (bench_quality.config_path(m, args.quality), ["--eval.every=0"], lrs[m]) for m in args.models}


def failed_step(stderr: str, rows: list[dict]) -> int:
    """The step a run stopped at: the trainer's non-finite message, else the step after the last logged."""
    found = re.search(r"non-finite loss \(.*?\) at step (\d+)", stderr)
    return int(found.group(1)) if found else (rows[-1]["step"] + 1 if rows else 0)


def run_one(target: str, spec: tuple[Path, list[str], float], variant: str, seed: int, args) -> dict:
    name = f"{target}-{variant}-s{seed}"
    run_dir = args.run_root / name
    config, overrides, base_lr = spec
    precision, scale = VARIANTS[variant]
    cmd = [sys.executable, str(ROOT / "hope_dist/pretrain.py"), "--config", str(config),
           f"--run_dir={run_dir}", *overrides, f"--training.seed={seed}", f"--training.mixed_precision={precision}",
           f"--optim.lr={base_lr * scale:g}", f"--training.steps={args.steps}", f"--metrics.log_every={args.log_every}",
           "--metrics.wandb=false", "--metrics.progress=false", "--checkpoint.interval=0", "--checkpoint.resume=never",
           *args.extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted attempt's rows must not count
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        if (run_dir / "metrics.jsonl").is_file() else []
    done = proc.returncode == 0 and (run_dir / "COMPLETE").is_file()
    tail = [r["loss"] for r in rows[-20:]]
    result = {"run": name, "mixer": target, "variant": variant, "seed": seed, "steps": args.steps,
              "lr": base_lr * scale, "finished": done, "failed_at": None if done else failed_step(proc.stderr, rows),
              "final_loss": sum(tail) / len(tail) if tail else None,
              "max_fw_norm": max((r["mem/fw_norm_max"] for r in rows if "mem/fw_norm_max" in r), default=None),
              "max_grad_norm": max((r["grad_norm"] for r in rows if r.get("grad_norm") == r.get("grad_norm")),
                                   default=None),
              "wall_s": round(time.time() - t0, 1)}
    if not done:
        result["error"] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
    print(json.dumps(result), flush=True)
    return result


def table(results: list[dict]) -> str:
    fmt = lambda x, f: "-" if x is None else format(x, f)
    lines = ["| mixer | variant | lr | seed | finished | final loss | max fast-weight norm | max grad norm | wall s |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: (r["mixer"], r["variant"], r["seed"])):
        status = "yes" if r["finished"] else f"**no, step {r['failed_at']}**"
        lines.append(f"| {r['mixer']} | {r['variant']} | {fmt(r.get('lr'), 'g')} | {r['seed']} | {status} | "
                     f"{fmt(r['final_loss'], '.3f')} | {fmt(r['max_fw_norm'], '.3g')} | "
                     f"{fmt(r['max_grad_norm'], '.3g')} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.yaml", help="the config the --mixers run on")
    p.add_argument("--mixers", nargs="+", default=["selfmod", "titans", "attention"])
    p.add_argument("--quality", metavar="SIZE", help="run the quality models at SIZE (2m, 125m, ...) instead")
    p.add_argument("--models", nargs="+", default=["hope", "titans", "transformer"], help="with --quality")
    p.add_argument("--sweep-results", type=Path, default=ROOT / "runs/quality/results.jsonl",
                   help="bench_quality's records, whose sweep gives each model's base learning rate")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="default: " + json.dumps(DEFAULT_VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--jobs", type=int, default=1, help="runs at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--run-root", type=Path, default=ROOT / "runs/stability")
    p.add_argument("--out", type=Path, default=ROOT / "docs/stability")
    args, args.extra = p.parse_known_args(argv)  # the rest: --key=value overrides for every run
    args.variants = args.variants or DEFAULT_VARIANTS["tiny" if args.quality is None else "quality"]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    specs = targets(args)
    out_json = args.out.with_suffix(".json")
    done = {r["run"]: r for r in map(json.loads, out_json.read_text().splitlines())} if out_json.is_file() else {}
    todo = [(m, v, s) for v, m, s in itertools.product(args.variants, specs, args.seeds)
            if f"{m}-{v}-s{s}" not in done]
    print(f"{len(todo)} runs to do, {len(done)} already in {out_json}", flush=True)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool, open(out_json, "a") as f:
        for future in as_completed([pool.submit(run_one, m, specs[m], v, s, args) for m, v, s in todo]):
            r = future.result()
            f.write(json.dumps(r) + "\n")
            f.flush()
            done[r["run"]] = r
    args.out.with_suffix(".md").write_text(table(list(done.values())) + "\n")
    print(table(list(done.values())))


if __name__ == "__main__":
    main()
