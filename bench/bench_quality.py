"""Quality at equal parameters and tokens: HOPE vs Titans vs Transformer++, trained and evaluated here.

    python bench/bench_quality.py                        # sweep, main runs, evals, report (2m size)
    python bench/bench_quality.py --stages main report --seeds 0 1 2 --jobs 2
    python bench/bench_quality.py --stages ablate report --ablations hope-p1 hope-chunk16

Stages (each skips the runs already recorded in RUN_ROOT/results.jsonl, so an interrupted
benchmark resumes where it stopped):

- sweep: every model at each --lrs for --sweep-steps steps (seed 0, the schedule shortened to
  that horizon); each model's main runs use the learning rate with the lowest final validation loss,
  so the baselines get the same tuning as HOPE.
- main: every model at each seed for the config's steps, then `tools.evaluate` on the held-out
  documents (the run's data.valid_fraction split): perplexity at the training context, long-document
  loss past it with the state carried, passkey and MQAR.
- ablate: HOPE variants (ABLATIONS) at seed 0 with HOPE's chosen learning rate, evaluated the same way.
- report: docs/QUALITY.md (the part between its results markers; text around it is kept) and PNG
  plots under docs/quality/.

Each run is a real `pretrain.py` process (configs/quality/MODEL_SIZE.yaml), one torch thread each
(--threads), --jobs at once; wall and CPU seconds are those of the training process.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODELS = ("hope", "titans", "transformer")
LABELS = {"hope": "HOPE", "titans": "Titans", "transformer": "Transformer++"}
COLORS = {"hope": "C0", "titans": "C2", "transformer": "C3"}
# HOPE variants for the ablation stage: name -> (what it tests, overrides of hope_SIZE.yaml)
RECALL_FIX = ["--model.memory_depth=1", "--model.memory_inputs=per_memory_conv", "--model.rates_from=input"]
CARRY_G16 = ["--training.carry_state=true", "--data.lane_groups=16"]
LANES_G16 = ["--data.order=lanes", "--data.lane_groups=16"]
FIX_RETAIN = RECALL_FIX + ["--model.retain_init=true"]
ABLATIONS = {
    "hope-default": ("none: the baseline at the ablations' horizon", []),
    "hope-p1": ("CMS clocks off: all four levels of period 1",
                ["--model.cms=[{width: 128, period: 1}, {width: 128, period: 1}, {width: 128, period: 1}, "
                 "{width: 128, period: 1}]"]),
    "hope-chunk16": ("memory chunk 16 instead of 64 (finer in-context updates)", ["--model.chunk_size=16"]),
    "hope-eta0.1": ("inner learning rate capped at 0.1 instead of 1.0", ["--model.eta_max=0.1"]),
    "hope-no-selfgen": ("values from a projection, not self-generated", ["--model.selfgen_values=false"]),
    "hope-grad-vhat": ("outer gradients through the self-generated values", ["--model.stopgrad_vhat=false"]),
    "hope-momentum": ("momentum in the memory update (as Titans)", ["--model.momentum=true"]),
    "hope-w1std": ("memories' initial W1 std 1/sqrt(d_m) = 0.18 instead of 0.02, so M_k(a) and M_v(a) differ "
                   "from the start", ["--model.memory_w1_std=0.177"]),
    "hope-w1std0.5": ("memories' initial W1 std 0.5: M_k(a) and M_v(a) far apart", ["--model.memory_w1_std=0.5"]),
    "hope-alpha0.999": ("initial retention 0.999 instead of 0.99 (horizon ~1000 tokens, not ~100)",
                        ["--model.alpha_init=0.999"]),
    "hope-icms": ("in-context CMS (docs/cms_in_context.md): levels 0 and 1 (periods 1, 4) also learn in context "
                  "every 32 and 128 tokens", ["--model.cms_in_context=true",
                                               "--model.cms=[{width: 128, period: 1, chunk_size: 32}, "
                                               "{width: 128, period: 4, chunk_size: 128}, {width: 128, period: 16}, "
                                               "{width: 128, period: 64}]"]),
    "hope-m3": ("optimizer M3 (Nested Learning Alg. 1, docs/optim.md) instead of AdamW, at AdamW's lr",
                ["--optim.name=m3"]),
    "hope-m3-lr1e-2": ("optimizer M3 at lr 1e-2 (Newton-Schulz updates take larger rates than AdamW's)",
                       ["--optim.name=m3", "--optim.lr=0.01"]),
    "hope-nowrite": ("no in-context writes: eta = 0 and retention toward M_0, so every memory stays at its learned "
                     "M_0 (what the memory earns, issue 24)", ["--model.eta_max=0", "--model.retain_init=true"]),
    "hope-permem": ("one input per projection memory (k, v, eta, alpha), docs/model.md 2.10",
                    ["--model.memory_inputs=per_memory"]),
    "hope-inrates": ("eta and alpha read out of x instead of M_eta, M_alpha (model.rates_from), docs/model.md 2.10",
                     ["--model.rates_from=input"]),
    "hope-d1-permconv-inrates": ("the recall fix (docs/RECALL.md): depth-1 memories, a conv per projection memory, "
                                 "eta and alpha read out of x", RECALL_FIX),
    "hope-retain": ("retention toward M_0 instead of toward 0, docs/model.md 2.10", ["--model.retain_init=true"]),
    "hope-carry": ("state carried across consecutive segments of the same documents in training "
                   "(training.carry_state: data in lanes, truncated BPTT one segment deep)",
                   ["--training.carry_state=true"]),
    "hope-fix-carry-g16": ("the recall fix with its state carried in training, lanes in 16 groups",
                           RECALL_FIX + CARRY_G16),
    "hope-fix-lanes-g16": ("the recall fix in the same 16 lane groups, every row starting fresh (the control "
                           "of hope-fix-carry-g16)", RECALL_FIX + LANES_G16),
    "hope-fix-retain": ("the recall fix with retention toward M_0 (an anchor for the fast weights' scale)",
                        FIX_RETAIN),
    "hope-fix-retain-nowrite": ("the recall fix with retention toward M_0 and no in-context writes (eta = 0: every "
                                "memory stays at M_0; what its writes earn, issue 24 part 4)",
                                FIX_RETAIN + ["--model.eta_max=0"]),
    "hope-fix-retain-carry-g16": ("the recall fix with retention toward M_0 (an anchor for the fast weights' scale), "
                                  "its state carried in training, 16 lane groups",
                                  FIX_RETAIN + CARRY_G16),
    "hope-fix-retain-lanes-g16": ("the recall fix with retention toward M_0 in 16 lane groups, every row starting "
                                  "fresh (the control of hope-fix-retain-carry-g16)",
                                  FIX_RETAIN + LANES_G16),
    "hope-fix-carry": ("the recall fix with its state carried in training, one lane group (the state one step old)",
                       RECALL_FIX + ["--training.carry_state=true"]),
    "hope-fix-lanes": ("the recall fix in one lane group, every row starting fresh (the control of hope-fix-carry)",
                       RECALL_FIX + ["--data.order=lanes"]),
}
BEGIN, END = "<!-- results:begin (bench/bench_quality.py writes this part) -->", "<!-- results:end -->"


def config_path(model: str, size: str) -> Path:
    return ROOT / f"configs/quality/{model}_{size}.yaml"


def load(model: str, size: str, overrides: list[str] = ()):
    from hope_dist.config import load_config

    return load_config(config_path(model, size), list(overrides))


def wait_timed(proc: subprocess.Popen) -> tuple[int, float]:
    """Exit status and CPU seconds (user + system) of the finished child."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def evaluate_cmd(ckpt: Path, out: Path, cfg, args) -> list[str]:
    seq = cfg.training.seq_len
    lengths = ",".join(str(seq * 2 ** i) for i in range(args.passkey_doublings + 1))
    return [sys.executable, "-m", "tools.evaluate", str(ckpt), "--out", str(out), "--data", cfg.data.paths[0],
            "--heldout", str(cfg.data.valid_fraction), "--tokens", str(args.eval_tokens), "--segment", str(seq),
            "--long-len", str(seq * args.long_factor), "--long-docs", str(args.long_docs),
            "--passkey-lengths", lengths, "--passkey-samples", str(args.passkey_samples),
            "--mqar-pairs", args.mqar_pairs, "--mqar-samples", str(args.mqar_samples),
            "--threads", str(args.threads), "--device", "cpu", "--no-progress"]


def run_one(job: dict, args) -> dict:
    """Train one run in its own process, evaluate its final checkpoint, return its record."""
    job = {**job, "overrides": job["overrides"] + args.extra}
    cfg = load(job["model"], args.size, job["overrides"])
    run_dir = args.run_root / job["name"]
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted attempt must not be mixed in
    cmd = [sys.executable, str(ROOT / "hope_dist/pretrain.py"), "--config", str(config_path(job["model"], args.size)),
           f"--run_dir={run_dir}", "--metrics.progress=false", "--metrics.wandb=false", "--checkpoint.interval=0",
           "--checkpoint.resume=never", *job["overrides"]]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    run_dir.mkdir(parents=True)
    t0 = time.time()
    with open(run_dir / "train.log", "w") as log:
        code, cpu_s = wait_timed(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    wall_s = time.time() - t0
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        if (run_dir / "metrics.jsonl").is_file() else []
    tokens_per_step = cfg.training.global_batch * cfg.training.seq_len
    steps = cfg.training.steps
    rec = {**{k: job[k] for k in ("name", "kind", "model", "overrides")}, "size": args.size,
           "seed": cfg.training.seed, "lr": cfg.optim.lr,  # as run: an override given last wins
           "ablation": job.get("ablation"),
           "steps": steps, "tokens": steps * tokens_per_step,
           "finished": code == 0 and (run_dir / "COMPLETE").is_file(),
           "train_wall_s": round(wall_s, 1), "train_cpu_s": round(cpu_s, 1),
           "val_curve": [[r["step"] * tokens_per_step, r["val_loss"]] for r in rows if "val_loss" in r],
           "train_loss_last20": statistics.fmean([r["loss"] for r in rows[-20:] if "loss" in r]) if rows else None,
           "memory": memory_stats(rows)}
    if not rec["finished"]:
        rec["error"] = (run_dir / "train.log").read_text().strip().splitlines()[-1:] or [f"exit {code}"]
    elif job["kind"] != "sweep":
        out = run_dir / "eval"
        t0 = time.time()
        with open(run_dir / "eval.log", "w") as log:
            code = subprocess.run(evaluate_cmd(run_dir / f"checkpoints/step-{steps}", out, cfg, args), cwd=ROOT,
                                  env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        rec["eval_wall_s"] = round(time.time() - t0, 1)
        if code == 0:
            rec["eval"] = json.loads((out / "results.json").read_text())["tasks"]
        else:
            rec["error"] = (run_dir / "eval.log").read_text().strip().splitlines()[-1:]
    print(json.dumps({k: v for k, v in rec.items() if k not in ("val_curve", "eval")}), flush=True)
    return rec


def memory_stats(rows: list[dict]) -> dict[str, float] | None:
    """The last memory-health probe (model/memory_health.py), each statistic averaged over layers:
    how much the fast weights actually learn in context (None for attention)."""
    last = next((r for r in reversed(rows) if "mem/fw_norm_max" in r), None)
    if last is None:
        return None
    out = {}
    for stat in ("inner_loss", "fw_norm_max", "alpha_mean", "eta_mean"):
        vals = [v for k, v in last.items() if k.startswith("mem/L") and k.endswith(f"/{stat}")]
        out[stat] = statistics.fmean(vals) if vals else math.nan
    return out


def read_results(path: Path) -> dict[str, dict]:
    return {r["name"]: r for r in map(json.loads, path.read_text().splitlines())} if path.is_file() else {}


def best_lrs(results: dict[str, dict], args) -> dict[str, float]:
    """Per model: the swept learning rate with the lowest final validation loss (config's if unswept)."""
    chosen = {}
    for m in args.models:
        swept = [r for r in results.values() if r["kind"] == "sweep" and r["model"] == m and r["finished"]
                 and r["val_curve"]]
        chosen[m] = min(swept, key=lambda r: r["val_curve"][-1][1])["lr"] if swept else load(m, args.size).optim.lr
    return chosen


def jobs_for(stage: str, results: dict[str, dict], args) -> list[dict]:
    lr = best_lrs(results, args)
    if stage == "sweep":
        grid = itertools.product(args.models, args.lrs)
        return [dict(name=f"sweep-{m}-lr{x:g}", kind="sweep", model=m, seed=0, lr=x,
                     overrides=[f"--optim.lr={x}", f"--training.steps={args.sweep_steps}",
                                f"--eval.every={args.sweep_steps}", "--training.seed=0"]) for m, x in grid]
    if stage == "main":
        return [dict(name=f"{m}-s{s}", kind="main", model=m, seed=s, lr=lr[m],
                     overrides=[f"--optim.lr={lr[m]}", f"--training.seed={s}"])
                for s, m in itertools.product(args.seeds, args.models)]
    if stage == "ablate":
        return [dict(name=f"ablate-{a}-s0", kind="ablate", model="hope", seed=0, lr=lr["hope"], ablation=a,
                     overrides=[f"--optim.lr={lr['hope']}", "--training.seed=0",
                                f"--training.steps={args.ablate_steps}", *ABLATIONS[a][1]])
                for a in ["hope-default", *args.ablations]]
    return []


COST = {"hope": 3, "titans": 2, "transformer": 1}  # relative CPU cost per token: costliest runs start first


DATA_STEPS = [  # the default corpus (configs/quality/*_2m.yaml): (output, command, files checked against the pins)
    ("data/quality/corpus.jsonl", ["data_prep.pinned_corpus", "--out", "data/quality/corpus.jsonl"], []),
    ("data/quality/tokenizer.json", ["data_prep.train_tokenizer", "--input", "data/quality/corpus.jsonl",
                                     "--vocab-size", "4096", "--out", "data/quality/tokenizer.json"],
     ["tokenizer.json"]),
    ("data/quality/quality.idx", ["data_prep.tokenize", "--input", "data/quality/corpus.jsonl", "--tokenizer",
                                  "data/quality/tokenizer.json", "--output-prefix", "data/quality/quality",
                                  "--workers", "2"], ["quality.bin", "quality.idx"]),
]


def ensure_data(args) -> None:
    """Build the default quality corpus if a run needs it and it is missing (other data: build it yourself).
    The corpus (data_prep/pinned_corpus.py checks it), its tokenizer and its tokens are refused unless they
    are the ones pinned in data_prep/quality_corpus.json (docs/QUALITY.md)."""
    from data_prep.pinned_corpus import check_built

    if load("hope", args.size, args.extra).data.paths != ["data/quality/quality"]:
        return
    for output, cmd, checked in DATA_STEPS:
        if not (ROOT / output).is_file():
            print(f"building {output}: python -m {' '.join(cmd)}", flush=True)
            subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, check=True)
            for name in checked:
                check_built(ROOT / "data/quality" / name)


def run_stages(stages: list[str], args) -> None:
    """Run the jobs of `stages` in one pool (they must not depend on each other), costliest first."""
    path = args.run_root / "results.jsonl"
    results = read_results(path)
    todo = [j for st in stages for j in jobs_for(st, results, args) if j["name"] not in results]
    todo.sort(key=lambda j: -COST[j["model"]] * load(j["model"], args.size, j["overrides"] + args.extra).training.steps)
    print(f"{'+'.join(stages)}: {len(todo)} runs to do", flush=True)
    if not todo:
        return
    ensure_data(args)
    args.run_root.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool, open(path, "a") as f:
        for fut in as_completed([pool.submit(run_one, j, args) for j in todo]):
            f.write(json.dumps(fut.result()) + "\n")
            f.flush()


# ---------------------------------------------------------------------------------------------- report

def _mean_spread(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.fmean(values), fmt)} ± {format((max(values) - min(values)) / 2, fmt)}"


def _past_context(ev: dict, mode: str) -> float | None:
    """Mean loss over the long-context buckets after the first segment (positions past the context)."""
    lc = ev.get("long_context")
    if not lc or mode not in lc["modes"]:
        return None
    rows = [b[mode] for b in lc["buckets"] if b["start"] >= lc["segment"]]
    return statistics.fmean(rows) if rows else None


def _passkey(ev: dict, beyond: bool, seq: int) -> float | None:
    rows = [r["accuracy"] for r in ev.get("passkey", {}).get("by_length", []) if (r["length"] > seq) == beyond]
    return statistics.fmean(rows) if rows else None


def _mqar(ev: dict, beyond: bool) -> float | None:
    rows = [r["accuracy"] for r in ev.get("mqar", {}).get("by_pairs", []) if r["beyond_train_context"] == beyond]
    return statistics.fmean(rows) if rows else None


def summarize(runs: list[dict], seq: int) -> dict:
    ev = [r["eval"] for r in runs if "eval" in r]
    col = lambda f: [x for x in map(f, ev) if x is not None]
    return {
        "ppl": col(lambda e: e["perplexity"]["perplexity"] if "perplexity" in e else None),
        "loss": col(lambda e: e["perplexity"]["loss"] if "perplexity" in e else None),
        "carry": col(lambda e: _past_context(e, "carry")), "reset": col(lambda e: _past_context(e, "reset")),
        "pk_in": col(lambda e: _passkey(e, False, seq)), "pk_out": col(lambda e: _passkey(e, True, seq)),
        "mq_in": col(lambda e: _mqar(e, False)), "mq_out": col(lambda e: _mqar(e, True)),
        "wall": [r["train_wall_s"] for r in runs], "cpu": [r["train_cpu_s"] for r in runs],
        "inner": [r["memory"]["inner_loss"] for r in runs if r.get("memory")],
        "fw": [r["memory"]["fw_norm_max"] for r in runs if r.get("memory")],
    }


def main_table(results: dict[str, dict], args, params: dict[str, int], seq: int) -> tuple[str, dict]:
    lines = ["| model | params | lr | seeds | held-out ppl | held-out loss | loss past context, carried | "
             "loss past context, reset | passkey ≤ ctx | passkey > ctx | MQAR ≤ ctx | MQAR > ctx | memory inner loss | "
             "fast-weight norm | tokens | train wall min | train CPU min |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    sums = {}
    for m in args.models:
        runs = sorted((r for r in results.values() if r["kind"] == "main" and r["model"] == m and r["finished"]),
                      key=lambda r: r["seed"])
        if not runs:
            continue
        s = sums[m] = summarize(runs, seq)
        lines.append(
            f"| {LABELS[m]} | {params[m]:,} | {runs[0]['lr']:g} | {len(runs)} | {_mean_spread(s['ppl'], '.2f')} | "
            f"{_mean_spread(s['loss'], '.4f')} | {_mean_spread(s['carry'], '.4f')} | "
            f"{_mean_spread(s['reset'], '.4f')} | {_mean_spread(s['pk_in'], '.2f')} | "
            f"{_mean_spread(s['pk_out'], '.2f')} | {_mean_spread(s['mq_in'], '.3f')} | "
            f"{_mean_spread(s['mq_out'], '.3f')} | {_mean_spread(s['inner'], '.3g')} | "
            f"{_mean_spread(s['fw'], '.3g')} | "
            f"{runs[0]['tokens'] / 1e6:.2f}M | "
            f"{_mean_spread([w / 60 for w in s['wall']], '.1f')} | {_mean_spread([c / 60 for c in s['cpu']], '.1f')} |")
    return "\n".join(lines), sums


def targets(sums: dict) -> str:
    if not {"hope", "transformer"} <= set(sums):
        return "(needs HOPE and Transformer++)"
    mean = lambda m, k: statistics.fmean(sums[m][k]) if m in sums and sums[m][k] else math.nan
    h, t, x = (mean(m, "ppl") for m in ("hope", "titans", "transformer"))
    rows = [("HOPE within 2% of Transformer++ held-out perplexity", f"{(h / x - 1) * 100:+.1f}%", h <= 1.02 * x),
            ("HOPE better than Titans on held-out perplexity",
             f"{h:.2f} vs {t:.2f} ({(h / t - 1) * 100:+.1f}%)" if t == t else "(no finished Titans run)", h < t)]
    hc, xr = mean("hope", "carry"), mean("transformer", "reset")
    rows.append(("HOPE (carried) better than Transformer++ past the training context",
                 f"loss {hc:.4f} vs {xr:.4f}", hc < xr))
    for key, what in (("pk_out", "passkey"), ("mq_out", "MQAR")):
        a, b = mean("hope", key), mean("transformer", key)
        rows.append((f"HOPE better than Transformer++ on {what} beyond the training context",
                     f"{a:.3f} vs {b:.3f}", a > b))
    return "\n".join(["| target | measured | met |", "|---|---|---|"] +
                     [f"| {t} | {v} | {'yes' if ok else '**no**'} |" for t, v, ok in rows])


def sweep_table(results: dict[str, dict], args) -> str:
    runs = [r for r in results.values() if r["kind"] == "sweep"]
    if not runs:
        return "(no sweep runs)"
    lrs = sorted({r["lr"] for r in runs})
    lines = ["| model | " + " | ".join(f"lr {x:g}" for x in lrs) + " |", "|---|" + "---:|" * len(lrs)]
    for m in args.models:
        cells = []
        for x in lrs:
            r = next((r for r in runs if r["model"] == m and r["lr"] == x), None)
            cells.append("-" if r is None else (f"{r['val_curve'][-1][1]:.4f}" if r["finished"] and r["val_curve"]
                                                else "failed"))
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_table(results: dict[str, dict], seq: int) -> str:
    runs = sorted((r for r in results.values() if r["kind"] == "ablate"),
                  key=lambda r: (r["ablation"] != "hope-default", r["name"]))
    if not runs:
        return "(no ablation runs)"
    base = summarize([runs[0]], seq)["ppl"] if runs[0]["ablation"] == "hope-default" else []
    lines = [f"{runs[0]['tokens'] / 1e6:.2f}M tokens each.", "",
             "| variant | what it changes | held-out ppl | vs hope-default | loss past context, carried | "
             "loss past context, reset | memory inner loss | fast-weight norm | passkey > ctx | train CPU min |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        s = summarize([r], seq)
        rel = f"{(s['ppl'][0] / base[0] - 1) * 100:+.1f}%" if s["ppl"] and base else "-"
        lines.append(f"| {r['ablation']} | {ABLATIONS[r['ablation']][0]} | {_mean_spread(s['ppl'], '.2f')} | {rel} | "
                     f"{_mean_spread(s['carry'], '.4f')} | {_mean_spread(s['reset'], '.4f')} | "
                     f"{_mean_spread(s['inner'], '.3g')} | {_mean_spread(s['fw'], '.3g')} | "
                     f"{_mean_spread(s['pk_out'], '.2f')} | {r['train_cpu_s'] / 60:.1f} |")
    return "\n".join(lines)


def plots(results: dict[str, dict], args, out_dir: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    main = [r for r in results.values() if r["kind"] == "main" and r["finished"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in sorted(main, key=lambda r: (r["model"], r["seed"])):
        xs, ys = zip(*r["val_curve"]) if r["val_curve"] else ((), ())
        ax.plot([x / 1e6 for x in xs], ys, color=COLORS[r["model"]], alpha=0.8,
                label=LABELS[r["model"]] if r["seed"] == min(q["seed"] for q in main if q["model"] == r["model"])
                else None)
    for r in (r for r in results.values() if r["kind"] == "main" and not r["finished"]):
        pts = [(x / 1e6, y) for x, y in r["val_curve"] if y == y]  # a diverged run: dotted, up to its last finite loss
        if pts:
            ax.plot(*zip(*pts), ":", color=COLORS[r["model"]], alpha=0.8,
                    label=f"{LABELS[r['model']]} s{r['seed']} lr {r['lr']:g} (diverged)")
            ax.plot(*pts[-1], "x", color=COLORS[r["model"]])
    ax.set(xlabel="training tokens (M)", ylabel="held-out loss (nats/token)", title="Validation loss vs tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "val_loss.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for m in args.models:
        runs = [r for r in main if r["model"] == m and "eval" in r]
        if not runs:
            continue
        ev = runs[0]["eval"]
        lc = ev.get("long_context")
        if lc:
            for mode, style in (("carry", "-"), ("reset", ":")):
                if mode in lc["modes"]:
                    ys = [statistics.fmean(b[mode] for b in (r["eval"]["long_context"]["buckets"][i] for r in runs))
                          for i in range(len(lc["buckets"]))]
                    axes[0].plot([b["end"] for b in lc["buckets"]], ys, style, color=COLORS[m], marker="o",
                                 label=f"{LABELS[m]} {mode}")
        pk = ev.get("passkey")
        if pk:
            xs = [r["length"] for r in pk["by_length"]]
            ys = [statistics.fmean(q["eval"]["passkey"]["by_length"][i]["accuracy"] for q in runs)
                  for i in range(len(xs))]
            axes[1].plot(xs, ys, color=COLORS[m], marker="o", label=LABELS[m])
        mq = ev.get("mqar")
        if mq:
            xs = [r["seq_len"] for r in mq["by_pairs"]]
            ys = [statistics.fmean(q["eval"]["mqar"]["by_pairs"][i]["accuracy"] for q in runs) for i in range(len(xs))]
            axes[2].plot(xs, ys, color=COLORS[m], marker="o", label=LABELS[m])
    seq = load("hope", args.size).training.seq_len
    for ax, title, ylabel in ((axes[0], "Long documents (held-out)", "loss per position bucket"),
                              (axes[1], "Passkey (10 candidates)", "accuracy"),
                              (axes[2], "MQAR", "accuracy")):
        ax.axvline(seq, color="grey", ls="--", lw=1)
        ax.set(title=title, xlabel="position / sequence length (tokens)", ylabel=ylabel, xscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "evals.png", dpi=120)
    plt.close(fig)
    return ["val_loss.png", "evals.png"]


def report(args) -> None:
    import torch

    from hope_dist.model import HopeModel, count_parameters

    results = read_results(args.run_root / "results.jsonl")
    params = {}
    for m in args.models:
        with torch.device("meta"):
            params[m] = count_parameters(HopeModel(load(m, args.size).model))["total"]
    cfg = load("hope", args.size)
    seq = cfg.training.seq_len
    table, sums = main_table(results, args, params, seq)
    pngs = plots(results, args, args.out.parent / "quality")
    body = "\n\n".join([
        BEGIN,
        f"Size `{args.size}` (configs/quality/*_{args.size}.yaml): context {seq}, {cfg.training.global_batch} "
        f"sequences per step, {cfg.training.steps} steps; held-out documents: data.valid_fraction "
        f"{cfg.data.valid_fraction}. Regenerate with `python bench/bench_quality.py --size {args.size}`.",
        "### Learning-rate sweep (final validation loss, seed 0, short horizon)", sweep_table(results, args),
        "### Main runs (mean ± half the range over seeds)", table,
        "### Targets", targets(sums),
        "### HOPE ablations (seed 0)", ablation_table(results, seq),
        "\n".join(f"![{p}](quality/{p})" for p in pngs),
        END])
    text = (args.out.read_text() if args.out.is_file()
            else f"# Quality: HOPE vs Titans vs Transformer++\n\n{BEGIN}\n{END}\n")
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    args.out.write_text(head + body + tail)
    print(f"wrote {args.out}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="2m", help="configs/quality/MODEL_SIZE.yaml (2m, 125m, 350m, 760m)")
    p.add_argument("--stages", nargs="+", default=["sweep", "main", "report"],
                   choices=["sweep", "main", "ablate", "report"])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 2e-3, 4e-3])
    p.add_argument("--sweep-steps", type=int, default=150)
    p.add_argument("--ablations", nargs="+", choices=list(ABLATIONS)[1:],
                   default=["hope-p1", "hope-chunk16", "hope-no-selfgen", "hope-momentum"])
    p.add_argument("--ablate-steps", type=int, default=250, help="ablation horizon (the baseline runs it too)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--eval-tokens", type=int, default=200_000, help="held-out tokens for perplexity")
    p.add_argument("--long-factor", type=int, default=8, help="long-context length in training contexts")
    p.add_argument("--long-docs", type=int, default=16)
    p.add_argument("--passkey-doublings", type=int, default=3, help="passkey lengths: ctx, 2 ctx, .. 2^N ctx")
    p.add_argument("--passkey-samples", type=int, default=2, help="samples per (length, depth)")
    p.add_argument("--mqar-pairs", default="4,8,16,32,64,128,256", help="MQAR key-value pairs (4 tokens each)")
    p.add_argument("--mqar-samples", type=int, default=32)
    p.add_argument("--run-root", type=Path, default=ROOT / "runs/quality")
    p.add_argument("--out", type=Path, default=ROOT / "docs/QUALITY.md")
    args, args.extra = p.parse_known_args(argv)  # the rest: --key=value overrides for every run
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if "sweep" in args.stages:  # the others use its chosen learning rates
        run_stages(["sweep"], args)
    run_stages([s for s in args.stages if s in ("main", "ablate")], args)
    if "report" in args.stages:
        report(args)


if __name__ == "__main__":
    main()
