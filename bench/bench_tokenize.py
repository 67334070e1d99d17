"""Tokenization throughput: data_prep.tokenize against a Megatron-style preprocess, same
tokenizer, same cores, on >= 200 MB of real offline text (stdlib + site-packages sources/docs).

    python bench/bench_tokenize.py --workdir data/bench

Steps: build the corpus (data_prep.corpus --include-site-packages), train a 32K byte-level BPE on
its first 50 MB, measure the raw engines (tokenizers vs tiktoken, one thread, in process), then
time end to end (process start to files on disk) with 1 and 2 workers:
  * megatron-style: a multiprocessing pool that JSON-parses and encodes one document at a time
    with ``tokenizers`` and writes with megatron-core's IndexedDatasetBuilder (the approach of
    Megatron-LM's tools/preprocess_data.py, re-implemented here);
  * data_prep.tokenize --engine tokenizers, and --engine auto (verified tiktoken).
All outputs are checked byte-identical to each other before any number is printed.
"""

import argparse
import filecmp
import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import time


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_tok = None


def _init(path: str) -> None:
    global _tok
    from tokenizers import Tokenizer

    _tok = Tokenizer.from_file(path)
    _tok.encode_special_tokens = True


def _encode_line(line: bytes):
    text = json.loads(line)["text"]
    return _tok.encode(text, add_special_tokens=False).ids, len(line)


def megatron_style(corpus: str, tokenizer: str, prefix: str, workers: int) -> None:
    """preprocess_data.py's shape: Pool.imap over lines, one document per call, builder writes."""
    import torch

    from hope_dist.data.megatron_format import megatron_indexed_dataset

    megatron = megatron_indexed_dataset()
    DType, IndexedDatasetBuilder = megatron.DType, megatron.IndexedDatasetBuilder

    _init(tokenizer)
    eod = _tok.token_to_id("<|endoftext|>")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(_tok.get_vocab_size()))
    with open(corpus, "rb") as f, mp.get_context("fork").Pool(workers, _init, (tokenizer,)) as pool:
        for ids, _ in pool.imap(_encode_line, f, chunksize=25):
            ids.append(eod)
            builder.add_document(torch.tensor(ids), [len(ids)])
    builder.finalize(prefix + ".idx")


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children: honest on a shared machine."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of fn()."""
    t, c = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - t, cpu_seconds() - c


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": REPO, "TOKENIZERS_PARALLELISM": "false"})


def engine_ceiling(corpus: str, tokenizer: str, mb: float) -> dict:
    """One thread, in process, no I/O: MB/s of the raw engines on the corpus's first ``mb`` MB."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from hope_dist.data.encoders import load_encoder

    texts, size = [], 0
    with open(corpus) as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            size += len(texts[-1].encode())
            if size >= mb * 1e6:
                break
    fast = load_encoder(tokenizer, "tiktoken")  # raises unless tiktoken can run it
    out = {}
    for name, fn in [("tokenizers", fast.reference.encode_batch),
                     ("tiktoken raw", lambda b: [fast.enc.encode_ordinary(t) for t in b]),
                     ("tiktoken verified", fast.encode_batch)]:
        n = []
        _, cpu = timed(lambda: n.extend(len(ids) for i in range(0, len(texts), 64)
                                        for ids in fn(texts[i:i + 64])))
        out[name] = {"MB/s": size / cpu / 1e6, "tokens/s": sum(n) / cpu}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="data/bench")
    p.add_argument("--max-mb", type=float, default=1000, help="corpus cap (all available by default)")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--ceiling-mb", type=float, default=20)
    p.add_argument("--only", default="megatron,auto,tokenizers",
                   help="pipelines to (re)measure; the others are taken from WORKDIR/results.json")
    args = p.parse_args()
    w = args.workdir
    os.makedirs(w, exist_ok=True)
    corpus, tok = os.path.join(w, "corpus.jsonl"), os.path.join(w, "tokenizer32k.json")
    py = sys.executable
    if not os.path.exists(corpus):
        run([py, "-m", "data_prep.corpus", "--out", corpus, "--max-mb", str(args.max_mb),
             "--include-site-packages"])
    if not os.path.exists(tok):
        run([py, "-m", "data_prep.train_tokenizer", "--input", corpus, "--vocab-size",
             str(args.vocab_size), "--out", tok, "--max-mb", "50"])
    mb = os.path.getsize(corpus) / 1e6
    print(f"corpus {corpus}: {mb:.1f} MB of JSONL; tokenizer {tok} ({args.vocab_size} BPE)\n")
    ceiling = engine_ceiling(corpus, tok, args.ceiling_mb)
    print(f"raw engines, 1 thread, first {args.ceiling_mb:g} MB, per CPU-second:")
    for name, r in ceiling.items():
        print(f"  {name:18s} {r['MB/s']:6.2f} MB/s  {r['tokens/s']:>12,.0f} tokens/s")

    from hope_dist.data.megatron_format import megatron_indexed_dataset, read_index

    megatron_indexed_dataset()  # import time is not throughput

    store = os.path.join(w, "results.json")
    results = json.load(open(store)) if os.path.exists(store) else {}
    pipelines = {"megatron": "megatron-style", "auto": "data_prep.tokenize --engine auto",
                 "tokenizers": "data_prep.tokenize --engine tokenizers"}
    for key in args.only.split(","):
        for workers in (1, 2):
            prefix = os.path.join(w, f"{key}_w{workers}")
            for suffix in (".bin", ".idx", ".done"):
                if os.path.exists(prefix + suffix):
                    os.remove(prefix + suffix)
            if key == "megatron":
                wall, cpu = timed(lambda: megatron_style(corpus, tok, prefix, workers))
            else:
                wall, cpu = timed(lambda: run([
                    py, "-m", "data_prep.tokenize", "--input", corpus, "--tokenizer", tok,
                    "--output-prefix", prefix, "--workers", str(workers), "--engine", key]))
            results[f"{key}|{workers}"] = {"wall": wall, "cpu": cpu, "load": os.getloadavg()[0],
                                           "tokens": read_index(prefix).num_tokens}
            print(f"{pipelines[key]}, {workers} workers: {wall:.1f} s wall, {cpu:.1f} CPU s",
                  flush=True)
            with open(store, "w") as f:
                json.dump(results, f, indent=1)
    outputs = [os.path.join(w, f"{k}_w{n}") for k in pipelines for n in (1, 2)]
    for prefix in outputs:  # every pipeline wrote the very same bytes
        for suffix in (".bin", ".idx"):
            assert filecmp.cmp(outputs[0] + suffix, prefix + suffix, shallow=False), prefix + suffix
    tokens = results["megatron|1"]["tokens"]
    print(f"\nall {len(outputs)} outputs byte-identical: {tokens:,} tokens\n")
    print("| pipeline | workers | wall s | MB/s | tokens/s | vs megatron-style | CPU s "
          "| tokens per CPU-s | vs megatron-style (CPU) | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key, name in pipelines.items():
        for n in (1, 2):
            r, b = results[f"{key}|{n}"], results[f"megatron|{n}"]
            print(f"| {name} | {n} | {r['wall']:.1f} | {mb / r['wall']:.2f} | "
                  f"{tokens / r['wall']:,.0f} | {b['wall'] / r['wall']:.2f}x | {r['cpu']:.1f} | "
                  f"{tokens / r['cpu']:,.0f} | {b['cpu'] / r['cpu']:.2f}x | {r['load']:.1f} |")
    for key, name in pipelines.items():
        one, two = results[f"{key}|1"], results[f"{key}|2"]
        print(f"scaling 1 -> 2 workers, {name}: {one['wall'] / two['wall']:.2f}x wall, "
              f"{(tokens / two['cpu']) / (tokens / one['cpu']):.2f}x tokens per CPU-s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
