"""Draw the training and validation loss of one or more runs, and their memory health, to a PNG.

    python -m tools.plot_metrics runs/tiny runs/tiny_transformer --out loss.png
Each argument is a run directory (its metrics.jsonl) or a metrics.jsonl file.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: Path) -> list[dict]:
    file = path / "metrics.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist: pass a run directory that holds metrics.jsonl")
    rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    by_step = {r["step"]: r for r in rows}  # a resumed run may repeat steps: keep the last
    return [by_step[s] for s in sorted(by_step)]


def smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("loss.png"))
    parser.add_argument("--smooth", type=int, default=10, help="moving-average window in steps")
    args = parser.parse_args(argv)
    runs = [(run.name if run.is_dir() else str(run), read_metrics(run)) for run in args.runs]
    health = any(k.startswith("mem/L") for _, rows in runs for r in rows for k in r)
    fig, axes = plt.subplots(1, 3 if health else 1, figsize=(18 if health else 8, 5), squeeze=False)
    ax = axes[0][0]
    for label, rows in runs:
        train = [r for r in rows if r.get("loss") is not None]
        line, = ax.plot([r["step"] for r in train], smooth([r["loss"] for r in train], args.smooth),
                        label=f"{label} train")
        val = [r for r in rows if r.get("val_loss") is not None]
        if val:
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o--", color=line.get_color(),
                    label=f"{label} validation")
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss (nats/token; train: {args.smooth}-step mean)")
    ax.grid(alpha=0.3)
    ax.legend()
    if health:
        plot_health(axes[0][1], axes[0][2], runs)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


def plot_health(norm_ax, loss_ax, runs) -> None:
    """Memory health (model/memory_health.py) per layer: the fast weights' largest norm at the end
    of the probed document, and the inner loss; a memory about to blow up shows here first."""
    for label, rows in runs:
        layers = sorted({k.split("/")[1] for r in rows for k in r if k.startswith("mem/L")}, key=lambda x: int(x[1:]))
        for layer in layers:
            for ax, stat in ((norm_ax, "fw_norm_max"), (loss_ax, "inner_loss")):
                pts = [(r["step"], r[f"mem/{layer}/{stat}"]) for r in rows if f"mem/{layer}/{stat}" in r]
                ax.plot(*zip(*pts), label=f"{label} {layer}")
    for ax, title in ((norm_ax, "largest fast-weight norm (end of probed document)"),
                      (loss_ax, "inner loss 1/2 |M_o(k) - vhat|^2 (mean)")):
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)


if __name__ == "__main__":
    main()
