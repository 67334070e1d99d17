"""Evaluate a checkpoint or exported model; write results.json, results.md and PNG plots to --out.

    python -m tools.evaluate MODEL --out DIR [--tasks perplexity,long_context,passkey,mqar]
        [--data PREFIX|FILE.jsonl|FILE.parquet] [--tokens N] [--segment S] [--long-len T] ...

MODEL is a committed RUN_DIR/checkpoints/step-N folder or a folder written by
`python -m tools.convert export-hf`. Every input is checked before any eval runs, and the output
files are written only when all evals have finished. The evals live in hope_dist/evals/, each one
entry of hope_dist/evals/registry.py (its arguments, runner, headline, markdown and plot), and are
described in docs/eval.md. Errors print one line (hope_dist.errors) and exit 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from hope_dist.dtypes import DTYPES
from hope_dist.errors import UserError, report
from hope_dist.evals.loading import EvalError, load_model
from hope_dist.evals.registry import EVALS
from hope_dist.evals.report import write_all


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="committed step-N checkpoint folder or export-hf folder")
    p.add_argument("--out", type=Path, required=True, help="output folder (results.json, results.md, *.png)")
    documents = [name for name, e in EVALS.items() if e.reads_documents]
    p.add_argument("--tasks", default=None,
                   help=f"comma list of {','.join(EVALS)} (default: all; {', '.join(documents)} only with --data)")
    p.add_argument("--data", help="Megatron PREFIX (.bin/.idx), .jsonl (field --text-key) or .parquet")
    p.add_argument("--text-key", default="text")
    p.add_argument("--heldout", type=float, metavar="F",
                   help="read only the documents held out by a run with data.valid_fraction=F (Megatron PREFIX)")
    p.add_argument("--tokenizer", help="tokenizer.json / .model (default: the folder's or the run's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--seq-len", type=int, help="training context (default: from the checkpoint's config)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's; 1 on a shared machine)")
    p.add_argument("--no-progress", action="store_true")
    for name, e in EVALS.items():
        e.arguments(p.add_argument_group(name))
    return p.parse_args(argv)


def _tasks(args) -> list[str]:
    """The evals to run, in EVALS' order."""
    if args.tasks is None:
        return [name for name, e in EVALS.items() if args.data or not e.reads_documents]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in EVALS]
    if unknown or not tasks:
        raise EvalError(f"--tasks {args.tasks}: unknown {unknown}; choose from {','.join(EVALS)}")
    documents = [t for t in tasks if EVALS[t].reads_documents]
    if documents and not args.data:
        raise EvalError(f"--tasks {','.join(documents)}: these evals read documents and need --data "
                        f"PREFIX|FILE.jsonl|FILE.parquet")
    return [name for name in EVALS if name in tasks]


def prepare(args, loaded) -> dict:
    """Check every task's inputs and return one runner per task; raises before anything runs."""
    tasks = _tasks(args)
    if any(EVALS[t].reads_documents for t in tasks) and loaded.seq_len is None and args.segment is None:
        raise EvalError(f"{loaded.source} does not record its training seq_len; pass --seq-len N")
    return {name: EVALS[name].prepare(args, loaded) for name in tasks}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.batch_size < 1:
            raise EvalError(f"--batch-size {args.batch_size}: must be positive")
        if args.threads:
            torch.set_num_threads(args.threads)
        loaded = load_model(args.model, args.device, args.dtype, args.seq_len, args.tokenizer)
        runners = prepare(args, loaded)
        t0 = time.time()
        results = {"model": loaded.describe(), "argv": sys.argv[1:] if argv is None else list(argv),
                   "tasks": {name: run() for name, run in runners.items()}}
        results["seconds"] = time.time() - t0
        files = write_all(results, args.out)
    except UserError as err:
        return report(err)
    for name, r in results["tasks"].items():
        print(f"{name}: {EVALS[name].headline(r)}, {r['tokens_per_s']:.0f} tokens/s")
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
