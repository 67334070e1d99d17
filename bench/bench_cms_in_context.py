"""Activation memory an in-context CMS level adds, per level, layer and sequence (docs/cms_in_context.md).

    python bench/bench_cms_in_context.py --config configs/hope_760m.yaml --chunks 64 256 512 1024

Runs the chunked op forward on random inputs at the config's d_model, level-0 width and seq_len, and
sums the storages autograd keeps for the backward (saved_tensors_hooks), leaving out h, z and the slow
output, which the plain MLP keeps too. Both settings of stop-grad writes; float32.
"""
from __future__ import annotations

import argparse


import torch

from hope_dist.config import load_config
from kernels.cms_in_context import cms_in_context


def saved_bytes(T: int, f: int, d: int, chunk_size: int, stopgrad: bool) -> int:
    h = torch.randn(1, T, f, requires_grad=True)
    z = torch.randn(1, T, d, requires_grad=True)
    w = (0.02 * torch.randn(d, f)).requires_grad_(True)
    y_slow = h @ w.mT
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        cms_in_context(h, y_slow, z, chunk_size=chunk_size, lr=0.1, stopgrad_writes=stopgrad)
    kept_anyway = {x.untyped_storage().data_ptr() for x in (h, z, y_slow)}
    return sum(n for ptr, n in seen.items() if ptr not in kept_anyway)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/hope_760m.yaml")
    p.add_argument("--chunks", nargs="+", type=int, default=[64, 256, 512, 1024])
    args = p.parse_args()
    cfg = load_config(args.config)
    d, f, T, layers = cfg.model.d_model, cfg.model.cms[0].width, cfg.training.seq_len, cfg.model.n_layers
    print(f"d={d} f={f} T={T} layers={layers}; dense state d*f*4 = {d * f * 4 / 2**20:.2f} MiB")
    print("| chunk | stop-grad writes | extra per level-layer | per sequence (all layers) |")
    print("|---:|---|---:|---:|")
    for chunk_size in args.chunks:
        for stopgrad in (False, True):
            b = saved_bytes(T, f, d, chunk_size, stopgrad)
            print(f"| {chunk_size} | {stopgrad} | {b / 2**20:.0f} MiB | {layers * b / 2**30:.2f} GiB |", flush=True)


if __name__ == "__main__":
    main()
