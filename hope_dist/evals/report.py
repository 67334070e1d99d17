"""results.json, results.md and one PNG per eval that has a curve.

Why a separate step: evaluations run first and the files are written only once every one has
finished, each to a temporary name in the output folder and then renamed, so an interrupted or
failed run never leaves a half-written or stale-mixed result behind.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown(results: dict) -> str:
    m, tasks = results["model"], results["tasks"]
    lines = [f"# Evaluation of `{m['source']}`", "",
             f"{m['kind']}, step {m['step']}, mixer `{m['mixer']}`, {m['parameters']:,} parameters, vocab "
             f"{m['vocab_size']}, training context {m['train_seq_len']}, on {m['device']} ({m['dtype']}).", ""]
    if "perplexity" in tasks:
        p = tasks["perplexity"]
        lines += ["## Perplexity", "", p["definition"] + ".", "",
                  "| data | documents | tokens | loss (nats/token) | perplexity | tokens/s |",
                  "|---|---:|---:|---:|---:|---:|",
                  f"| `{p['data']}` | {p['documents']} | {p['tokens']} | {_fmt(p['loss'], 4)} "
                  f"| {_fmt(p['perplexity'], 2)} | {_fmt(p['tokens_per_s'], 0)} |", ""]
    if "long_context" in tasks:
        lc = tasks["long_context"]
        modes = lc["modes"]
        head = ("| positions | " + " | ".join(f"{m} loss" for m in modes)
                + (" | carry - reset |" if len(modes) == 2 else " |"))
        lines += ["## Long-document loss by position", "", lc["definition"] + ".", ""]
        if "note" in lc:
            lines += [f"Note: {lc['note']}.", ""]
        lines += [f"{lc['documents']} documents, {_fmt(lc['tokens_per_s'], 0)} tokens/s.", "", head,
                  "|---|" + "---:|" * (len(modes) + (len(modes) == 2))]
        for b in lc["buckets"]:
            cells = [_fmt(b[mode], 4) for mode in modes]
            if len(modes) == 2:
                cells.append(f"{b['carry'] - b['reset']:+.4f}")
            lines.append(f"| {b['start']}-{b['end'] - 1} | " + " | ".join(cells) + " |")
        lines.append("")
    if "passkey" in tasks:
        pk = tasks["passkey"]
        depths = pk["depths"]
        lines += ["## Passkey retrieval", "", pk["definition"] + f"; {pk['mode']} mode; chance {pk['chance']:.2f}.", "",
                  f"Accuracy {pk['accuracy']:.3f} over {pk['samples']} samples, "
                  f"{_fmt(pk['tokens_per_s'], 0)} tokens/s.", "",
                  "| length | accuracy | " + " | ".join(f"depth {d}" for d in depths) + " |",
                  "|---:|---:|" + "---:|" * len(depths)]
        for r in pk["by_length"]:
            lines.append(f"| {r['length']} | {r['accuracy']:.3f} | "
                         + " | ".join(f"{r['by_depth'][str(d)]:.2f}" for d in depths) + " |")
        if pk.get("note"):
            lines += ["", f"Note: {pk['note']}."]
        lines.append("")
    if "mqar" in tasks:
        mq = tasks["mqar"]
        lines += ["## MQAR", "", mq["definition"] + ".", "",
                  f"{mq['samples']} samples per row, keys/values from ids {mq['vocab'][0]}..{mq['vocab'][1] - 1}, "
                  f"chance over values {mq['chance_values']:.4f}, {_fmt(mq['tokens_per_s'], 0)} tokens/s.", "",
                  "| pairs | sequence | accuracy | accuracy (values only) |", "|---:|---:|---:|---:|"]
        for r in mq["by_pairs"]:
            star = " *" if r["beyond_train_context"] else ""
            lines.append(f"| {r['pairs']} | {r['seq_len']}{star} | {r['accuracy']:.3f} | {r['accuracy_values']:.3f} |")
        if any(r["beyond_train_context"] for r in mq["by_pairs"]):
            lines += ["", "\\* longer than the training context."]
        lines.append("")
    lines += ["## Throughput", "", "| eval | tokens | tokens/s |", "|---|---:|---:|"]
    lines += [f"| {name} | {t['tokens']} | {_fmt(t['tokens_per_s'], 0)} |" for name, t in tasks.items()]
    return "\n".join(lines) + "\n"


def _plot(path: Path, draw) -> None:
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    draw(ax)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def plots(results: dict, out: Path) -> list[Path]:
    tasks, written = results["tasks"], []
    if "long_context" in tasks:
        lc = tasks["long_context"]

        def draw(ax):
            mids = [(b["start"] + b["end"]) / 2 for b in lc["buckets"]]
            for mode, style in (("carry", "o-"), ("reset", "s--")):
                if mode in lc["modes"]:
                    ax.plot(mids, [b[mode] for b in lc["buckets"]], style, label=f"state {mode}")
            if lc["bucket_kind"] == "pow2":
                ax.set_xscale("log", base=2)
            ax.set_xlabel("token position")
            ax.set_ylabel("loss (nats/token)")
            ax.set_title(f"loss by position, segments of {lc['segment']}")
            ax.legend()
        written.append(out / "long_context.png")
        _plot(written[-1], draw)
    if "passkey" in tasks:
        pk = tasks["passkey"]

        def draw(ax):
            xs = [r["length"] for r in pk["by_length"]]
            ax.plot(xs, [r["accuracy"] for r in pk["by_length"]], "o-", label="accuracy")
            ax.axhline(pk["chance"], color="gray", ls=":", label="chance")
            ax.set_xscale("log", base=2)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("passkey accuracy")
            ax.legend()
        written.append(out / "passkey.png")
        _plot(written[-1], draw)
    if "mqar" in tasks:
        mq = tasks["mqar"]

        def draw(ax):
            xs = [r["pairs"] for r in mq["by_pairs"]]
            ax.plot(xs, [r["accuracy"] for r in mq["by_pairs"]], "o-", label="accuracy (full vocab)")
            ax.plot(xs, [r["accuracy_values"] for r in mq["by_pairs"]], "s--", label="accuracy (values only)")
            ax.set_xscale("log", base=2)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("key-value pairs")
            ax.set_ylabel("MQAR accuracy")
            ax.legend()
        written.append(out / "mqar.png")
        _plot(written[-1], draw)
    return written


def write_all(results: dict, out: Path) -> list[Path]:
    """Write results.json, results.md and the plots into `out` (created if needed)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = plots(results, out)
    _atomic(out / "results.md", lambda tmp: tmp.write_text(markdown(results)))
    _atomic(out / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=1)))  # last: the marker
    return written + [out / "results.md", out / "results.json"]
