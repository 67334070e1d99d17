"""The one prepared GPU check (issue 26): `bash bench/gpu_check.sh` runs this on one H100 in under
8 minutes and writes the GPU section of docs/BENCHMARKS.md (between its gpu_check markers).

Rows: (1) the Triton kernels against the naive reference (float64) in float32 and bf16, outputs,
final state and every gradient, selfmod (the default) and titans with momentum; (2) fwd+bwd kernel
times of the Triton and chunked PyTorch paths at 2K..16K tokens (bench_memory_triton.run); (3)
training-step tokens/s, 6N-MFU and peak memory of configs/quality/hope_125m.yaml and
transformer_125m.yaml (model fwd+bwd+AdamW, bf16 autocast, random tokens); (4) that peak memory
against tools/estimate_memory.py when it exists. `--dry` (or GPU_CHECK_DRY=1) runs every row at
tiny sizes on CPU under the Triton interpreter and claims no timings: the test suite runs it so the
script cannot rot.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- gpu_check:begin -->", "<!-- gpu_check:end -->"
H100_BF16 = 989e12
DRY_TOKENS = (1, 32)  # micro-batch x seq_len of the dry run's training step and memory estimate


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry", action="store_true", default=os.environ.get("GPU_CHECK_DRY") == "1",
                   help="tiny sizes on CPU under the Triton interpreter, no timing claims (also GPU_CHECK_DRY=1)")
    p.add_argument("--out", type=Path, default=ROOT / "docs/BENCHMARKS.md", help="markdown file to update")
    p.add_argument("--budget-s", type=float, default=450.0, help="skip the rows left once this much time has gone")
    return p.parse_args(argv)


def correctness(dry: bool) -> list[str]:
    """Triton vs naive (float64) rel RMS errors: the worst over outputs/final state and over gradients."""
    import torch

    sys.path.insert(0, str(ROOT / "tests/unit"))
    import test_memory_triton as ref  # the test suite's problem builder and comparison, one definition

    size = dict(batch=1, seq=16, heads=1, d_h=16) if dry else dict(batch=2, seq=256, heads=2, d_h=64)
    kw = dict(chunk_size=8, proj_chunk_size=8) if dry else dict(chunk_size=64, proj_chunk_size=64)
    rows = ["| variant | dtype | max rel RMS, o and final state | max rel RMS, gradients | contract |",
            "|---|---|---:|---:|---|"]
    for variant, momentum in (("selfmod", False), ("titans", True)):
        problem = ref.make_problem(variant=variant, momentum=momentum, **size)
        for dtype, tol in ((torch.float32, (1e-4, 1e-4)), (torch.bfloat16, (5e-3, 1e-2))):
            # the reference sees the inputs as rounded to dtype: the error is the kernels' own
            rounded = lambda x: ref.cast(ref.cast(x, dtype), torch.float64)  # noqa: E731
            q, params, state = (rounded(x) for x in (problem[0], problem[1], problem[3]))
            inputs = {n: rounded(x) for n, x in problem[2].items()}
            want = ref.forward_backward("naive", torch.float64, q, params, inputs, state, **kw)
            o, final, grads = ref.forward_backward("triton", dtype, q, params, inputs, state, **kw)
            out = max([ref.rel_rms(o, want[0])] + [ref.rel_rms(x, r) for x, r in zip(final, want[1]) if x is not None])
            grad = max(ref.rel_rms(g, want[2][n]) for n, g in grads.items())
            ok = "ok" if out <= tol[0] and grad <= tol[1] else "**FAIL**"
            rows.append(f"| {variant}{' + momentum' if momentum else ''} | {str(dtype)[6:]} | {out:.1e} | "
                        f"{grad:.1e} | <= {tol[0]:g} / {tol[1]:g}: {ok} |")
    return rows


def kernel_times(dry: bool) -> list[str]:
    """bench_memory_triton at 2K..16K tokens (one sequence, the 125m width: 12 heads of 64)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_memory_triton as bmt

    shapes = "1x2048x12x64,1x4096x12x64,1x8192x12x64,1x16384x12x64"
    args = bmt.parse_args(["--smoke"] if dry else ["--shapes", shapes, "--skip-e2e", "--reps", "3"])
    if dry:  # chunk 16: the interpreter's cost grows with the tile's rows
        args.reps, args.skip_e2e, args.chunk_size, args.proj_chunk_size = 1, True, 16, 16
    return bmt.markdown(bmt.run(args)).splitlines()


def train_step_row(path: Path, dry: bool) -> tuple[str, float]:
    """Model fwd+bwd+AdamW tokens/s, 6N-MFU (N without embeddings; attention and the memory op not
    counted) and peak memory of one config at its micro-batch and context."""
    import torch

    from hope_dist.config import load_config
    from hope_dist.model import count_parameters
    from hope_dist.model.model import build_model

    cfg = load_config(path)
    device = torch.device("cpu" if dry else "cuda")
    batch, seq = DRY_TOKENS if dry else (cfg.training.micro_batch, cfg.training.seq_len)
    model = build_model(cfg.model, device)
    counts = count_parameters(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=not dry)
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, seq), device=device)
    times = []
    for _ in range(2 if dry else 8):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not dry):
            logits = model(tokens)
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens.flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not dry:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    tok_s = batch * seq / statistics.median(times[1:])
    mfu = 6 * (counts["total"] - counts["embedding"]) * tok_s / H100_BF16
    peak = torch.cuda.max_memory_allocated() / 2**30 if not dry else float("nan")
    del model, opt
    if not dry:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    name = path.stem + (f" (dry: CPU, {batch} x {seq} tokens)" if dry else f" ({batch} x {seq} tokens)")
    return f"| {name} | {counts['total']:,} | {tok_s:,.0f} | {100 * mfu:.1f}% | {peak:.1f} |", peak


def estimator_row(path: Path, peak_gb: float, dry: bool) -> str:
    """tools/estimate_memory.py's answer next to the measured peak, or why there is none (dry: for the
    dry step's 1 x 32 tokens, which also keeps its fake-tensor traces short)."""
    if not (ROOT / "tools/estimate_memory.py").exists():
        return f"| {path.stem} | skipped: tools/estimate_memory.py is not in this tree | {peak_gb:.1f} |"
    sizes = [f"--training.micro_batch={DRY_TOKENS[0]}", f"--training.seq_len={DRY_TOKENS[1]}"] if dry else []
    run = subprocess.run([sys.executable, "-m", "tools.estimate_memory", str(path), *sizes], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    lines = (run.stdout or run.stderr).strip().splitlines()
    answer = " / ".join(lines[-3:]).replace("|", "\\|") or f"exit {run.returncode}, no output"
    return f"| {path.stem} | {answer} | {peak_gb:.1f} |"


def training(dry: bool) -> list[str]:
    rows = ["| config (one GPU, bf16 autocast) | params | tokens/s | 6N-MFU (H100 989 TFLOP/s) | peak GiB |",
            "|---|---:|---:|---:|---:|"]
    est = ["| config | tools/estimate_memory.py (last lines) | measured peak GiB |", "|---|---|---:|"]
    size = "2m" if dry else "125m"  # dry: the same recipe at its CPU size
    for name in (f"hope_{size}", f"transformer_{size}"):
        path = ROOT / "configs/quality" / f"{name}.yaml"
        row, peak = train_step_row(path, dry)
        rows.append(row)
        est.append(estimator_row(path, peak, dry))
    return rows + [""] + est


def section(parts: dict[str, list[str]], dry: bool, device: str, seconds: float) -> str:
    head = [f"Written by `bash bench/gpu_check.sh` on {device} in {seconds:.0f} s"
            + (" (dry run: CPU, Triton interpreter, tiny sizes; no timing means anything)." if dry else ".")]
    for title, lines in parts.items():
        head += ["", f"**{title}**", "", *lines]
    return "\n".join(head)


def write(out: Path, text: str) -> None:
    """Replace what lies between the markers (appending a section with them when absent)."""
    doc = out.read_text() if out.exists() else ""
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in doc and END in doc:
        doc = doc[:doc.index(BEGIN)] + block + doc[doc.index(END) + len(END):]
    else:
        doc = doc.rstrip("\n") + f"\n\n## GPU check\n\n{block}\n"
    out.write_text(doc)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined
    import torch

    if not args.dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run it on a GPU machine, or GPU_CHECK_DRY=1 to check the script on CPU")
        return 2
    start = time.perf_counter()
    parts, failed = {}, False
    for title, fn in (("Triton vs naive reference (float64)", correctness),
                      ("Memory op fwd+bwd, Triton vs chunked PyTorch (bf16, selfmod, chunk 64)", kernel_times),
                      ("Training step at the 125m quality size: HOPE vs Transformer++, and peak memory", training)):
        if time.perf_counter() - start > args.budget_s:
            parts[title] = [f"skipped: the {args.budget_s:.0f} s budget was spent"]
            continue
        try:
            parts[title] = fn(args.dry)
        except Exception as e:  # one broken row must not lose the others' figures
            failed = True
            parts[title] = [f"**failed**: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"]
        print(f"gpu_check: {title}: {time.perf_counter() - start:.0f} s", flush=True)
    device = "CPU" if args.dry else torch.cuda.get_device_name()
    text = section(parts, args.dry, device, time.perf_counter() - start)
    write(args.out, text)
    print(text)
    return 1 if failed or "**FAIL**" in text else 0


if __name__ == "__main__":
    raise SystemExit(main())
