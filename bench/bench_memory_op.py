"""Forward+backward time of the HOPE memory op: chunked PyTorch path vs the per-token reference.

    python -m bench.bench_memory_op        # from the repo root: B=2 T=512 H=4 d_h=32, selfmod depth 2, float32
Prints one markdown table row: shape, both median times and the speed-up.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from kernels.hope_memory import MemoryParams, hope_memory, l2norm


def make_inputs(args, dtype: torch.dtype):
    """Selfmod inputs with realistic rates (eta about 0.1, alpha about 0.99), all requiring grad."""
    gen = torch.Generator().manual_seed(0)
    b, t, h, d, m = args.batch, args.seq, args.heads, args.d_h, args.d_m or args.d_h
    randn = lambda *s, scale=1.0, shift=0.0: (torch.randn(*s, generator=gen) * scale + shift).to(dtype)
    params = MemoryParams(
        randn(5, h, d, m, scale=0.5 * m ** -0.5), randn(5, h, m, d, scale=d ** -0.5),
        randn(h, d, scale=0.3), randn(h, scale=0.3, shift=-2.0), randn(h, d, scale=0.3), randn(h, scale=0.3, shift=5.0),
        randn(h, scale=0.5) if args.momentum else None)
    q, a = l2norm(randn(b, t, h, d)), F.silu(randn(b, t, h, d))
    leaves = [q, a, *(x for x in params if x is not None)]
    for x in leaves:
        x.requires_grad_(True)
    return q, a, params, leaves


def time_impl(impl: str, args, inputs) -> float:
    """Median seconds of one forward+backward over args.repeats runs after args.warmup."""
    q, a, params, leaves = inputs
    d_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=q.dtype)
    clock = time.process_time if args.cpu_time else time.perf_counter
    times = []
    for i in range(args.warmup + args.repeats):
        start = clock()
        o, _ = hope_memory(q, params, a=a, chunk=args.chunk, proj_chunk=args.proj_chunk, impl=impl)
        torch.autograd.grad((o * d_out).sum(), leaves)
        if i >= args.warmup:
            times.append(clock() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--d-h", type=int, default=32)
    parser.add_argument("--d-m", type=int, default=0, help="memory hidden width (0: d_h)")
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--proj-chunk", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--momentum", action="store_true", help="Titans momentum on")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with the process's CPU seconds (all threads) instead of wall clock: "
                             "steadier on a shared machine")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    inputs = make_inputs(args, getattr(torch, args.dtype))
    chunked, naive = time_impl("torch", args, inputs), time_impl("naive", args, inputs)
    unit = "CPU s" if args.cpu_time else "s"
    columns = ["B", "T", "H", "d_h", "d_m", "chunk", "proj_chunk", "dtype", "momentum", "threads",
               f"naive fwd+bwd ({unit})", f"chunked fwd+bwd ({unit})", "speed-up"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    print(f"| {args.batch} | {args.seq} | {args.heads} | {args.d_h} | {args.d_m or args.d_h} | {args.chunk} | "
          f"{args.proj_chunk} | {args.dtype} | {args.momentum} | {torch.get_num_threads()} | {naive:.3f} | "
          f"{chunked:.3f} | {naive / chunked:.1f}x |")


if __name__ == "__main__":
    main()
