"""Evaluate a checkpoint or exported model; write results.json, results.md and PNG plots to --out.

    python -m tools.evaluate MODEL --out DIR [--tasks perplexity,long_context,passkey,mqar]
        [--data PREFIX|FILE.jsonl|FILE.parquet] [--tokens N] [--segment S] [--long-len T] ...

MODEL is a committed RUN_DIR/checkpoints/step-N folder or a folder written by
`python -m tools.convert export-hf`. Every input is checked before any eval runs, and the output
files are written only when all evals have finished. The evals live in hope_dist/evals/ and are
described in docs/eval.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from hope_dist.checkpoint import CheckpointError
from hope_dist.config import ConfigError
from hope_dist.evals import long_context as lc
from hope_dist.evals import mqar as mq
from hope_dist.evals import passkey as pk
from hope_dist.evals.loading import DTYPES, EvalError, load_encoder, load_model, open_documents
from hope_dist.evals.perplexity import perplexity
from hope_dist.evals.report import write_all
from hope_dist.pretrained_io import PretrainedError

TASKS = ("perplexity", "long_context", "passkey", "mqar")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="committed step-N checkpoint folder or export-hf folder")
    p.add_argument("--out", type=Path, required=True, help="output folder (results.json, results.md, *.png)")
    p.add_argument("--tasks", default=None,
                   help=f"comma list of {','.join(TASKS)} (default: all; the first two only with --data)")
    p.add_argument("--data", help="Megatron PREFIX (.bin/.idx), .jsonl (field --text-key) or .parquet")
    p.add_argument("--text-key", default="text")
    p.add_argument("--heldout", type=float, metavar="F",
                   help="read only the documents held out by a run with data.valid_fraction=F (Megatron PREFIX)")
    p.add_argument("--tokenizer", help="tokenizer.json / .model (default: the folder's or the run's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--seq-len", type=int, help="training context (default: from the checkpoint's config)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's; 1 on a shared machine)")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("perplexity")
    g.add_argument("--tokens", type=int, default=100_000, help="target tokens to score")
    g = p.add_argument_group("long_context")
    g.add_argument("--segment", type=int, help="segment length S (default: the training seq_len)")
    g.add_argument("--long-len", type=int, help="positions evaluated per document (default: 8 segments)")
    g.add_argument("--long-docs", type=int, default=16, help="documents (longer than --long-len) to read")
    g.add_argument("--buckets", choices=("segment", "pow2"), default="segment")
    g = p.add_argument_group("passkey")
    g.add_argument("--passkey-lengths", type=_ints, default=list(pk.LENGTHS))
    g.add_argument("--passkey-depths", type=_floats, default=list(pk.DEPTHS))
    g.add_argument("--passkey-samples", type=int, default=1, help="samples per (length, depth)")
    g.add_argument("--passkey-candidates", type=int, default=10, help="true key + distractors")
    g.add_argument("--passkey-mode", choices=("auto", "text", "tokens"), default="auto",
                   help="text needs a tokenizer; auto: text when one is known")
    g = p.add_argument_group("mqar")
    g.add_argument("--mqar-pairs", type=_ints, default=list(mq.PAIRS))
    g.add_argument("--mqar-samples", type=int, default=64)
    g.add_argument("--mqar-vocab", type=_range, default=None, help="LO:HI token-id range (default: whole vocab)")
    return p.parse_args(argv)


def _tasks(args) -> list[str]:
    if args.tasks is None:
        return list(TASKS) if args.data else ["passkey", "mqar"]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise EvalError(f"--tasks {args.tasks}: unknown {unknown}; choose from {','.join(TASKS)}")
    if not args.data and {"perplexity", "long_context"} & set(tasks):
        raise EvalError("perplexity and long_context need --data PREFIX|FILE.jsonl|FILE.parquet")
    return tasks


def prepare(args, loaded) -> dict:
    """Check every task's inputs and return one runner per task; raises before anything runs."""
    tasks, cfg, progress = _tasks(args), loaded.cfg, not args.no_progress
    model, seq_len = loaded.model, loaded.seq_len
    if {"perplexity", "long_context"} & set(tasks) and seq_len is None and args.segment is None:
        raise EvalError(f"{loaded.source} does not record its training seq_len; pass --seq-len N")
    runners = {}
    if "perplexity" in tasks:
        docs = open_documents(args.data, loaded, args.text_key, args.heldout)
        runners["perplexity"] = lambda: {"data": args.data, **perplexity(
            model, docs, seq_len or args.segment, args.tokens, args.batch_size, progress)}
    if "long_context" in tasks:
        segment = args.segment or seq_len
        length = args.long_len or 8 * segment
        lc.check_segment(model, segment, length)
        docs2 = open_documents(args.data, loaded, args.text_key, args.heldout)
        runners["long_context"] = lambda: {"data": args.data, **lc.long_context(
            model, docs2, length, segment, args.long_docs, args.batch_size, args.buckets, progress)}
    if "passkey" in tasks:
        mode = args.passkey_mode if args.passkey_mode != "auto" else ("text" if loaded.tokenizer else "tokens")
        if mode == "text":
            encoder = load_encoder(loaded)
            vocab = pk.Vocab.text(lambda s: encoder.encode_batch([s])[0])
        else:
            vocab = pk.Vocab.tokens(cfg.vocab_size, loaded.eod_id)
        samples = pk.make_samples(vocab, args.passkey_lengths, args.passkey_depths, args.passkey_samples,
                                  args.passkey_candidates, args.seed)

        def run_passkey():
            out = pk.passkey(samples, pk.model_scorer(model), progress, mode)
            if cfg.mixer == "attention" and seq_len and max(args.passkey_lengths) > seq_len:
                out["note"] = (f"attention reads contexts longer than its training seq_len {seq_len} through a KV "
                               "cache, at positions it never saw in training")
            return out
        runners["passkey"] = run_passkey
    if "mqar" in tasks:
        mq.check(model, args.mqar_pairs, args.mqar_vocab, loaded.eod_id)
        runners["mqar"] = lambda: mq.mqar(model, args.mqar_pairs, args.mqar_samples, args.mqar_vocab, loaded.eod_id,
                                          max(args.batch_size, 1), args.seed, seq_len, progress)
    return runners


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
    except (EvalError, CheckpointError, PretrainedError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, r in results["tasks"].items():
        headline = {"perplexity": lambda: f"perplexity {r['perplexity']:.3f} (loss {r['loss']:.4f})",
                    "long_context": lambda: "loss " + ", ".join(f"{m} {v:.4f}" for m, v in r["loss"].items()),
                    "passkey": lambda: f"accuracy {r['accuracy']:.3f} (chance {r['chance']:.2f})",
                    "mqar": lambda: "accuracy " + ", ".join(f"{x['pairs']}:{x['accuracy']:.2f}" for x in r["by_pairs"]),
                    }[name]()
        print(f"{name}: {headline}, {r['tokens_per_s']:.0f} tokens/s")
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
