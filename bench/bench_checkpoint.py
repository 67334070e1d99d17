"""Checkpoint save/load throughput against the disk's own speed, measured in the same run.

    python bench/bench_checkpoint.py [--dir /tmp/bench_ckpt] [--d-model 1024] [--layers 2] [--vocab 16000] [--repeat 3]

The state is what the trainer saves (model, eagerly initialised AdamW state, CMS clock
accumulators) of a HOPE model sized to about 1 GB. Disk baseline: one file of the same size,
written with fsync and read back after dropping it from the page cache (posix_fadvise), as a
checkpoint's shards are. Save = Checkpointer.save (DCP write with fsync, crc32 manifest, marker);
load = the trainer's resume path (verify every shard's crc32, then DCP load), also without the
verification; async = how long save() blocks the training loop (the first save allocates the
reused staging buffers, later ones only copy into them), and how long until committed.
Prints a markdown table (medians over --repeat) for docs/checkpoints.md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path


import torch
from torch.distributed.checkpoint.state_dict import get_state_dict

from hope_dist.checkpoint import Checkpointer, verify_distributed
from hope_dist.checkpoint_manager import OPTIM_BY_NAME
from hope_dist.clock import CMSClock, build_clock_groups
from hope_dist.config import CheckpointConfig, CMSLevel, ModelConfig, OptimConfig
from hope_dist.model import build_model
from hope_dist.optim import build_optimizer


def drop_cache(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_write_read(folder: Path, nbytes: int) -> tuple[float, float]:
    """Seconds to write `nbytes` to one file with fsync, and to read it back uncached."""
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8).numpy().tobytes()
    file = folder / "disk_probe.bin"
    block = 64 << 20
    t0 = time.perf_counter()
    with open(file, "wb") as f:
        for i in range(0, nbytes, block):
            f.write(data[i:i + block])
        f.flush()
        os.fsync(f.fileno())
    write = time.perf_counter() - t0
    drop_cache([file])
    t0 = time.perf_counter()
    with open(file, "rb") as f:
        while f.read(block):
            pass
    read = time.perf_counter() - t0
    file.unlink()
    return write, read


def training_state(cfg: ModelConfig):
    """(a function returning the state dict of live model/optimizer/clock, as CheckpointManager.state
    does for every save, and its size in bytes)."""
    model = build_model(cfg)
    groups = build_clock_groups(model)
    optimizer = build_optimizer(groups, OptimConfig())
    clock = CMSClock(groups)

    def state() -> dict:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=OPTIM_BY_NAME)
        return {"model": model_sd, "optim": optim_sd, CMSClock.KEY: clock.checkpoint_state(0),
                "train": {"step": 0, "tokens_seen": 0}}

    tensors = [*model.state_dict().values(), *clock.acc.values(),
               *(t for s in optimizer.state.values() for t in s.values())]
    return state, sum(t.numel() * t.element_size() for t in tensors)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/bench_ckpt")
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.d_model // 64,
                      cms=[CMSLevel(args.d_model, p) for p in (1, 4, 16, 64)])
    state, nbytes = training_state(cfg)
    gb = nbytes / 1e9
    print(f"state: {gb:.3f} GB (model + AdamW + clock accumulators; d_model {args.d_model}, "
          f"{args.layers} layers, vocab {args.vocab})", flush=True)
    rows: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        rows.setdefault(name, []).append(seconds)

    ackpt = Checkpointer(CheckpointConfig(keep_last=1, async_save=True), root)
    t0 = time.perf_counter()
    ackpt.save(0, state(), {"step": 0})
    record("async save, first (allocates staging buffers): step blocked", time.perf_counter() - t0)
    ackpt.wait()
    for i in range(args.repeat):
        write, read = disk_write_read(root, nbytes)
        record("disk write (1 file, fsync)", write)
        record("disk read (1 file, uncached)", read)

        ckpt = Checkpointer(CheckpointConfig(keep_last=1, async_save=False), root)
        t0 = time.perf_counter()
        path = ckpt.save(10 * i + 1, state(), {"step": 10 * i + 1})
        record("checkpoint save (sync, incl. crc32 + marker)", time.perf_counter() - t0)

        files = [f for f in path.iterdir() if f.is_file()]
        drop_cache(files)
        t0 = time.perf_counter()
        verify_distributed(path)
        Checkpointer.load(path, state())
        record("checkpoint load (uncached, crc32 verify + load)", time.perf_counter() - t0)
        drop_cache(files)
        t0 = time.perf_counter()
        Checkpointer.load(path, state())
        record("checkpoint load (uncached, no verify)", time.perf_counter() - t0)

        t0 = time.perf_counter()
        ackpt.save(10 * i + 2, state(), {"step": 10 * i + 2})
        blocked = time.perf_counter() - t0
        ackpt.wait()
        record("async save, later ones: training step blocked", blocked)
        record("async save, later ones: until committed", time.perf_counter() - t0)
        shutil.rmtree(root / "checkpoints", ignore_errors=True)

    print(f"\nload average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"\n| operation ({gb:.2f} GB, median of {args.repeat}) | seconds | GB/s |\n|---|---:|---:|")
    for name, times in rows.items():
        t = statistics.median(times)
        print(f"| {name} | {t:.2f} | {gb / t:.2f} |")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
