"""Trained multi-query associative recall (MQAR, Zoology's protocol): which of this stack's mixers learn
to recall in context, at what recurrent state size.

    python bench/bench_recall.py --jobs 2                                # the grid, then the report
    python bench/bench_recall.py --settings 256:16 --d-models 128 --models hope delta --lrs 1e-3 3e-3
    python bench/bench_recall.py --stages report                         # docs/RECALL.md from the results
    python bench/bench_recall.py --smoke --out /tmp/recall               # one tiny setting (the test suite)

Every model is a 2-layer network of this stack at the same width (hope_dist.model.build_model), with
one period-1 CMS level of width 2 d as its MLP, so the mixers alone differ: attention (Transformer++),
titans, hope (selfmod) and delta (a depth-1 titans memory without momentum: the DeltaNet analogue),
plus the HOPE variants of VARIANTS. Each run trains on fresh MQAR batches (hope_dist/synthetic/mqar.py)
with AdamW (weight decay 0.1, linear warmup then cosine decay) and reports the accuracy on 1,000
fresh test examples; it stops early once a periodic test on 256 of them reaches 0.995.
Per model and setting the best learning rate of the grid counts; when it sits at an edge of the
grid, the grid is extended by one factor-of-3 step beyond that edge (twice at most).
Results: OUT/results.jsonl, one line per run, appended as runs finish, so an interrupted grid resumes.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # name -> (label, ModelConfig overrides)
    "attention": ("Transformer++", {"mixer": "attention"}),
    "titans": ("Titans", {"mixer": "titans"}),
    "hope": ("HOPE", {"mixer": "selfmod"}),
    "delta": ("delta rule (depth 1)", {"mixer": "titans", "memory_depth": 1, "momentum": False}),
}
# building blocks of the issue-24 ablation's variants (docs/RECALL.md "Why HOPE missed")
D1_CONV = {"mixer": "selfmod", "memory_depth": 1, "memory_inputs": "per_memory_conv"}
D1_PROJ = {"mixer": "selfmod", "memory_depth": 1, "memory_inputs": "per_memory"}
STATIC, TARGETS_V, IN_RATES = {"proj_rate": 0.0}, {"selfgen_values": False}, {"rates_from": "input"}
W2_GD = {"w2_delta": False}  # depth 2: W2 by gradient descent, its delta factor erased the key's hidden features
VARIANTS = {  # HOPE variants (docs/RECALL.md "Why HOPE missed"): name -> (label, overrides)
    "hope-permem": ("HOPE, one input per projection memory", {"mixer": "selfmod", "memory_inputs": "per_memory"}),
    "hope-permconv": ("HOPE, one projection and a conv per projection memory",
                      {"mixer": "selfmod", "memory_inputs": "per_memory_conv"}),
    "hope-d1": ("HOPE with depth-1 (linear) memories", {"mixer": "selfmod", "memory_depth": 1}),
    "hope-d1-permconv": ("HOPE, depth 1, a conv per projection memory", D1_CONV),
    "hope-d1-permconv-frozen": ("HOPE, depth 1, a conv per projection memory, static projection memories",
                                {**D1_CONV, **STATIC}),
    "hope-d1-permconv-v": ("HOPE, depth 1, a conv per projection memory, targets v", {**D1_CONV, **TARGETS_V}),
    "hope-d1-permconv-frozen-v": ("HOPE, depth 1, a conv per projection memory, static projection memories, "
                                  "targets v", {**D1_CONV, **STATIC, **TARGETS_V}),
    "hope-d1-permconv-ratenorm": ("HOPE, depth 1, a conv per projection memory, RMS-normalised rate read-outs",
                                  {**D1_CONV, "rate_norm": True}),
    "hope-d1-permconv-inrates": ("HOPE, depth 1, a conv per projection memory, eta and alpha read out of x",
                                 {**D1_CONV, **IN_RATES}),
    "hope-d1-permconv-inrates-retain": ("HOPE, depth 1, a conv per projection memory, eta and alpha read out of x, "
                                        "retention toward M_0", {**D1_CONV, **IN_RATES, "retain_init": True}),
    "hope-d1-permconv-frozen-inrates": ("HOPE, depth 1, a conv per projection memory, static projection memories, "
                                        "eta and alpha read out of x", {**D1_CONV, **STATIC, **IN_RATES}),
    "hope-d1-permem-frozen-v": ("HOPE, depth 1, one input per projection memory, static projection memories, "
                                "targets v", {**D1_PROJ, **STATIC, **TARGETS_V}),
    "hope-d1-permem-frozen-v-ratenorm": ("HOPE, depth 1, one input per projection memory, static projection "
                                         "memories, targets v, RMS-normalised rate read-outs",
                                         {**D1_PROJ, **STATIC, **TARGETS_V, "rate_norm": True}),
    "hope-d1-permem-frozen-v-inrates": ("HOPE, depth 1, one input per projection memory, static projection "
                                        "memories, targets v, eta and alpha read out of x",
                                        {**D1_PROJ, **STATIC, **TARGETS_V, **IN_RATES}),
    "hope-inrates": ("HOPE, eta and alpha read out of x", {"mixer": "selfmod", **IN_RATES}),
    "hope-permconv-inrates": ("HOPE, a conv per projection memory, eta and alpha read out of x",
                              {"mixer": "selfmod", "memory_inputs": "per_memory_conv", **IN_RATES}),
    "hope-permconv-inrates-w2gd": ("HOPE, a conv per projection memory, eta and alpha read out of x, W2 without the "
                                   "delta factor", {"mixer": "selfmod", "memory_inputs": "per_memory_conv",
                                                    **IN_RATES, **W2_GD}),
    "titans-w2gd": ("Titans, W2 without the delta factor", {"mixer": "titans", **W2_GD}),
    "titans-w2std": ("Titans, initial W2 std 3/sqrt(d_h)", {"mixer": "titans", "memory_w2_std": 0.53}),
    "hope-permconv-inrates-w2std": ("HOPE, a conv per projection memory, eta and alpha read out of x, initial W2 "
                                    "std 3/sqrt(d_h)", {"mixer": "selfmod", "memory_inputs": "per_memory_conv",
                                                        **IN_RATES, "memory_w2_std": 0.53}),
    "hope-bound": ("HOPE, curvature-bounded inner step", {"mixer": "selfmod", "bound_step": True}),
    "hope-retain": ("HOPE, retention toward M_0", {"mixer": "selfmod", "retain_init": True}),
    "hope-permem-retain": ("HOPE, per-memory inputs + retention toward M_0",
                           {"mixer": "selfmod", "memory_inputs": "per_memory", "retain_init": True}),
    "hope-w1std": ("HOPE, W1 init std 0.5 (memories far from identity)", {"mixer": "selfmod", "memory_w1_std": 0.5}),
    "hope-v": ("HOPE, targets v (not self-generated)", {"mixer": "selfmod", "selfgen_values": False}),
    "hope-alpha": ("HOPE, initial retention 0.999", {"mixer": "selfmod", "alpha_init": 0.999}),
    "hope-nowrite": ("HOPE, no writes (memories stay at M_0)",
                     {"mixer": "selfmod", "eta_max": 0.0, "retain_init": True}),
}
SETTINGS = ((64, 4), (128, 8), (256, 16), (512, 64))


def model_config(model: str, d: int, args, setting):
    from hope_dist.config import CMSLevel, ModelConfig

    over = {**(MODELS.get(model) or VARIANTS[model])[1]}
    return ModelConfig(vocab_size=setting.vocab_size, d_model=d, n_layers=2, n_heads=max(1, d // args.head_dim),
                       chunk_size=args.chunk_size, proj_chunk_size=args.chunk_size,
                       cms=[CMSLevel(2 * d, 1)], **over)


def state_bytes(model, cfg, seq_len: int) -> int:
    """Recurrent state of one layer for one sequence, in bytes (float32): the fast weights (and momenta)
    of a memory mixer; for attention its key-value cache at the end of the sequence."""
    import torch

    if cfg.mixer == "attention":
        return 2 * seq_len * cfg.d_model * 4
    with torch.no_grad():
        _, state = model(torch.zeros(1, seq_len, dtype=torch.long), return_state=True)
    mem = state[0]["memory"]
    return sum(t.numel() * 4 for t in mem if t is not None)


def answer_logits(model, x, mask):
    """HopeModel.forward with the output head applied only where an answer is scored (a few per row)."""
    h = model.tok_embeddings(x)
    for layer in model.layers.values():
        h, _ = layer(h)
    return model.output(model.norm(h)[mask])


def evaluate(model, inputs, labels, batch: int) -> float:
    import torch

    hits = total = 0
    with torch.no_grad():
        for i in range(0, len(inputs), batch):
            mask = labels[i:i + batch] != -100
            logits = answer_logits(model, inputs[i:i + batch], mask)
            hits += (logits.argmax(-1) == labels[i:i + batch][mask]).sum().item()
            total += mask.sum().item()
    return hits / total


def probe_memories(model, x) -> dict | None:
    """The memory-health probes (hope_dist/model/memory_health.py) of every layer on one test row:
    inner loss, eta, alpha, fast-weight norm and the k-v cosine, as the trainer logs them."""
    import torch

    mixers = [layer.mixer for layer in model.layers.values() if hasattr(layer.mixer, "probe_health")]
    if not mixers:
        return None
    for m in mixers:
        m.probe_health = True
    with torch.no_grad():
        model(x[:1])
    return {f"layer{i}": {k: round(v, 4) for k, v in m.health.items()} for i, m in enumerate(mixers)}


def lr_at(step: int, steps: int, lr: float) -> float:
    warm = max(1, steps // 10)
    if step < warm:
        return lr * (step + 1) / warm
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def train_run(job: dict) -> dict:
    """One model at one setting, width and learning rate; runs in a worker process."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from hope_dist.model.model import build_model
    from hope_dist.synthetic.mqar import MQARSetting, mqar_batch

    torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])
    args = argparse.Namespace(**job["args"])
    setting = MQARSetting(job["seq_len"], job["pairs"], args.vocab or 2 * job["seq_len"])
    cfg = model_config(job["model"], job["d"], args, setting)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=job["lr"], weight_decay=0.1, betas=(0.9, 0.98))
    rng = np.random.default_rng([job["seed"], 1])
    test_x, test_y = mqar_batch(setting, args.test_examples, np.random.default_rng([job["seed"], 2]))
    t0, acc, loss_v, step = time.process_time(), 0.0, float("nan"), 0
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, job["lr"])
        x, y = mqar_batch(setting, args.batch, rng)
        mask = y != -100
        loss = F.cross_entropy(answer_logits(model, x, mask), y[mask])
        if not torch.isfinite(loss):
            return {**job, "acc": 0.0, "diverged_at": step, "steps_run": step, "final_loss": None,
                    "cpu_s": round(time.process_time() - t0, 1), "health": None,
                    "state_bytes": state_bytes(model, cfg, setting.seq_len)}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_v = loss.item()
        if (step + 1) % args.test_every == 0:
            acc = evaluate(model, test_x[:256], test_y[:256], args.batch)
            print(f"  {job['model']} T={job['seq_len']} d={job['d']} lr={job['lr']:.0e} step {step + 1}: "
                  f"loss {loss_v:.3f} test acc {acc:.3f}", flush=True)
            if acc >= 0.995:
                break
    acc = evaluate(model, test_x, test_y, args.batch)
    return {**job, "acc": acc, "final_loss": loss_v, "steps_run": step + 1, "diverged_at": None,
            "cpu_s": round(time.process_time() - t0, 1), "state_bytes": state_bytes(model, cfg, setting.seq_len),
            "params": sum(p.numel() for p in model.parameters()), "health": probe_memories(model, test_x)}


def key(r: dict) -> tuple:
    return (r["model"], r["seq_len"], r["pairs"], r["d"], float(r["lr"]), r["seed"], r["args"]["steps"])


def load_results(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def run_jobs(jobs: list[dict], out: Path, n_workers: int) -> list[dict]:
    """Run the jobs not yet in OUT/results.jsonl; append each result as it arrives."""
    done = {key(r) for r in load_results(out)}
    todo = [j for j in jobs if key(j) not in done]
    out.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(n_workers, mp_context=get_context("spawn")) as pool, \
            (out / "results.jsonl").open("a") as f:
        futures = {pool.submit(train_run, j): j for j in todo}
        for fut in as_completed(futures):
            r = fut.result()
            f.write(json.dumps(r) + "\n")
            f.flush()
            print(f"{r['model']:>10} T={r['seq_len']:<4} N={r['pairs']:<3} d={r['d']:<4} lr={r['lr']:.0e} "
                  f"acc={r['acc']:.3f} steps={r['steps_run']} cpu={r['cpu_s']}s", flush=True)
    return load_results(out)


def best_runs(results: list[dict]) -> dict[tuple, dict]:
    """(model, seq_len, pairs, d) -> the run with the best accuracy (ties: lower final loss)."""
    best: dict[tuple, dict] = {}
    for r in results:
        k = (r["model"], r["seq_len"], r["pairs"], r["d"])
        score = (r["acc"], -(r.get("final_loss") or math.inf))
        if k not in best or score > (best[k]["acc"], -(best[k].get("final_loss") or math.inf)):
            best[k] = r
    return best


def extension_jobs(results: list[dict], base: list[dict]) -> list[dict]:
    """One more learning rate, 3x beyond the edge, where the best rate of a group sits at an edge."""
    best = best_runs(results)
    extra = []
    for j in base:
        k = (j["model"], j["seq_len"], j["pairs"], j["d"])
        lrs = sorted({r["lr"] for r in results if (r["model"], r["seq_len"], r["pairs"], r["d"]) == k})
        b = best.get(k)
        if b is None or b["acc"] >= 0.99 or len(lrs) < 2 or 1e-5 > b["lr"] or b["lr"] > 0.1:
            continue
        new = b["lr"] * 3 if b["lr"] == lrs[-1] else b["lr"] / 3 if b["lr"] == lrs[0] else None
        if new is not None and all(e["lr"] != new or e is j for e in extra if e["model"] == j["model"]):
            extra.append({**j, "lr": new})
    uniq = {key(e): e for e in extra}
    return list(uniq.values())


def grid(args) -> list[dict]:
    plain = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    common = dict(args=plain, threads=args.threads, seed=args.seed)
    return [dict(common, model=m, seq_len=t, pairs=n, d=d, lr=lr)
            for (t, n) in args.settings for d in args.d_models for m in args.models for lr in args.lrs
            if not (args.max_seq_for_d and d > 64 and t > args.max_seq_for_d)]


BEGIN, END = "<!-- results:begin (bench/bench_recall.py writes this part) -->", "<!-- results:end -->"


def label(model: str) -> str:
    return (MODELS.get(model) or VARIANTS[model])[0]


def state_of(results: list[dict], r: dict) -> int:
    """A run's state size; for a run recorded without it (one that diverged), from its model built again."""
    if r.get("state_bytes"):
        return r["state_bytes"]
    from hope_dist.model.model import build_model
    from hope_dist.synthetic.mqar import MQARSetting

    args = argparse.Namespace(**r["args"])
    setting = MQARSetting(r["seq_len"], r["pairs"], args.vocab or 2 * r["seq_len"])
    cfg = model_config(r["model"], r["d"], args, setting)
    return state_bytes(build_model(cfg), cfg, r["seq_len"])


def results_table(results: list[dict]) -> str:
    """Markdown: a row per model, a column per setting and width: its best accuracy (that lr) and its
    state per layer."""
    best = best_runs(results)
    models = [m for m in [*MODELS, *VARIANTS] if any(k[0] == m for k in best)]
    cells = sorted({k[1:] for k in best})
    rows = ["| model | " + " | ".join(f"T {t}, {n} pairs, d {d}" for t, n, d in cells) + " |",
            "|---|" + "---|" * len(cells)]
    for m in models:
        out = []
        for t, n, d in cells:
            r = best.get((m, t, n, d))
            out.append("-" if r is None else f"{_seed_accs(results, r)} ({r['lr']:.0e}; "
                       f"{state_of(results, r) / 1024:.0f} KiB)" + (" *edge*" if _at_edge(results, r) else ""))
        rows.append(f"| {label(m)} | " + " | ".join(out) + " |")
    return "\n".join(rows)


def _seed_accs(results: list[dict], r: dict) -> str:
    """The accuracies of every seed run at r's model, setting, width and rate, by seed, joined by /."""
    same = sorted((x.get("seed", 0), x["acc"]) for x in results if (x["model"], x["seq_len"], x["pairs"], x["d"],
                  x["lr"]) == (r["model"], r["seq_len"], r["pairs"], r["d"], r["lr"]))
    return "/".join(f"{acc:.3f}" for _, acc in same)


def runs_table(results: list[dict]) -> str:
    """Markdown: every run, with the memory-health probes of its trained model (layer 0)."""
    rows = ["| model | T, pairs | d | lr | seed | accuracy | steps | kv_cos | inner loss | eta | alpha | CPU s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {m: i for i, m in enumerate([*MODELS, *VARIANTS])}
    for r in sorted(results, key=lambda r: (r["seq_len"], r["d"], order[r["model"]], r["lr"], r.get("seed", 0))):
        h = (r.get("health") or {}).get("layer0") or {}
        probes = " | ".join(f"{h[k]:.3f}" if k in h else "-"
                            for k in ("kv_cos", "inner_loss", "eta_mean", "alpha_mean"))
        steps = f"diverged at {r['diverged_at']}" if r.get("diverged_at") is not None else r["steps_run"]
        rows.append(f"| {label(r['model'])} | {r['seq_len']}, {r['pairs']} | {r['d']} | {r['lr']:.0e} | "
                    f"{r.get('seed', 0)} | {r['acc']:.3f} | {steps} | {probes} | {r['cpu_s']:.0f} |")
    return "\n".join(rows)


def _at_edge(results: list[dict], r: dict) -> bool:
    lrs = sorted({x["lr"] for x in results if (x["model"], x["seq_len"], x["pairs"], x["d"]) ==
                  (r["model"], r["seq_len"], r["pairs"], r["d"])})
    return len(lrs) > 1 and r["acc"] < 0.99 and r["lr"] in (lrs[0], lrs[-1])


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_runs(results)
    settings = sorted({k[1:3] for k in best})
    fig, axes = plt.subplots(1, len(settings), figsize=(4 * len(settings), 3.6), squeeze=False)
    for ax, (t, n) in zip(axes[0], settings):
        for i, m in enumerate(m for m in [*MODELS, *VARIANTS] if any(k[0] == m for k in best)):
            pts = sorted((state_of(results, r), r["acc"]) for k, r in best.items() if k[0] == m and k[1:3] == (t, n))
            if pts:
                ax.plot(*zip(*pts), marker="os^vDP<>"[i % 8], label=label(m))
        ax.set(xscale="log", ylim=(-0.02, 1.02), title=f"T={t}, {n} pairs", xlabel="state per layer (bytes)")
    axes[0][0].set_ylabel("MQAR accuracy")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(results: list[dict], doc: Path, out: Path) -> None:
    """The results part of DOC (between BEGIN and END; the text around it is kept) and its plot."""
    if not results:
        raise SystemExit(f"no results in {out / 'results.jsonl'}: run the train stage first")
    png = doc.with_suffix(".png")
    plot(results, png)
    a0 = results[0]["args"]
    vocab = "2 T" if all((r["args"]["vocab"] or 2 * r["seq_len"]) == 2 * r["seq_len"] for r in results) \
        else a0["vocab"]
    body = (f"{BEGIN}\n\nBest accuracy over the learning-rate grid (each seed's, by seed, joined by /; that rate; "
            f"recurrent state per layer and "
            f"sequence, float32; attention: its KV cache at the end of the sequence). *edge*: the best rate is "
            f"at an edge of its grid. Vocabulary {vocab}, batch {a0['batch']}, up to {a0['steps']} "
            f"steps, head dim {a0['head_dim']}, memory chunk {a0['chunk_size']}; "
            f"{len(results)} runs, {sum(r['cpu_s'] for r in results) / 3600:.2f} CPU-hours.\n\n"
            f"{results_table(results)}\n\n![accuracy against state size]({png.name})\n\nEvery run (probes: "
            f"memory health of layer 0 of the trained model on one test row, hope_dist/model/memory_health.py):"
            f"\n\n{runs_table(results)}\n\n{END}")
    text = doc.read_text() if doc.is_file() else f"# In-context recall (MQAR)\n\n{BEGIN}\n{END}\n"
    start, end = text.index(BEGIN), text.index(END) + len(END)
    doc.write_text(text[:start] + body + text[end:])
    print(f"wrote {doc} and {png}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stages", nargs="+", default=["train", "report"], choices=["train", "report"])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--settings", nargs="+", default=[f"{t}:{n}" for t, n in SETTINGS],
                   help="SEQ_LEN:PAIRS each")
    p.add_argument("--d-models", nargs="+", type=int, default=[64, 128])
    p.add_argument("--lrs", nargs="+", type=float, default=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--vocab", type=int, default=0, help="0: 2 x seq_len (Zoology: 8192)")
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=16)
    p.add_argument("--test-every", type=int, default=100)
    p.add_argument("--test-examples", type=int, default=1000)
    p.add_argument("--max-seq-for-d", type=int, default=0, help="skip d > 64 above this length (0: none)")
    p.add_argument("--extend", type=int, default=2, help="edge extensions of the lr grid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "runs/recall")
    p.add_argument("--doc", type=Path, default=ROOT / "docs/RECALL.md")
    p.add_argument("--smoke", action="store_true", help="one tiny setting, 2 models, 2 rates, few steps")
    args = p.parse_args(argv)
    if args.smoke:
        args.settings, args.d_models, args.models = ["32:2"], [32], ["attention", "delta"]
        args.lrs, args.steps, args.vocab, args.test_examples, args.extend = [3e-3, 1e-2], 30, 64, 64, 0
        args.test_every, args.head_dim, args.chunk_size = 10, 16, 8
    args.settings = [tuple(int(v) for v in s.split(":")) for s in args.settings]
    unknown = set(args.models) - set(MODELS) - set(VARIANTS)
    if unknown:
        p.error(f"unknown --models {sorted(unknown)}: choose from {sorted(MODELS) + sorted(VARIANTS)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if "train" in args.stages:
        base = grid(args)
        results = run_jobs(base, args.out, args.jobs)
        for _ in range(args.extend):
            extra = extension_jobs(results, base)
            if not extra:
                break
            results = run_jobs(extra, args.out, args.jobs)
    if "report" in args.stages:
        write_report(load_results(args.out), args.doc, args.out)


if __name__ == "__main__":
    main()
