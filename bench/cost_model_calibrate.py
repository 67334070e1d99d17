"""Measure the constants of bench/cost_model.py here, and the runs it must reproduce (root needed).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/cost_model_calibrate.py --out bench/cost_model_calibration.json

On the 1 Gbit/s veth link of bench/netns_link.sh (two network-namespace "hosts", one torchrun node
each, gloo) with bench/bench_parallel_clocked.py's model, pure replication, 2 ranks:
  1. `allreduce`, `allreduce_after`: gloo all-reduces of 4 B .. 64 MB between the two hosts
     before and after each 2-rank run's training (the link's latency and achieved bandwidth,
     fitted by cost_model.py), and `late_peer_s`: a 4-byte all-reduce on the rank that arrives
     30 ms after the other (its latency as training sees it, the peer asleep);
  2. `clocked` and `all_period_1`: the bench's two runs; per step the wall time, the wall time
     inside its collectives (all_reduce, all_gather_object), main-thread CPU and bytes reduced;
  3. `compute_*`: one rank alone with each run's periods, same per-rank batch, no communication.
The link constants come from 1 only; cost_model.py predicts the communication of 2 from them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_parallel_clocked import LINK, MODEL, job
from bench.bench_parallel_layouts import write_dataset

ROOT = Path(__file__).resolve().parents[1]

SIZES = [1, 2**18, 2**20, 2**22, 2**24]  # float32 elements: 4 B .. 64 MB
RATE = "1gbit"


def worker(out: Path, steps: int, link: bool, overrides: list[str]) -> None:
    """Under torchrun: optional all-reduce timings, then `steps` training steps, each timed whole
    and inside its collectives (wall), and its main-thread CPU seconds. Every rank writes its own."""
    import torch
    import torch.distributed as dist

    from hope_dist.config import load_config
    from hope_dist.trainer import Trainer

    trainer = Trainer(load_config(None, overrides))
    result: dict = {"load_before": os.getloadavg()[0]}
    plain = dist.all_reduce

    def allreduce_times() -> list[dict]:
        rows = []
        for n in SIZES:
            t = torch.ones(n)
            times = []
            for _ in range(3 if n >= 2**22 else 10):
                dist.barrier()
                t0 = time.perf_counter()
                plain(t)
                times.append(time.perf_counter() - t0)
            rows.append({"bytes": 4 * n, "s": statistics.median(times)})
        return rows

    def late_peer_latency() -> float:
        """A 4-byte all-reduce timed on the rank that arrives 30 ms late (busy), as in training where
        one rank still computes while the other sleeps in the collective: the sleeper's wake-up on
        this loaded machine is part of every step's collectives, not of back-to-back ones."""
        times = []
        for _ in range(10):
            dist.barrier()
            end = time.perf_counter() + 0.03
            while trainer.rank == 1 and time.perf_counter() < end:
                pass
            t0 = time.perf_counter()
            plain(torch.ones(1))
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    if link:
        result["allreduce"] = allreduce_times()
        result["late_peer_s"] = late_peer_latency()
    comm: list[float] = []

    def timed(fn):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                comm.append(time.perf_counter() - t0)
        return call

    dist.all_reduce, dist.all_gather_object = timed(dist.all_reduce), timed(dist.all_gather_object)
    rows = []
    for _ in range(steps):
        comm.clear()
        c0 = time.thread_time()
        m = trainer.train_step()
        rows.append({"step_s": m["step_time_s"], "cpu_s": time.thread_time() - c0, "comm_s": sum(comm),
                     "comm": list(comm), "bytes": sum(m["bytes_reduced"].values()), "ticked": m["ticked"]})
    result.update(steps=rows, load_after=os.getloadavg()[0])
    if link:  # again, after training: the load drifts
        result["allreduce_after"] = allreduce_times()
        result["late_peer_after_s"] = late_peer_latency()
    Path(f"{out}.rank{trainer.rank}").write_text(json.dumps(result))


def launch(out: Path, steps: int, link: bool, overrides: list[str], ns: str | None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    if ns:  # as bench_parallel_clocked.torchrun: c10d store on hope_n0, gloo on the veth
        env["GLOO_SOCKET_IFNAME"] = f"hope_v{ns[-1]}"
        nodes = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", "--rdzv-endpoint=10.77.0.1:29518",
                 "--rdzv-id=hope-calib", f"--rdzv-conf=is_host={int(ns.endswith('0'))}",
                 f"--local-addr=10.77.0.{int(ns[-1]) + 1}"]
    else:
        nodes = ["--standalone", "--nproc_per_node=1"]
    prefix = ["ip", "netns", "exec", ns] if ns else []
    cmd = [*prefix, sys.executable, "-m", "torch.distributed.run", *nodes, __file__, "--worker", str(out),
           "--steps", str(steps), *(["--link"] if link else []), "--", *overrides]
    log = out.with_suffix(".log").open("w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def run(procs: list[subprocess.Popen], out: Path, name: str) -> dict:
    """Rank 0's record; comm_s per step sums each collective's smallest time over the ranks (the
    rank that arrived last at a collective did not wait for the other one's compute)."""
    for proc in procs:
        if proc.wait() != 0:
            raise SystemExit(f"{name} failed:\n{out.with_suffix('.log').read_text()[-3000:]}")
    ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(len(procs))]
    for key in ("late_peer_s", "late_peer_after_s"):  # rank 1 is the late one
        if key in ranks[-1]:
            ranks[0][key] = ranks[-1][key]
    for k, row in enumerate(ranks[0]["steps"]):
        row["comm_s"] = sum(map(min, zip(*(r["steps"][k]["comm"] for r in ranks))))
    return ranks[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "cost_model_calibration.json"))
    ap.add_argument("--steps", type=int, default=64, help="2-rank runs: a multiple of the slowest period (64)")
    ap.add_argument("--compute-steps", type=int, default=16)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--link", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs="*")
    a = ap.parse_args()
    if a.worker:
        worker(Path(a.worker), a.steps, a.link, a.rest)
        return
    runs = {}
    subprocess.run([str(LINK), "down"], check=True)
    subprocess.run([str(LINK), "up", RATE], check=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            data = tmp / "tokens"
            write_dataset(data, MODEL["model.vocab_size"])
            plan = [("compute_clocked", (1, 4, 16, 64), 1), ("clocked", (1, 4, 16, 64), 2),
                    ("all_period_1", (1, 1, 1, 1), 2), ("compute_all_period_1", (1, 1, 1, 1), 1)]
            for name, periods, world in plan:
                out = tmp / f"{name}.json"
                steps = a.compute_steps if world == 1 else a.steps
                args = job(tmp / name, data, steps, periods, world)
                if world == 1:
                    procs = [launch(out, steps, False, args, None)]
                else:
                    procs = [launch(out, steps, True, args, f"hope_n{i}") for i in range(2)]
                runs[name] = run(procs, out, name)
                print(name, "done", flush=True)
    finally:
        subprocess.run([str(LINK), "down"], check=True)
    cmd = "OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/cost_model_calibrate.py"
    out = Path(a.out)
    kept = json.loads(out.read_text()).get("activations", {}) if out.exists() else {}  # cost_model.py's cache
    out.write_text(json.dumps({"command": cmd, "date": datetime.datetime.now(datetime.timezone.utc)
                               .strftime("%Y-%m-%d %H:%M UTC"), "rate": RATE, "model": MODEL,
                               "runs": runs, "activations": kept}, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
