"""Step time and peak memory per rank for (dp, tp, pp) layouts, through the real Trainer.

    python bench/bench_parallel_layouts.py --size tiny --steps 6
    python bench/bench_parallel_layouts.py --size 50m --steps 4 --layouts 1,1,1 2,1,1 1,2,1 1,1,2
    python bench/bench_parallel_layouts.py --engines native zero1 zero2 --layouts 1,1,1 2,1,1

Each (engine, layout) is one `torchrun --standalone` launch of this file (native: dp is FSDP2
dp_shard; zero1/zero2: parallel.engine=deepspeed at that ZeRO stage over dp ranks, dp-only layouts)
on a random-token indexed dataset; every rank times `--steps` optimizer steps after one warm-up step
and reports its peak memory (CUDA: max allocated; CPU: peak RSS of the process). Prints one
Markdown row per layout: median step time, tokens/s and the largest rank's peak memory.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SIZES = {  # model + batch overrides; 50m: d 512, 8 layers, 4 CMS levels of width 640, 8k vocab (51M)
    "tiny": {"model.vocab_size": 512, "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4,
             "model.chunk_size": 16, "model.proj_chunk_size": 32, "training.seq_len": 128,
             "model.cms": "[{width: 64, period: 1}, {width: 64, period: 4}, {width: 64, period: 16}, "
                          "{width: 64, period: 64}]"},
    "50m": {"model.vocab_size": 8192, "model.d_model": 512, "model.n_layers": 8, "model.n_heads": 8,
            "model.chunk_size": 32, "model.proj_chunk_size": 64, "training.seq_len": 64,
            "model.cms": "[{width: 640, period: 1}, {width: 640, period: 4}, {width: 640, period: 16}, "
                         "{width: 640, period: 64}]"},
}


def write_dataset(prefix: Path, vocab: int, n_tokens: int = 400_000) -> None:
    import numpy as np
    import torch

    from hope_dist.data.megatron_format import megatron_indexed_dataset

    IndexedDatasetBuilder = megatron_indexed_dataset().IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for _ in range(n_tokens // 512):
        doc = np.append(rng.integers(1, vocab, size=511), 0)
        builder.add_document(torch.as_tensor(doc.astype(np.int64)), [len(doc)])
    builder.finalize(str(prefix) + ".idx")


def worker(args: list[str], steps: int, out: str) -> None:
    """Under torchrun: one warm-up step, `steps` timed ones, then this rank's numbers."""
    import torch

    from hope_dist.config import load_config
    from hope_dist.trainer import Trainer

    trainer = Trainer(load_config(None, args))
    trainer.train_step()
    times = [trainer.train_step()["step_time_s"] for _ in range(steps)]
    if trainer.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(trainer.device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"step_s": statistics.median(times), "peak_bytes": peak}
    Path(out, f"rank{trainer.rank}.json").write_text(json.dumps(result))


ENGINES = {"native": {}, "zero1": {"parallel.engine": "deepspeed", "parallel.zero_stage": 1},
           "zero2": {"parallel.engine": "deepspeed", "parallel.zero_stage": 2}}


def run_layout(size: str, dp: int, tp: int, pp: int, steps: int, data: Path, vocab: int,
               engine: str = "native") -> dict:
    world = dp * tp * pp
    with tempfile.TemporaryDirectory() as out:
        overrides = {"run_dir": Path(out) / "run", "data.paths": f"[{data}]", "data.eod_id": 0,
                     "metrics.wandb": False, "metrics.progress": False, "checkpoint.interval": 0,
                     "training.global_batch": 4, "training.micro_batch": 2 if dp * 2 <= 4 else 1,
                     "parallel.dp_shard": dp, "parallel.tp": tp, "parallel.pp": pp,
                     "parallel.pp_microbatches": 2 if pp > 1 else 1, **SIZES[size], **ENGINES[engine]}
        if pp > 1:
            overrides["training.micro_batch"] = 2
        job = [f"--{k}={v}" for k, v in overrides.items()]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               __file__, "--worker", out, "--steps", str(steps), "--", *job]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{engine} layout dp={dp} tp={tp} pp={pp} failed:\n"
                               f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    step = max(r["step_s"] for r in ranks)
    return {"size": size, "engine": engine, "dp": dp, "tp": tp, "pp": pp, "step_s": step,
            "tokens_per_s": 4 * int(SIZES[size]["training.seq_len"]) / step,
            "peak_mib_per_rank": max(r["peak_bytes"] for r in ranks) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="tiny")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--layouts", nargs="*", default=["1,1,1", "2,1,1", "1,2,1", "1,1,2", "2,2,1", "2,1,2", "1,2,2"],
                    help="dp,tp,pp triples")
    ap.add_argument("--engines", nargs="*", choices=list(ENGINES), default=["native"],
                    help="zero1/zero2 run only the dp-only layouts (parallel.engine=deepspeed refuses tp/pp)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs="*")
    a = ap.parse_args()
    if a.worker:
        worker(a.rest, a.steps, a.worker)
        return
    vocab = SIZES[a.size]["model.vocab_size"]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "tokens"
        write_dataset(data, vocab)
        print("| config | engine | dp | tp | pp | step (s) | tokens/s | peak memory / rank (MiB) |")
        print("|---|---|---|---|---|---|---|---|")
        for layout in a.layouts:
            dp, tp, pp = (int(x) for x in layout.split(","))
            for engine in a.engines:
                if engine != "native" and tp * pp > 1:
                    continue
                r = run_layout(a.size, dp, tp, pp, a.steps, data, vocab, engine)
                print(f"| {a.size} | {engine} | {dp} | {tp} | {pp} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | "
                      f"{r['peak_mib_per_rank']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
