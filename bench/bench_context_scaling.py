"""Training speed and peak memory against context length: HOPE vs Titans vs Transformer++ (CPU).

    python bench/bench_context_scaling.py                      # the whole sweep, one thread, ~10 CPU-min
    python bench/bench_context_scaling.py --contexts 512,2048 --steps 2 --out-dir /tmp/cs

Three models of equal parameter count (within 1%) and one width (d_model 256, 4 heads of d_h 64,
2 layers, vocabulary 4096): HOPE (`mixer: selfmod`, CMS levels of periods 1/4/16/64), Titans
(`mixer: titans`, the same CMS) and Transformer++ (`mixer: attention`, SDPA, one CMS level of period
1). The CMS widths of Titans and Transformer++ are solved so that their totals match HOPE's.
Every context runs the same number of tokens per step (`--tokens`, default 16384: batch =
tokens / context). One training step = forward, token-mean cross-entropy, backward and an AdamW
step (all CMS levels step: the clock changes which levels the optimizer touches, not the compute).
Random tokens without end-of-document markers, float32, `torch.set_num_threads(--threads)`.

Each (model, context) runs in its own subprocess. The first step (the warm-up) measures memory:
glibc is told to serve every allocation of 64 KB or more by mmap and to return it at free
(mallopt), so the resident set follows the live tensors, and the peak resident set of that step
(VmHWM, reset through /proc/self/clear_refs) minus the resident set just before it (model and batch
allocated) is what a training step adds: activations, gradients, optimizer state. Then glibc is set
back to heap reuse (a fixed 32 MB mmap threshold, its default's ceiling) and `--steps` timed steps
give the median wall seconds and CPU seconds of the process (tokens per CPU-second is what a
shared machine barely moves). "HOPE, recompute" is HOPE with the chunked op's per-chunk
recomputation on (kernels/hope_memory/torch_chunked.py RECOMPUTE), measured for memory only. A
second pass (on by default) measures memory at batch 1 (one sequence of each context): how memory
grows with the context at a fixed batch. Writes `context_scaling.json`, a markdown table
(`context_scaling.md`) and a plot (`context_scaling.png`) under --out-dir (default docs/).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODELS = ("hope", "hope_rc", "titans", "transformer")
LABELS = {"hope": "HOPE (selfmod)", "hope_rc": "HOPE, recompute", "titans": "Titans",
          "transformer": "Transformer++ (SDPA)"}
COLORS = {"hope": "C0", "hope_rc": "C1", "titans": "C2", "transformer": "C3"}
D_MODEL, HEADS, LAYERS, VOCAB = 256, 4, 2, 4096
HOPE_CMS = [(160, 1), (160, 4), (160, 16), (160, 64)]  # (width, period): ~2.5 d in all, as hope_760m


def model_config(name: str, width: int | None = None, chunk_size: int = 64, proj_chunk_size: int = 64):
    """ModelConfig of one benchmark model; `width` overrides the first CMS level's width."""
    from hope_dist.config import CMSLevel, ModelConfig

    mixer = {"hope": "selfmod", "hope_rc": "selfmod", "titans": "titans", "transformer": "attention"}[name]
    levels = [(width or 640, 1)] if name == "transformer" else list(HOPE_CMS)
    if width is not None and name != "transformer":
        levels[0] = (width, levels[0][1])
    return ModelConfig(vocab_size=VOCAB, d_model=D_MODEL, n_heads=HEADS, n_layers=LAYERS, mixer=mixer,
                       chunk_size=chunk_size, proj_chunk_size=proj_chunk_size, cms=[CMSLevel(w, p) for w, p in levels])


def count(cfg) -> int:
    import torch

    from hope_dist.model import HopeModel, count_parameters

    with torch.device("meta"):
        return count_parameters(HopeModel(cfg))["total"]


def matched_configs(chunk_size: int, proj_chunk_size: int) -> dict:
    """HOPE as given; Titans' first CMS level and Transformer++'s single level widened to match it."""
    target = count(model_config("hope", chunk_size=chunk_size, proj_chunk_size=proj_chunk_size))
    cfgs = {"hope": model_config("hope", chunk_size=chunk_size, proj_chunk_size=proj_chunk_size)}
    cfgs["hope_rc"] = cfgs["hope"]
    for name in ("titans", "transformer"):
        base = count(model_config(name, 1, chunk_size, proj_chunk_size))
        per_unit = count(model_config(name, 2, chunk_size, proj_chunk_size)) - base  # parameters per unit of width
        width = 1 + round((target - base) / per_unit)
        cfgs[name] = model_config(name, width, chunk_size, proj_chunk_size)
    return cfgs


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _malloc_mode(track_live: bool) -> None:
    """track_live: allocations >= 64 KB by mmap, returned at free, so RSS follows live tensors;
    else heap reuse (mmap threshold 32 MB, the ceiling of glibc's dynamic default)."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_threshold = -1, -3
    threshold = 64 * 1024 if track_live else 32 * 2**20
    libc.mallopt(m_mmap_threshold, threshold)
    libc.mallopt(m_trim_threshold, 2 * threshold)
    libc.malloc_trim(0)


def run_one(args) -> dict:
    """One (model, context) in this process: timed training steps and peak memory."""
    import torch
    import torch.nn.functional as F

    import kernels.hope_memory.torch_chunked as torch_chunked
    from hope_dist.model import build_model

    torch_chunked.RECOMPUTE = args.model == "hope_rc"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = matched_configs(args.chunk_size, args.proj_chunk_size)[args.model]
    model = build_model(cfg)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    batch = max(1, args.tokens // args.context) if args.batch == 0 else args.batch
    tokens = torch.randint(1, VOCAB, (batch, args.context + 1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def step():
        logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    _malloc_mode(track_live=True)
    base_rss = _rss_bytes()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    c0 = time.process_time()
    step()  # the warm-up step, measured for memory
    first_cpu = time.process_time() - c0
    peak = _peak_rss_bytes()
    _malloc_mode(track_live=False)
    wall, cpu = [], []
    for i in range(args.warmup - 1 + args.steps):
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        if i >= args.warmup - 1:
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
    n_tok = batch * args.context
    med = lambda x: statistics.median(x) if x else float("nan")
    return {"model": args.model, "context": args.context, "batch": batch, "params": params,
            "step_wall_s": med(wall), "step_cpu_s": med(cpu) if cpu else first_cpu,
            "tokens_per_s": n_tok / med(wall), "tokens_per_cpu_s": n_tok / med(cpu),
            "peak_added_mb": (peak - base_rss) / 2**20, "peak_rss_mb": peak / 2**20,
            "cms": [(lvl.width, lvl.period) for lvl in cfg.cms], "threads": args.threads}


def sweep(args) -> list[dict]:
    partial = args.out_dir / "context_scaling.partial.jsonl"
    done = [json.loads(line) for line in partial.read_text().splitlines()] if args.resume and partial.exists() else []
    if not args.resume:
        partial.unlink(missing_ok=True)
    rows = []
    contexts = [int(c) for c in args.contexts.split(",")]
    timed = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    passes = [("train", ["--batch", "0"])]
    if args.mem_batch1:
        passes.append(("batch1", ["--batch", "1"]))
    for kind, extra in passes:
        for context in contexts:
            for model in args.models.split(","):
                same = [r for r in rows if (r["model"], r["context"]) == (model, context)]
                if kind == "batch1" and args.tokens // context <= 1 and same:  # the first pass ran batch 1
                    rows.append({**same[0], "pass": kind})
                    continue
                if kind == "train" and model == "hope_rc" and not args.recompute_train:
                    continue
                old = [r for r in done if (r["pass"], r["model"], r["context"]) == (kind, model, context)]
                if old:
                    rows.append(old[0])
                    continue
                memory_only = kind == "batch1" or model == "hope_rc"
                extra = [*extra, *(["--steps", "0", "--warmup", "1"] if memory_only else timed)]
                cmd = [sys.executable, __file__, "--one", "--model", model, "--context", str(context),
                       "--tokens", str(args.tokens), "--threads", str(args.threads),
                       "--chunk-size", str(args.chunk_size), "--proj-chunk-size", str(args.proj_chunk_size), *extra]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
                row = json.loads(out.strip().splitlines()[-1])
                row["pass"] = kind
                rows.append(row)
                print(f"{kind:6s} {model:11s} T={context:6d} B={row['batch']:3d} cpu/step {row['step_cpu_s']:7.2f} s "
                      f"tok/cpu-s {row['tokens_per_cpu_s']:8.0f} peak+ {row['peak_added_mb']:8.1f} MB", flush=True)
                with open(args.out_dir / "context_scaling.partial.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
    return rows


def markdown(rows: list[dict]) -> str:
    train = [r for r in rows if r["pass"] == "train"]
    mem1 = {(r["model"], r["context"]): r["peak_added_mb"] for r in rows if r["pass"] == "batch1"}
    by = {(r["model"], r["context"]): r for r in train}
    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    params_of = {r["model"]: r["params"] for r in rows}
    contexts = sorted({r["context"] for r in train})
    lines = ["| model | params | " + " | ".join(f"{c // 1024}K" if c >= 1024 else str(c) for c in contexts) + " |",
             "|---|---:|" + "---:|" * len(contexts)]
    fmt_k = lambda x: f"{x / 1000:.2f}K" if x < 10000 else f"{x / 1000:.1f}K"
    sections = [("tokens per CPU-second", lambda r: fmt_k(r["tokens_per_cpu_s"])),
                ("tokens/s (wall)", lambda r: fmt_k(r["tokens_per_s"])),
                ("peak memory added per step (MB)", lambda r: f"{r['peak_added_mb']:.0f}")]
    timed_models = [m for m in models if m != "hope_rc"]
    for title, fn in sections:
        lines.append(f"| **{title}** | | " + " | ".join("" for _ in contexts) + " |")
        for m in (models if title.startswith("peak") else timed_models):
            lines.append(f"| {LABELS[m]} | {params_of[m]:,} | " + " | ".join(fn(by[(m, c)]) if (m, c) in by else "-"
                                                                        for c in contexts) + " |")
    if mem1:
        lines.append("| **peak memory added, batch 1 (MB)** | | " + " | ".join("" for _ in contexts) + " |")
        for m in models:
            lines.append(f"| {LABELS[m]} | | " + " | ".join(f"{mem1[(m, c)]:.0f}" if (m, c) in mem1 else "-"
                                                            for c in contexts) + " |")
    if "transformer" in models:
        for m in [m for m in timed_models if m != "transformer"]:
            ratio = [by[(m, c)]["tokens_per_cpu_s"] / by[("transformer", c)]["tokens_per_cpu_s"] for c in contexts]
            cells = " | ".join(f"**{x:.2f}**" for x in ratio)
            lines.append(f"| **{LABELS[m]} / Transformer++ (CPU-s)** | | " + cells + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for m in MODELS:
        for kind, ax, key, style in (("train", ax1, "tokens_per_cpu_s", "-o"), ("train", ax2, "peak_added_mb", "-o"),
                                     ("batch1", ax2, "peak_added_mb", "--x")):
            pts = sorted((r["context"], r[key]) for r in rows if r["model"] == m and r["pass"] == kind)
            if pts and not (m == "hope_rc" and ax is ax1):
                label = LABELS[m] + (" (batch 1)" if kind == "batch1" else "")
                ax.plot(*zip(*pts), style, label=label, color=COLORS[m])
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.grid(alpha=0.3)
    ax1.set_yscale("log")
    ax1.set_ylabel("training tokens per CPU-second")
    ax1.set_title("Speed, 16K tokens per step, 1 thread")
    ax2.set_yscale("log")
    ax2.set_ylabel("peak memory added by a step (MB)")
    ax2.set_title("Memory")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="512,1024,2048,4096,8192,16384")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--tokens", type=int, default=16384, help="tokens per step (batch = tokens / context)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per (model, context)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--proj-chunk-size", type=int, default=64)
    p.add_argument("--no-mem-batch1", dest="mem_batch1", action="store_false",
                   help="skip the batch-1 memory pass")
    p.add_argument("--out-dir", type=Path, default=ROOT / "docs")
    p.add_argument("--recompute-train", action="store_true",
                   help="also measure HOPE with recompute at the fixed tokens per step (else batch 1 only)")
    p.add_argument("--resume", action="store_true", help="reuse the rows of an interrupted sweep (partial jsonl)")
    # one (model, context) in a subprocess
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", choices=MODELS)
    p.add_argument("--context", type=int)
    p.add_argument("--batch", type=int, default=0)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args)))
        return
    cfgs = matched_configs(args.chunk_size, args.proj_chunk_size)
    for name, cfg in cfgs.items():
        print(f"{LABELS[name]}: {count(cfg):,} parameters, CMS {[(lvl.width, lvl.period) for lvl in cfg.cms]}")
    t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows = sweep(args)
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    (args.out_dir / "context_scaling.json").write_text(json.dumps(rows, indent=1))
    table = markdown(rows)
    (args.out_dir / "context_scaling.md").write_text(table + "\n")
    plot(rows, args.out_dir / "context_scaling.png")
    print(table)
    cpu = c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime
    print(f"sweep: {time.perf_counter() - t0:.0f} s wall, {cpu:.0f} CPU s (all subprocesses)")


if __name__ == "__main__":
    main()
