"""Clocked CMS sync vs all periods 1, two hosts joined by a real 1 Gbit/s link (root needed).

    python bench/bench_parallel_clocked.py --steps 64 --rate 1gbit

Builds two network-namespace "hosts" joined by a veth pair shaped with tc (bench/netns_link.sh),
starts one torchrun node in each (c10d rendezvous, gloo over that link, pure replication so
every reduced byte is a gradient) and trains the same model twice: CMS periods 1/4/16/64, then
all periods 1. The model is CMS-heavy (4 levels of width 2048 at d = 256) so communication
dominates. Reports the median step time of both, the measured bytes per step, and the
communication-bound ideal ratio (mean bytes all-1 / mean bytes clocked) next to the measured
step-time ratio. One more run on a single rank with the same per-rank batch (one sequence) gives
the compute-only step time, from which the communication-time ratio follows.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.bench_parallel_layouts import write_dataset

ROOT = Path(__file__).resolve().parents[1]

LINK = ROOT / "bench" / "netns_link.sh"
MODEL = {"model.vocab_size": 256, "model.d_model": 256, "model.n_layers": 2, "model.n_heads": 4,
         "model.chunk_size": 32, "model.proj_chunk_size": 32, "training.seq_len": 32, "training.micro_batch": 1,
         "optim.warmup_steps": 4}


def cms(periods: tuple[int, ...]) -> str:
    return "[" + ", ".join(f"{{width: 2048, period: {p}}}" for p in periods) + "]"


def job(run_dir: Path, data: Path, steps: int, periods, world: int) -> list[str]:
    o = {"run_dir": run_dir, "data.paths": f"[{data}]", "data.eod_id": 0, "metrics.wandb": False,
         "metrics.progress": False, "checkpoint.interval": 0, "training.steps": steps,
         **MODEL, "parallel.dp_replicate": world, "training.global_batch": world, "model.cms": cms(periods)}
    return [f"--{k}={v}" for k, v in o.items()]


def torchrun(args: list[str], ns: str | None, ifname: str | None, endpoint: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    if ifname:
        env["GLOO_SOCKET_IFNAME"] = ifname
    prefix = ["ip", "netns", "exec", ns] if ns else []
    # the hosts' addresses are on the veth, not their hostname: say which one hosts the store and
    # which address each advertises to the workers
    nodes = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
             "--rdzv-id=hope-clocked", f"--rdzv-conf=is_host={int(ns.endswith('0'))}",
             f"--local-addr=10.77.0.{int(ns[-1]) + 1}"] if ns else ["--standalone", "--nproc_per_node=1"]
    cmd = [*prefix, sys.executable, "-m", "torch.distributed.run", *nodes, "hope_dist/pretrain.py", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def summarise(run_dir: Path, skip: int) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = rows[skip:]
    return {"step_s": statistics.median(r["step_time_s"] for r in timed),
            "mean_step_s": statistics.fmean(r["step_time_s"] for r in timed),
            "bytes_per_step": statistics.fmean(sum(r["bytes_reduced"].values()) for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=64, help="a multiple of the slowest period (64)")
    ap.add_argument("--rate", default="1gbit")
    ap.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the step times")
    a = ap.parse_args()
    subprocess.run([str(LINK), "down"], check=True)
    subprocess.run([str(LINK), "up", a.rate], check=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            data = tmp / "tokens"
            write_dataset(data, MODEL["model.vocab_size"])
            results = {}
            for name, periods in (("clocked", (1, 4, 16, 64)), ("all_period_1", (1, 1, 1, 1))):
                run_dir = tmp / name
                logs = [tmp / f"{name}.node{i}.log" for i in range(2)]
                procs = [torchrun(job(run_dir, data, a.steps, periods, 2), f"hope_n{i}", f"hope_v{i}",
                                  "10.77.0.1:29517", logs[i]) for i in range(2)]
                for proc, log in zip(procs, logs):
                    if proc.wait() != 0:
                        raise SystemExit(f"{name} failed:\n{log.read_text()[-3000:]}")
                results[name] = summarise(run_dir, a.skip)
            log = tmp / "compute.log"
            proc = torchrun(job(tmp / "compute", data, min(a.steps, 16), (1, 4, 16, 64), 1), None, None, "", log)
            if proc.wait() != 0:
                raise SystemExit(f"compute-only run failed:\n{log.read_text()[-3000:]}")
            compute = summarise(tmp / "compute", a.skip)
    finally:
        subprocess.run([str(LINK), "down"], check=True)
    clocked, flat = results["clocked"], results["all_period_1"]
    ideal = flat["bytes_per_step"] / clocked["bytes_per_step"]
    print(f"link {a.rate}, 2 hosts x 1 rank, gloo, {a.steps} steps (first {a.skip} not timed)")
    print("| run | median step (s) | mean step (s) | bytes reduced / step (MB) |")
    print("|---|---|---|---|")
    for name, r in (("clocked 1/4/16/64", clocked), ("all periods 1", flat), ("1 rank, no comm", compute)):
        print(f"| {name} | {r['step_s']:.3f} | {r['mean_step_s']:.3f} | {r['bytes_per_step'] / 1e6:.2f} |")
    measured = flat["mean_step_s"] / clocked["mean_step_s"]
    comm_ratio = ((flat["mean_step_s"] - compute["mean_step_s"])
                  / max(1e-9, clocked["mean_step_s"] - compute["mean_step_s"]))
    print(f"step-time ratio (all-1 / clocked, means): {measured:.2f}; ideal communication-bound ratio "
          f"(bytes): {ideal:.2f}; communication-time ratio (step minus 1-rank compute): {comm_ratio:.2f}")


if __name__ == "__main__":
    main()
