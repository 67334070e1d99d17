"""results.json, results.md and one PNG per eval that has a curve (each eval's section and plot: registry.py).

Why a separate step: evaluations run first and the files are written only once every one has
finished, each to a temporary name in the output folder and then renamed, so an interrupted or
failed run never leaves a half-written or stale-mixed result behind.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hope_dist.evals.registry import EVALS, fmt  # noqa: E402


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def markdown(results: dict) -> str:
    m, tasks = results["model"], results["tasks"]
    lines = [f"# Evaluation of `{m['source']}`", "",
             f"{m['kind']}, step {m['step']}, mixer `{m['mixer']}`, {m['parameters']:,} parameters, vocab "
             f"{m['vocab_size']}, training context {m['train_seq_len']}, on {m['device']} ({m['dtype']}).", ""]
    for name, result in tasks.items():
        lines += EVALS[name].markdown(result)
    lines += ["## Throughput", "", "| eval | tokens | tokens/s |", "|---|---:|---:|"]
    lines += [f"| {name} | {t['tokens']} | {fmt(t['tokens_per_s'], 0)} |" for name, t in tasks.items()]
    return "\n".join(lines) + "\n"


def plots(results: dict, out: Path) -> list[Path]:
    """NAME.png for every eval of `results` that has a plot."""
    written = []
    for name, result in results["tasks"].items():
        draw = EVALS[name].plot
        if draw is None:
            continue
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        draw(result, ax)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(out / f"{name}.png")
        _atomic(written[-1], functools.partial(fig.savefig, format="png"))
        plt.close(fig)
    return written


def write_all(results: dict, out: Path) -> list[Path]:
    """Write results.json, results.md and the plots into `out` (created if needed)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = plots(results, out)
    _atomic(out / "results.md", lambda tmp: tmp.write_text(markdown(results)))
    _atomic(out / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=1)))  # last: the marker
    return written + [out / "results.md", out / "results.json"]
