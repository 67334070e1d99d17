"""GPU benchmark of the Triton HOPE memory op (kernels/hope_memory/chunk.py).

For each shape (B, T, H, d_h) it times forward + backward of the Triton path and of the chunked
PyTorch path (bf16 inputs, selfmod, depth 2, chunk_size = proj_chunk_size = 64), reports the Triton
path's fraction of the roofline (model FLOPs and HBM bytes below, against the device peaks),
flash-linear-attention's chunk_gated_delta_rule at the same shape when `fla` is installed, and
end-to-end training tokens/s of a small HOPE model with each kernel. Prints a markdown table
(and writes JSON with --json) for docs/BENCHMARKS.md.

    python bench/bench_memory_triton.py                      # (8,4096,16,64), (2,16384,16,64)
    python bench/bench_memory_triton.py --shapes 1x1024x4x64 --skip-e2e
    python bench/bench_memory_triton.py --smoke              # CPU, Triton interpreter, tiny: checks the script
    python bench/bench_memory_triton.py --paper              # no GPU: the per-chunk FLOP/byte model and H100 roofline
    python bench/bench_memory_triton.py --e2e-760m    # also configs/hope_760m.yaml vs an equal-size Transformer++

Without CUDA (and without --smoke) it prints why and exits 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import time
from pathlib import Path

import torch


# Device peaks (dense bf16 FLOP/s, HBM bytes/s). The kernels run their dots in tf32 for 16-bit
# inputs (half the bf16 rate); the roofline uses the bf16 peak, the yardstick.
PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12), "A100": (312e12, 2.0e12)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="8x4096x16x64,2x16384x16x64", help="comma-separated BxTxHxD")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--proj-chunk-size", type=int, default=64)
    p.add_argument("--variant", choices=("selfmod", "titans"), default="selfmod")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (median reported)")
    p.add_argument("--skip-torch", action="store_true", help="skip the chunked PyTorch path")
    p.add_argument("--skip-e2e", action="store_true", help="skip the end-to-end model benchmark")
    p.add_argument("--e2e-layers", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--paper", action="store_true",
                   help="print the per-chunk FLOP/byte model and the H100 roofline (no GPU needed) and exit")
    p.add_argument("--e2e-760m", action="store_true",
                   help="also time training tokens/s of configs/hope_760m.yaml and an equal-size Transformer++")
    p.add_argument("--smoke", action="store_true",
                   help="run tiny shapes on CPU under the Triton interpreter (checks the script, times nothing useful)")
    return p.parse_args(argv)


def timed(fn, reps: int) -> float:
    """Median seconds of fn() after one warm-up call (which also compiles the kernels)."""
    fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def make_inputs(B, T, H, D, variant, device, dtype=torch.bfloat16):
    """Random op inputs in the regime of a trained model (eta about 0.1, alpha about 0.98)."""
    from kernels.hope_memory import MemoryParams, l2norm

    g = torch.Generator(device="cpu").manual_seed(0)
    randn = lambda *s, scale=1.0, shift=0.0: (torch.randn(*s, generator=g) * scale + shift).to(device, dtype)
    n_mem = 5 if variant == "selfmod" else 1
    w1 = randn(n_mem, H, D, D, scale=0.5 * D ** -0.5)
    w2 = randn(n_mem, H, D, D, scale=D ** -0.5)
    q = l2norm(randn(B, T, H, D))
    if variant == "selfmod":
        params = MemoryParams(w1, w2, randn(H, D, scale=0.3), randn(H, scale=0.3, shift=-2.0),
                              randn(H, D, scale=0.3), randn(H, scale=0.3, shift=4.0))
        inputs = {"a": torch.nn.functional.silu(randn(B, T, H, D))}
    else:
        params = MemoryParams(w1, w2)
        inputs = {"k": l2norm(randn(B, T, H, D)), "v": l2norm(randn(B, T, H, D)),
                  "eta": torch.full((B, T, H), 0.1, device=device, dtype=dtype),
                  "alpha": torch.full((B, T, H), 0.98, device=device, dtype=dtype)}
    leaves = [q, *inputs.values(), *(x for x in params if x is not None)]
    for x in leaves:
        x.requires_grad_(True)
    return q, params, inputs, leaves


def op_step(impl, q, params, inputs, leaves, chunk_size, proj_chunk_size):
    """One forward + backward of the memory op."""
    from kernels.hope_memory import hope_memory

    def step():
        o, _ = hope_memory(q, params, **inputs, chunk_size=chunk_size, proj_chunk_size=proj_chunk_size, impl=impl)
        torch.autograd.grad(o.float().square().sum(), leaves)
    return step


def chunk_cost(C, D, n_mem=5, in_bytes=2):
    """Per chunk and head, as the Triton kernels run (selfmod or titans, depth 2, d_m = d_h = D, W1's
    delta rule, no momentum): (fwd FLOPs, bwd FLOPs, fwd HBM bytes, bwd HBM bytes). The backward
    counts its recomputation of the chunk states (a forward without the read-out), the backward
    kernel's recomputation of the chunk (the same again) and twice the forward for the gradients.
    Bytes: token tensors in in_bytes, k/v/eta/alpha and states in float32; every memory's program
    reads its chunk-start and gradient states and writes its end state (docs/triton.md)."""
    cdd, ccd = C * D * D, C * C * D
    proj_macs = 4 * 2 * cdd if n_mem == 5 else 0                         # M(a) of the 4 projection memories
    mem_macs = 9 * cdd + 5 * ccd                 # targets, r, u; per weight (W2, W1) a WY/UT solve and end state
    read_macs = 2 * cdd + 6 * ccd                                        # M_o's inclusive read-out
    fwd = proj_macs + n_mem * mem_macs + read_macs
    bwd = 2 * (fwd - read_macs) + 2 * fwd
    state, kvea = 2 * D * D * 4, 2 * C * D * 4 + 2 * C * 4
    tok = C * D * in_bytes
    proj_fwd = (tok + 4 * state + kvea) if n_mem == 5 else 0
    fwd_bytes = proj_fwd + n_mem * (kvea + 3 * state) + 2 * tok          # + q in, o out
    proj_bwd = (2 * tok + 8 * state + kvea) if n_mem == 5 else 0
    bwd_bytes = (fwd_bytes - 2 * tok) + n_mem * (2 * kvea + 5 * state) + 3 * tok + proj_bwd
    return 2 * fwd, 2 * bwd, fwd_bytes, bwd_bytes


def model_flops_and_bytes(B, T, H, D, n_mem, chunk_size, in_bytes=2):
    """fwd+bwd FLOPs and HBM bytes of one call at (B, T, H, D) from chunk_cost."""
    f, b, fb, bb = chunk_cost(chunk_size, D, n_mem, in_bytes)
    n = B * H * -(-T // chunk_size)
    return n * (f + b), n * (fb + bb)


def paper(args) -> str:
    """The per-chunk model, the two shapes' totals and their H100 roofline, as markdown."""
    peak, bw = PEAKS["H100"]
    f, b, fb, bb = chunk_cost(args.chunk_size, 64)
    lines = [f"Per chunk (C = {args.chunk_size}) and head, d_h = d_m = 64, selfmod depth 2, bf16 inputs:",
             "", "| pass | MFLOP | MB moved | FLOP/byte |", "|---|---:|---:|---:|",
             f"| forward | {f / 1e6:.1f} | {fb / 1e6:.3f} | {f / fb:.0f} |",
             f"| backward (with state recomputation) | {b / 1e6:.1f} | {bb / 1e6:.3f} | {b / bb:.0f} |",
             "", f"H100 ridge point: {peak / bw:.0f} FLOP/byte (989 TFLOP/s bf16 dense, 3.35 TB/s).", "",
             "| (B, T, H, d_h) | chunk-heads | fwd GFLOP | fwd GB | bwd GFLOP | bwd GB | fwd roofline (ms) "
             "| bwd roofline (ms) | bound | sequential steps |", "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for shape in args.shapes.split(","):
        B, T, H, D = map(int, shape.split("x"))
        n = B * H * -(-T // args.chunk_size)
        f, b, fb, bb = chunk_cost(args.chunk_size, D)
        tf, tb = max(n * f / peak, n * fb / bw), max(n * b / peak, n * bb / bw)
        bound = "memory" if n * fb / bw > n * f / peak else "compute"
        lines.append(f"| ({B}, {T}, {H}, {D}) | {n} | {n * f / 1e9:.0f} | {n * fb / 1e9:.2f} | {n * b / 1e9:.0f} | "
                     f"{n * bb / 1e9:.2f} | {1e3 * tf:.2f} | {1e3 * tb:.2f} | {bound} | {-(-T // args.chunk_size)} |")
    return "\n".join(lines)


def fla_step(B, T, H, D, device):
    """fwd+bwd of flash-linear-attention's chunk_gated_delta_rule at the same shape, or None."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError:
        return None
    import torch.nn.functional as F

    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device, torch.bfloat16)
    q, k, v = (F.normalize(mk(B, T, H, D), dim=-1).requires_grad_() for _ in range(3))
    gate = F.logsigmoid(mk(B, T, H).float() + 4).requires_grad_()
    beta = torch.sigmoid(mk(B, T, H)).requires_grad_()

    def step():
        o, _ = chunk_gated_delta_rule(q, k, v, gate, beta)
        torch.autograd.grad(o.float().square().sum(), [q, k, v, gate, beta])
    return step


def e2e_tokens_per_s(kernel, B, T, H, D, layers, reps, device):
    """Training tokens/s (forward + backward, bf16 autocast) of a HOPE model of width H * D."""
    from hope_dist.config import CMSLevel, ModelConfig
    from hope_dist.model.model import build_model

    cfg = ModelConfig(vocab_size=32000, d_model=H * D, n_heads=H, n_layers=layers, kernel=kernel,
                      cms=[CMSLevel(4 * H * D, p) for p in (1, 4)])
    model = build_model(cfg, device)
    tokens = torch.randint(0, cfg.vocab_size, (B, T), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(tokens)
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens.flatten()).backward()
    return B * T / timed(step, reps)


def e2e_760m(reps, device, micro_batch=2):
    """Training tokens/s (fwd+bwd, bf16 autocast, no optimizer) of configs/hope_760m.yaml and of a
    Transformer++ of the same size (attention mixer, SDPA = FlashAttention on H100, one CMS level
    widened to match the parameter count) at the config's context."""
    from hope_dist.config import CMSLevel, load_config
    from hope_dist.model import HopeModel, count_parameters
    from hope_dist.model.model import build_model

    hope = load_config(str(Path(__file__).resolve().parents[1] / "configs/hope_760m.yaml")).model
    T = load_config(str(Path(__file__).resolve().parents[1] / "configs/hope_760m.yaml")).training.seq_len

    def size(cfg):
        with torch.device("meta"):
            return count_parameters(HopeModel(cfg))["total"]

    tpp = dataclasses.replace(hope, mixer="attention", cms=[CMSLevel(1, 1)])
    base = size(tpp)
    per = size(dataclasses.replace(tpp, cms=[CMSLevel(2, 1)])) - base
    tpp = dataclasses.replace(tpp, cms=[CMSLevel(1 + round((size(hope) - base) / per), 1)])
    out = {}
    for name, cfg in (("hope_760m", hope), ("transformer_760m", tpp)):
        model = build_model(cfg, device)
        tokens = torch.randint(0, cfg.vocab_size, (micro_batch, T), device=device)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(tokens)  # noqa: F821 (bound in this iteration; `del model` below frees it)
            torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens.flatten()).backward()
        out[name] = {"params": size(cfg), "tokens_per_s": micro_batch * T / timed(step, reps)}
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def run(args) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)"
    peak_flops, peak_bw = next((v for k, v in PEAKS.items() if k in name), PEAKS["H100"])
    shapes = "1x40x2x16" if args.smoke else args.shapes
    results = []
    for shape in shapes.split(","):
        B, T, H, D = map(int, shape.split("x"))
        n_mem = 5 if args.variant == "selfmod" else 1
        row = {"device": name, "shape": [B, T, H, D], "variant": args.variant, "chunk_size": args.chunk_size}
        q, params, inputs, leaves = make_inputs(B, T, H, D, args.variant, device)
        step = {impl: op_step(impl, q, params, inputs, leaves, args.chunk_size, args.proj_chunk_size)
                for impl in ("triton", "torch")}
        row["triton_ms"] = 1e3 * timed(step["triton"], args.reps)
        flops, hbm = model_flops_and_bytes(B, T, H, D, n_mem, args.chunk_size)
        row["roofline_fraction"] = max(flops / peak_flops, hbm / peak_bw) / (row["triton_ms"] / 1e3)
        row["tflops"] = flops / (row["triton_ms"] / 1e3) / 1e12
        if not args.skip_torch:
            row["torch_ms"] = 1e3 * timed(step["torch"], args.reps)
        fla = fla_step(B, T, H, D, device) if device.type == "cuda" else None
        row["fla_gated_delta_ms"] = None if fla is None else 1e3 * timed(fla, args.reps)
        if not args.skip_e2e:
            for kernel in ("triton", "torch"):
                row[f"e2e_{kernel}_tok_s"] = e2e_tokens_per_s(kernel, B, T, H, D, args.e2e_layers, args.reps, device)
        results.append(row)
        del q, params, inputs, leaves, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def markdown(results: list[dict]) -> str:
    cols = ["shape", "triton_ms", "torch_ms", "roofline_fraction", "tflops", "fla_gated_delta_ms",
            "e2e_triton_tok_s", "e2e_torch_tok_s"]

    def fmt(v):
        if isinstance(v, list):
            return "x".join(map(str, v))
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    first = results[0]
    lines = [f"device: {first['device']}, variant: {first['variant']}, chunk_size: {first['chunk_size']}",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in results]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.paper:
        print(paper(args))
        return 0
    if not torch.cuda.is_available():
        if not args.smoke:
            print("bench_memory_triton: no CUDA device; this benchmark needs a GPU (use --smoke to "
                  "check the script on CPU under the Triton interpreter). Skipping.")
            return 0
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
        args.reps, args.e2e_layers = 1, 1
    if importlib.util.find_spec("triton") is None:
        print("bench_memory_triton: triton is not installed (pip install 'hope-dist[triton]'). Skipping.")
        return 0
    results = run(args)
    print(markdown(results))
    if args.e2e_760m and torch.cuda.is_available():
        e2e = e2e_760m(args.reps, torch.device("cuda"))
        print("| model | params | training tokens/s (1 GPU, micro-batch 2 x 4096) |\n|---|---:|---:|")
        for name, r in e2e.items():
            print(f"| {name} | {r['params']:,} | {r['tokens_per_s']:.0f} |")
        results.append({"e2e_760m": e2e})
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
