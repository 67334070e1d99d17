"""Forward+backward of the HOPE memory op: the chunked PyTorch path against the per-token reference,
and against this machine's fp32 matmul peak measured in the same run.

    python -m bench.bench_memory_op --threads 1 --cpu-time                    # B=2 T=512 H=4 d_h=32 vs naive
    python -m bench.bench_memory_op --threads 1 --cpu-time --batch 8 --seq 2048 --d-h 64 --skip-naive
Prints one markdown table row: shape, median times, the speed-up over naive, the chunked path's
counted FLOPs and their rate as a fraction of the `torch.mm` peak.

FLOPs are counted, not modelled: torch.utils.flop_counter.FlopCounterMode over one chunked
forward+backward (every mm/bmm that runs, backward included; the per-chunk triangular inverse,
~C^3/3 per chunk and head, is not counted, so the fraction is a slight underestimate). The peak is
the best of `torch.mm` on square fp32 matrices of 256, 512, 1024 and 2048 (same threads, same
clock), and, for reference, `torch.bmm` at the op's own tile size ((B*5*H) x C x d_h x d_h).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

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


def _clock(args):
    return time.process_time if args.cpu_time else time.perf_counter


def time_impl(impl: str, args, inputs) -> float:
    """Median seconds of one forward+backward over args.repeats runs after args.warmup."""
    q, a, params, leaves = inputs
    d_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=q.dtype)
    clock = _clock(args)
    times = []
    for i in range(args.warmup + args.repeats):
        start = clock()
        o, _ = hope_memory(q, params, a=a, chunk_size=args.chunk_size, proj_chunk_size=args.proj_chunk_size, impl=impl)
        torch.autograd.grad((o * d_out).sum(), leaves)
        if i >= args.warmup:
            times.append(clock() - start)
    return statistics.median(times)


def counted_flops(args, inputs) -> int:
    """FLOPs of every mm/bmm of one chunked forward+backward."""
    q, a, params, leaves = inputs
    counter = FlopCounterMode(display=False)
    with counter:
        o, _ = hope_memory(q, params, a=a, chunk_size=args.chunk_size, proj_chunk_size=args.proj_chunk_size,
                           impl="torch")
        torch.autograd.grad(o.sum(), leaves)
    return counter.get_total_flops()


def matmul_peak(args, dtype) -> tuple[float, float]:
    """(best torch.mm FLOP/s over square sizes, torch.bmm FLOP/s at the op's tile size)."""
    clock = _clock(args)

    def rate(fn, flops, reps=5):
        fn()
        times = []
        for _ in range(reps):
            start = clock()
            fn()
            times.append(clock() - start)
        return flops / statistics.median(times)

    best = 0.0
    for n in (256, 512, 1024, 2048):
        x, y = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        calls = max(1, (1024 // n) ** 3)
        best = max(best, rate(lambda: [x @ y for _ in range(calls)], 2 * n ** 3 * calls))
    batch, d = args.batch * 5 * args.heads, args.d_h
    x, y = torch.randn(batch, args.chunk_size, d, dtype=dtype), torch.randn(batch, d, d, dtype=dtype)
    return best, rate(lambda: torch.bmm(x, y), 2 * batch * args.chunk_size * d * d)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--d-h", type=int, default=32)
    parser.add_argument("--d-m", type=int, default=0, help="memory hidden width (0: d_h)")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--proj-chunk-size", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--momentum", action="store_true", help="Titans momentum on")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with the process's CPU seconds (all threads) instead of wall clock: "
                             "steadier on a shared machine")
    parser.add_argument("--skip-naive", action="store_true", help="skip the per-token reference (slow at large shapes)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    inputs = make_inputs(args, dtype)
    peak, tile = matmul_peak(args, dtype)
    chunked = time_impl("torch", args, inputs)
    flops = counted_flops(args, inputs)
    naive = None if args.skip_naive else time_impl("naive", args, inputs)
    unit = "CPU s" if args.cpu_time else "s"
    columns = ["B", "T", "H", "d_h", "d_m", "chunk_size", "proj_chunk_size", "dtype", "momentum", "threads",
               f"naive fwd+bwd ({unit})", f"chunked fwd+bwd ({unit})", "speed-up", "counted GFLOP",
               "chunked GFLOP/s", "mm peak GFLOP/s", "% of mm peak", "bmm at tile size GFLOP/s"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    naive_s = "-" if naive is None else f"{naive:.3f}"
    speedup = "-" if naive is None else f"{naive / chunked:.1f}x"
    print(f"| {args.batch} | {args.seq} | {args.heads} | {args.d_h} | {args.d_m or args.d_h} | {args.chunk_size} | "
          f"{args.proj_chunk_size} | {args.dtype} | {args.momentum} | {torch.get_num_threads()} | {naive_s} | "
          f"{chunked:.3f} | {speedup} | {flops / 1e9:.2f} | {flops / chunked / 1e9:.1f} | {peak / 1e9:.1f} | "
          f"**{100 * flops / chunked / peak:.0f}%** | {tile / 1e9:.1f} |")


if __name__ == "__main__":
    main()
