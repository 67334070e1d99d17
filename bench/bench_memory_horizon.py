"""The fast weights' scale over a long sequence: does a memory's state settle, or vanish or run away?

    python bench/bench_memory_horizon.py                  # the figures of docs/model.md section 2.7
    python bench/bench_memory_horizon.py --depth 2 --etas 0.1 --marks 64 512 4096 8192

HOPE's memories (selfmod, depth 1 by default) read random per-memory inputs through the memory op (chunked
path) with a constant eta and alpha 0.99, starting from their initialisation (bench_memory_capacity.py's
initial_params), and the norm of M_o's fast
weights is reported at several positions (median over sequences). With self-generated targets
(vhat = M_c(v), the spec) every update is linear in the weights, so nothing fixes the
state's scale: it follows the product of the A_t and vanishes or grows exponentially. Targets v, or
retention toward M_0 (model.retain_init), add a term that does not scale with W and anchor it. A state
carried past the training context (training.carry_state, evaluation past the context) lives there.
"""
from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from bench.bench_memory_capacity import initial_params
from kernels.hope_memory import hope_memory

VARIANTS = {  # name -> hope_memory flags
    "self-generated targets (spec)": {},
    "targets v (selfgen_values false)": {"selfgen": False},
    "self-generated targets, retention toward M_0 (retain_init)": {"retain_init": True},
}


def norms_along(depth: int, eta: float, length: int, marks: list[int], batch: int, d_h: int, flags: dict,
                seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)  # the same inputs for every variant
    randn = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    params = initial_params(depth, d_h, gen, n_mem=5)
    a = randn(batch, length, 4, 1, d_h)
    q = F.normalize(randn(batch, length, 1, d_h), dim=-1)
    rate = torch.full((batch, length, 1), eta, dtype=torch.float64)
    out, state, start = [], None, 0
    for end in marks:  # the op carries its state from mark to mark
        _, state = hope_memory(q[:, start:end], params, a=a[:, start:end], eta=rate[:, start:end],
                               alpha=torch.full_like(rate[:, start:end], 0.99), initial_state=state,
                               output_final_state=True, chunk_size=16, proj_chunk_size=16, impl="torch", **flags)
        w_o = state.w2[:, -1] if depth == 1 else torch.cat([state.w1[:, -1], state.w2[:, -1]], -1)
        out.append(w_o.flatten(1).norm(dim=1).median().item())
        start = end
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=1, choices=(1, 2))
    p.add_argument("--etas", type=float, nargs="+", default=[0.1, 0.3])
    p.add_argument("--marks", type=int, nargs="+", default=[64, 512, 2048, 4096], help="positions reported")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    marks = sorted(args.marks)
    print(f"| targets | eta | {' | '.join(f'norm of M_o at {m}' for m in marks)} |")
    print(f"|---|---:|{'---:|' * len(marks)}")
    for (name, flags), eta in itertools.product(VARIANTS.items(), args.etas):
        norms = norms_along(args.depth, eta, marks[-1], marks, args.batch, args.head_dim, flags, args.seed)
        print(f"| {name} | {eta:g} | {' | '.join(f'{n:.3g}' for n in norms)} |", flush=True)


if __name__ == "__main__":
    main()
