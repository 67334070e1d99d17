"""What one pass of writes stores in a fresh memory: N random unit (key, value) pairs written token by
token through the memory op (titans variant, chunk 1, retention off), then every key read back.

    python bench/bench_memory_capacity.py                    # the table of docs/model.md section 2.10
    python bench/bench_memory_capacity.py --pairs 4 --etas 0.5 --trials 1024
    python bench/bench_memory_capacity.py --depths 2 --w2-std 0.53       # model.memory_w2_std

No training: the memories start as the mixers initialise them (depth 1: I + N(0, 0.02); depth 2:
M(z) = z + W1 silu(W2 z), W2 ~ N(0, 1/d_h), W1 ~ N(0, 0.02)). A memory that cannot store a few pairs
in context at initialisation has to learn its own write rule before any recall task can be learned;
this separates a rule that stores from one that does not. Recall: the fraction of keys whose read-out
is closest (dot product) to its own value among the N; cos: the mean cosine of read-out and value.
"""
from __future__ import annotations

import argparse
import itertools
import math

import torch
import torch.nn.functional as F

from kernels.hope_memory import hope_memory
from kernels.hope_memory.types import MemoryParams

RULES = {  # name -> hope_memory flags
    "spec": {},
    "W2 without the delta factor (w2_delta false)": {"w2_delta": False},
    "curvature-bounded step (bound_step)": {"bound_step": True},
}


def initial_params(depth: int, d_h: int, gen: torch.Generator, w2_std: float | None = None,
                   n_mem: int = 1) -> MemoryParams:
    """One head of n_mem memories, initialised as MemoryMixer.init_weights does (init_std 0.02; w2_std as
    model.memory_w2_std, None: 1/sqrt(d_h))."""
    randn = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    if depth == 1:
        return MemoryParams(None, torch.eye(d_h, dtype=torch.float64) + 0.02 * randn(n_mem, 1, d_h, d_h))
    return MemoryParams(0.02 * randn(n_mem, 1, d_h, d_h), (w2_std or d_h ** -0.5) * randn(n_mem, 1, d_h, d_h))


def write_then_read(params: MemoryParams, pairs: int, eta: float, trials: int, gen: torch.Generator,
                    flags: dict) -> tuple[float, float]:
    """(recall, cos) over `trials` sequences of `pairs` writes followed by `pairs` reads (eta 0)."""
    d_h = params.w2.shape[-1]
    unit = lambda: F.normalize(torch.randn(trials, pairs, 1, d_h, generator=gen, dtype=torch.float64), dim=-1)
    k, v = unit(), unit()
    keys = torch.cat([k, k], 1)
    values = torch.cat([v, torch.zeros_like(v)], 1)
    rate = torch.cat([torch.full((trials, pairs, 1), eta, dtype=torch.float64),
                      torch.zeros(trials, pairs, 1, dtype=torch.float64)], 1)
    o, _ = hope_memory(keys, params, k=keys, v=values, eta=rate, alpha=torch.ones_like(rate), chunk_size=1,
                       proj_chunk_size=1, selfgen=False, impl="torch", **flags)
    read = o[:, pairs:]
    nearest = torch.einsum("bnhd,bmhd->bhnm", read, v).argmax(-1)
    recall = (nearest == torch.arange(pairs)).double().mean().item()
    return recall, F.cosine_similarity(read, v, dim=-1).mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--etas", type=float, nargs="+", default=[0.5, 1.0])
    p.add_argument("--depths", type=int, nargs="+", default=[1, 2])
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--w2-std", type=float, default=None, help="depth 2: initial W2 std (default 1/sqrt(d_h))")
    p.add_argument("--trials", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print("| depth | write rule | pairs | eta | recall | cos(read, value) |\n|---|---|---:|---:|---:|---:|")
    for depth, (rule, flags), pairs, eta in itertools.product(args.depths, RULES.items(), args.pairs, args.etas):
        gen = torch.Generator().manual_seed(args.seed)  # the same memories and pairs for every rule
        params = initial_params(depth, args.head_dim, gen, args.w2_std)
        recall, cos = write_then_read(params, pairs, eta, args.trials, gen, flags)
        cos_txt = f"{cos:.3f}" if math.isfinite(cos) else "non-finite (the writes overshot)"
        print(f"| {depth} | {rule} | {pairs} | {eta:g} | {recall:.3f} | {cos_txt} |", flush=True)


if __name__ == "__main__":
    main()
