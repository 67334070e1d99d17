"""Shared memory of every Triton kernel launch that the shipped configs make, compiled ahead of time for
an H100 (sm_90, 227 KB per block) on a machine without a GPU.

Why: Triton raises OutOfResources only at launch, on the GPU, so a kernel that needs more shared memory
than a block has (the M_o backward once needed 320 KB) is otherwise found only on the first GPU run.
How: the drivers (chunk_fwd.py, chunk_bwd.py) run forward and backward on CPU tensors with the kernel
launches recorded instead of run, so every launch they make is checked, with the constexprs they pass
and the dot precision the GPU would use (tf32x3 for float32 inputs, the model's case; tf32 for bf16).
Each distinct launch is compiled to LLVM IR for GPUTarget("cuda", 90, 32) and its `shared` bytes read.
Slow (about 10 s of CPU per kernel), hence a script and not a unit test: docs/triton.md holds its table.

    python bench/triton_smem_check.py                                  # every config under configs/
    python bench/triton_smem_check.py --config configs/hope_760m.yaml  # one (repeatable)

Exits 1 when a kernel is over the limit.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
H100_SHARED = 227 * 1024  # bytes of shared memory one block may use on sm_90
TYPES = {"torch.float32": "*fp32", "torch.bfloat16": "*bf16", "torch.float16": "*fp16", "torch.int64": "*i64",
         "torch.int32": "*i32"}


def memory_problem(cfg, dtype):
    """One document of one chunk, one head, of the config's memory op: (q, params, inputs, op kwargs)."""
    import torch

    from kernels.hope_memory import MemoryParams

    d_h = cfg.d_model // cfg.n_heads
    d_m = cfg.memory_hidden or d_h
    n_mem = 5 if cfg.mixer == "selfmod" else 1
    mat = lambda *s: torch.zeros(*s, dtype=torch.float32)
    w1 = mat(n_mem, 1, d_h, d_m) if cfg.memory_depth == 2 else None
    w2 = mat(n_mem, 1, d_m if cfg.memory_depth == 2 else d_h, d_h)
    shape = (1, cfg.chunk_size, 1, d_h)
    if cfg.mixer == "selfmod":
        params = MemoryParams(w1, w2, mat(1, d_h), mat(1), mat(1, d_h), mat(1))
        inputs = {"a": mat(*shape).to(dtype)}
    else:
        params = MemoryParams(w1, w2)
        inputs = {"k": mat(*shape).to(dtype), "v": mat(*shape).to(dtype), "eta": mat(*shape[:3]).to(dtype),
                  "alpha": mat(*shape[:3]).to(dtype)}
    if cfg.use_momentum:
        params = params._replace(gamma=mat(1))
    op = dict(chunk_size=cfg.chunk_size, proj_chunk_size=cfg.proj_chunk_size, selfgen=cfg.selfgen_values,
              stopgrad_vhat=cfg.stopgrad_vhat, w1_delta=cfg.w1_delta)
    return mat(*shape).to(dtype), params, inputs, op


def record_launches(cfg, dtype) -> list:
    """(kernel, positional args' types, constexprs) of every launch of one forward + backward."""
    import torch
    from triton.runtime.jit import JITFunction

    from kernels.hope_memory.chunk import chunk_hope_memory

    seen = []

    def record(self, *args, grid, warmup, **kwargs):
        types = [TYPES[str(a.dtype)] if isinstance(a, torch.Tensor) else "fp32" if isinstance(a, float) else "i32"
                 for a in args]
        kwargs["PRECISION"] = "tf32x3" if dtype == torch.float32 else "tf32"  # as dot_precision on CUDA
        seen.append((self, types, kwargs))

    q, params, inputs, op = memory_problem(cfg, dtype)
    leaves = [q, *inputs.values()]
    for x in leaves:
        x.requires_grad_(True)
    original, JITFunction.run = JITFunction.run, record
    try:
        o, _ = chunk_hope_memory(q, params, **inputs, **op)
        torch.autograd.grad(o, leaves, torch.ones_like(o))
    finally:
        JITFunction.run = original
    return seen


def shared_bytes(fn, types, constexprs) -> tuple[int, int, int]:
    """(shared bytes, warps, stages) of the kernel compiled for sm_90 (to LLVM IR: shared memory is
    allocated there, before PTX)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton._C.libtriton import ir

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    options = backend.parse_options({k: constexprs[k] for k in ("num_warps", "num_stages") if k in constexprs})
    params = [n for n in fn.arg_names if n not in constexprs]
    signature = dict(zip(params, types)) | {n: "constexpr" for n in fn.arg_names if n in constexprs}
    aligned = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in zip(params, types) if t[0] == "*"}
    src = ASTSource(fn, signature, {n: constexprs[n] for n in fn.arg_names if n in constexprs}, aligned)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                         context)
    stages, metadata = {}, {}
    backend.add_stages(stages, options, src.language)
    for name in ("ttir", "ttgir", "llir"):
        module = stages[name](module, metadata)
    return metadata["shared"], options.num_warps, options.num_stages


def config_launches(paths) -> dict:
    """{(kernel name, constexprs, types): [config names]} over the memory-mixer configs, float32 and bf16 inputs."""
    import torch

    from hope_dist.config import load_config

    launches = {}
    for path in paths:
        cfg = load_config(path).model
        if cfg.mixer == "attention":
            continue
        for dtype in (torch.float32, torch.bfloat16):
            for fn, types, constexprs in record_launches(cfg, dtype):
                key = (fn.__name__, tuple(sorted(constexprs.items())), tuple(types))
                launches.setdefault(key, (fn, types, constexprs, []))[3].append(Path(path).stem)
    return launches


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", type=Path, help="config file (default: every one under configs/)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the kernels this script compiles")
    paths = args.config or sorted((ROOT / "configs").rglob("*.yaml"))
    print("| kernel | constexprs | configs | warps | stages | shared bytes | fits 227 KB |")
    print("|---|---|---|---:|---:|---:|---|")
    over = 0
    for (name, items, _), (fn, types, constexprs, configs) in config_launches(paths).items():
        start = time.time()
        shared, warps, stages = shared_bytes(fn, types, constexprs)
        over += shared > H100_SHARED
        flags = ", ".join(f"{k}={v}" for k, v in items if k not in ("CHUNK", "BC", "DH", "DM"))
        shape = f"C={constexprs['CHUNK']} d_h={constexprs['DH']} d_m={constexprs['DM']}"
        print(f"| `{name}` | {shape}, {flags} | {', '.join(sorted(set(configs)))} | {warps} | {stages} | {shared} | "
              f"{'yes' if shared <= H100_SHARED else '**NO**'} |", flush=True)
        print(f"  ({name}: {time.time() - start:.0f} s)", file=sys.stderr, flush=True)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
