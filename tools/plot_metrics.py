"""Draw the loss curve(s) of one or more runs to a PNG.

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
    fig, ax = plt.subplots(figsize=(8, 5))
    for run in args.runs:
        rows = [r for r in read_metrics(run) if r.get("loss") is not None]
        steps = [r["step"] for r in rows]
        ax.plot(steps, smooth([r["loss"] for r in rows], args.smooth), label=run.name if run.is_dir() else str(run))
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (nats/token, {args.smooth}-step mean)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
