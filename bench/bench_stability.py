"""Stability of every mixer: long runs on the quickstart data, several seeds, fp32, bf16 autocast and
3x the learning rate; per run, whether it finished (or the step it failed at), its final loss and
the largest fast-weight norm its memory-health probes saw.

    python bench/bench_stability.py --steps 2000 --seeds 0 1 2 --jobs 2 --out docs/stability

Each run is a real `pretrain.py` process (configs/tiny.yaml with --model.mixer=...), so a crash or
non-finite loss (training.nonfinite=stop) ends only that run. Results: OUT.json (appended as runs
finish, so an interrupted sweep keeps what it measured) and OUT.md (a table).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"fp32": ["--training.mixed_precision=fp32"],
            "bf16": ["--training.mixed_precision=bf16"],
            "lr3x": ["--training.mixed_precision=fp32", "--optim.lr=9e-3"]}  # tiny.yaml's lr is 3e-3


def run_one(mixer: str, variant: str, seed: int, args) -> dict:
    name = f"{mixer}-{variant}-s{seed}"
    run_dir = args.run_root / name
    cmd = [sys.executable, str(ROOT / "hope_dist/pretrain.py"), "--config", str(ROOT / args.config),
           f"--run_dir={run_dir}", f"--model.mixer={mixer}", f"--training.seed={seed}",
           f"--training.steps={args.steps}", f"--metrics.log_every={args.log_every}", "--metrics.wandb=false",
           "--metrics.progress=false", "--checkpoint.interval=0", "--checkpoint.resume=never",
           *VARIANTS[variant], *args.extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted attempt's rows must not count
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        if (run_dir / "metrics.jsonl").is_file() else []
    done = proc.returncode == 0 and (run_dir / "COMPLETE").is_file()
    tail = [r["loss"] for r in rows[-20:]]
    result = {"run": name, "mixer": mixer, "variant": variant, "seed": seed, "steps": args.steps,
              "finished": done, "failed_at": None if done else len(rows),
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
    lines = ["| mixer | variant | seed | finished | final loss | max fast-weight norm | max grad norm | wall s |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: (r["mixer"], r["variant"], r["seed"])):
        status = "yes" if r["finished"] else f"**no, step {r['failed_at']}**"
        lines.append(f"| {r['mixer']} | {r['variant']} | {r['seed']} | {status} | {fmt(r['final_loss'], '.3f')} | "
                     f"{fmt(r['max_fw_norm'], '.3g')} | {fmt(r['max_grad_norm'], '.3g')} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--mixers", nargs="+", default=["selfmod", "titans", "attention"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--jobs", type=int, default=1, help="runs at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--run-root", type=Path, default=ROOT / "runs/stability")
    p.add_argument("--out", type=Path, default=ROOT / "docs/stability")
    args, args.extra = p.parse_known_args()  # the rest: --key=value overrides for every run
    out_json = args.out.with_suffix(".json")
    done = {r["run"]: r for r in map(json.loads, out_json.read_text().splitlines())} if out_json.is_file() else {}
    todo = [(m, v, s) for v, m, s in itertools.product(args.variants, args.mixers, args.seeds)
            if f"{m}-{v}-s{s}" not in done]
    print(f"{len(todo)} runs to do, {len(done)} already in {out_json}", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool, open(out_json, "a") as f:
        for future in as_completed([pool.submit(run_one, *c, args) for c in todo]):
            r = future.result()
            f.write(json.dumps(r) + "\n")
            f.flush()
            done[r["run"]] = r
    args.out.with_suffix(".md").write_text(table(list(done.values())) + "\n")
    print(table(list(done.values())))


if __name__ == "__main__":
    main()
