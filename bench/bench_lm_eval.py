"""Tokens/s of the lm-eval model "hope" (hope_dist/lm_eval_model.py) at several batch sizes, CPU.

    python bench/bench_lm_eval.py --batch-sizes 1 8 32 --threads 1      # numbers in docs/eval_harness.md

An untrained configs/tiny.yaml model (seed 0) is exported with --tokenizer; its requests are lm-eval's
two scoring kinds over the first --docs documents of --corpus (each cut to --chars characters): one
loglikelihood_rolling per document (windows of --max-length) and one loglikelihood per document
(its first 300 characters as context, the next 100 as continuation, like a multiple-choice item).
Tokens = the tokens the model reads (every window's and request's input); the same requests at every
batch size, each line showing the largest relative difference to the first batch size's results.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from lm_eval.api.instance import Instance
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from hope_dist.config import load_config
from hope_dist.lm_eval_model import HopeEvalLM
from hope_dist.model import build_model
from hope_dist.pretrained_io import save_pretrained

ROOT = Path(__file__).resolve().parents[1]


def requests(corpus: Path, docs: int, chars: int) -> tuple[list[Instance], list[Instance]]:
    texts = [json.loads(line)["text"][:chars] for line, _ in zip(corpus.open(), range(docs))]
    meta = ("bench", 0, 1)
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i, meta) for i, t in enumerate(texts)]
    pairs = [Instance("loglikelihood", {}, (t[:300], t[300:400]), i, meta) for i, t in enumerate(texts)]
    return rolling, pairs


def tokens_read(lm: HopeEvalLM, rolling: list[Instance], pairs: list[Instance]) -> int:
    n = 0
    for req in rolling:
        for w in get_rolling_token_windows(lm.tok_encode(req.args[0]), lm.prefix_token_id, lm.max_length, 1):
            ctx, cont = make_disjoint_window(w)
            n += len(ctx) + len(cont) - 1
    for req in pairs:
        _, ctx, cont = lm._encode(req)
        n += len(ctx) + len(cont) - 1
    return n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs/tiny.yaml"))
    ap.add_argument("--tokenizer", default=str(ROOT / "data/quality/tokenizer.json"))
    ap.add_argument("--corpus", default=str(ROOT / "data/quality/corpus.jsonl"))
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--chars", type=int, default=2000)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(Path(args.config), []).model
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pretrained(Path(tmp) / "model", build_model(cfg).state_dict(), cfg, tokenizer=args.tokenizer)
        rolling, pairs = requests(Path(args.corpus), args.docs, args.chars)
        reference = None
        for b in args.batch_sizes:
            lm = HopeEvalLM(pretrained=str(folder), max_length=args.max_length, batch_size=b)
            t0 = time.perf_counter()
            out = lm.loglikelihood_rolling(rolling, disable_tqdm=True) + [x for x, _ in lm.loglikelihood(
                pairs, disable_tqdm=True)]
            dt = time.perf_counter() - t0
            reference = reference or out
            worst = max(abs(a - r) / max(1.0, abs(r)) for a, r in zip(out, reference))
            n = tokens_read(lm, rolling, pairs)
            print(f"batch_size {b:3d}: {n} tokens in {dt:.2f} s = {n / dt:,.0f} tokens/s "
                  f"(max rel. difference to batch_size {args.batch_sizes[0]}: {worst:.1e})", flush=True)


if __name__ == "__main__":
    main()
