r"""Tokenize corpora into Megatron ``PREFIX.bin``/``PREFIX.idx`` with N workers, resumably.

    python -m data_prep.tokenize --input data/ --tokenizer tokenizer.json \
        --output-prefix out/corpus --workers 8

The inputs are cut into shards (see ``hope_dist.data.readers``); workers encode whole shards in
batches, each shard is published with a completion marker, and a streaming merge writes the
final files. A rerun after a crash redoes only shards without a valid marker. As a SLURM job
array, ``--shard-index $SLURM_ARRAY_TASK_ID --num-shards $SLURM_ARRAY_TASK_COUNT`` makes each
task encode one contiguous range of shards; the same command without those two flags then
merges (and encodes whatever a failed task left).
"""

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import threading
from collections import Counter

from hope_dist.data.encoders import ENGINES, EOD_TOKEN, file_sha256, load_encoder
from hope_dist.data.megatron_format import token_dtype
from data_prep.progress import Progress
from hope_dist.data.readers import DocumentReader, InputError, Piece, plan_shards
from data_prep.shard_store import ShardStore, atomic_write_bytes, merge_shards
from hope_dist.errors import UserError, report

BATCH_CHARS = 1 << 20   # encode about 1 MB of text per call
BATCH_DOCS = 1024


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data_prep.tokenize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="files or folders: .jsonl[.gz|.zst], .parquet, .txt, datasets folders")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json or SentencePiece .model")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    p.add_argument("--workers", type=int, default=cores,
                   help="worker processes, one core each (default: all cores of this process)")
    p.add_argument("--text-key", default="text", help="JSON key / column holding the text")
    p.add_argument("--split", default=None, help="split of a saved DatasetDict (default train)")
    p.add_argument("--eod-token", default=EOD_TOKEN, help="end-of-document token appended per doc")
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="auto: tiktoken when provably identical to tokenizers, else tokenizers")
    p.add_argument("--strict", action="store_true", help="malformed lines are errors, not skips")
    p.add_argument("--shard-size-mb", type=float, default=None,
                   help="input MB per shard (default: ~1/64 of the input, 1-256 MB)")
    p.add_argument("--shard-index", type=int, default=None, help="this task's index (job array)")
    p.add_argument("--num-shards", type=int, default=None, help="number of tasks (job array)")
    p.add_argument("--keep-shards", action="store_true", help="keep PREFIX.shards/ after merging")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be at least 1")
    if (args.shard_index is None) != (args.num_shards is None):
        p.error("--shard-index and --num-shards go together")
    if args.num_shards is not None and not 0 <= args.shard_index < args.num_shards:
        p.error(f"--shard-index must be in [0, {args.num_shards})")
    return args


# --- worker side -----------------------------------------------------------------------------

_W: dict = {}  # per-process worker state, set by _init_worker


def _init_worker(cfg: dict, queue, encoder=None) -> None:
    _W.update(cfg, queue=queue, encoder=encoder or load_encoder(cfg["tokenizer"], cfg["engine"],
                                                                cfg["eod_token"]))


def _report(nbytes: int, docs: int, tokens: int) -> None:
    if _W["queue"] is None:
        _W["progress"].update(nbytes, docs, tokens)
        return
    if os.getppid() != _W["parent"]:
        os._exit(1)  # the parent died (killed job): stop instead of racing its rerun
    _W["queue"].put((nbytes, docs, tokens))


def _encode_shard(job: tuple[int, list[Piece]]) -> dict:
    i, shard = job
    encoder = _W["encoder"]
    reader = DocumentReader(_W["text_key"], _W["strict"], _W["split"])
    writer = ShardStore(_W["prefix"]).writer(i, _W["dtype"])
    fallback_before = encoder.fallback_documents
    docs = tokens = 0
    batch: list[str] = []
    size = pending = 0

    def flush():
        nonlocal docs, tokens, size, pending
        n = writer.add_documents(encoder.encode_batch(batch), encoder.eod_id) if batch else 0
        _report(pending, len(batch), n)
        docs, tokens = docs + len(batch), tokens + n
        batch.clear()
        size = pending = 0

    try:
        for text, nbytes in reader.read(shard):
            batch.append(text)
            size += len(text)
            pending += nbytes
            if size >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
                flush()
        flush()
        marker = {"plan_id": _W["plan_id"], "shard": i, "documents": docs, "tokens": tokens,
                  "skipped": dict(reader.skipped), "examples": reader.examples,
                  "engine": encoder.name,
                  "fallback_documents": encoder.fallback_documents - fallback_before}
        writer.finish(marker)
    except BaseException:
        writer.abort()
        raise
    return marker


# --- driver ----------------------------------------------------------------------------------

def _plan(args, encoder) -> tuple[list[list[Piece]], dict, str]:
    shard_bytes = None if args.shard_size_mb is None else max(1, int(args.shard_size_mb * 2**20))
    shards, described = plan_shards(args.input, shard_bytes, args.split)
    plan = {**described, "tokenizer_sha256": file_sha256(args.tokenizer), "text_key": args.text_key,
            "eod_token": args.eod_token, "eod_id": encoder.eod_id, "vocab_size": encoder.vocab_size}
    plan_id = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]
    return shards, plan, plan_id


def _claim_folder(store: ShardStore, plan: dict, plan_id: str) -> None:
    plan_path = os.path.join(store.dir, "plan.json")
    if os.path.exists(plan_path):
        with open(plan_path) as f:
            if json.load(f).get("plan_id") == plan_id:
                return
        print(f"inputs or settings changed since {store.dir} was written: starting over",
              file=sys.stderr)
        shutil.rmtree(store.dir)
    os.makedirs(store.dir, exist_ok=True)
    atomic_write_bytes(plan_path, json.dumps({**plan, "plan_id": plan_id}, indent=1).encode())


def _run(pending: list[tuple[int, list[Piece]]], cfg: dict, workers: int, total: int,
         encoder) -> Progress:
    progress = Progress(total, desc="tokenize")
    if workers == 1 or len(pending) <= 1:
        _init_worker(cfg, None, encoder)
        _W["progress"] = progress
        for job in pending:
            _encode_shard(job)
        return progress
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()

    def drain():
        while (item := queue.get()) is not None:
            progress.update(*item)
    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    with ctx.Pool(min(workers, len(pending)), _init_worker, ({**cfg, "parent": os.getpid()}, queue)) as pool:
        for _ in pool.imap_unordered(_encode_shard, pending):
            pass
    queue.put(None)
    drainer.join()
    return progress


def _summary(markers: list[dict], seconds: float, new_tokens: int, new_bytes: int) -> str:
    docs = sum(m["documents"] for m in markers)
    tokens = sum(m["tokens"] for m in markers)
    skipped = sum((Counter(m["skipped"]) for m in markers), Counter())
    engines = sorted({m["engine"] for m in markers})
    fallback = sum(m["fallback_documents"] for m in markers)
    lines = [f"documents {docs:,}, tokens {tokens:,} (EOD included); engine {', '.join(engines)}"
             + (f", {fallback:,} documents re-encoded by tokenizers" if "tiktoken" in engines else "")]
    if seconds > 0 and new_tokens:
        lines.append(f"this run: {new_tokens:,} tokens in {seconds:.1f} s = {new_tokens / seconds:,.0f}"
                     f" tokens/s, {new_bytes / seconds / 1e6:.2f} MB/s of input")
    if skipped:
        why = ", ".join(f"{reason}: {n:,}" for reason, n in skipped.most_common())
        examples = [e for m in markers for e in m["examples"]][:5]
        lines.append(f"skipped {sum(skipped.values()):,} ({why}); e.g. " + "; ".join(examples))
    else:
        lines.append("skipped 0")
    return "\n".join(lines)


def tokenize(args: argparse.Namespace) -> int:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker, spawned ones included
    encoder = load_encoder(args.tokenizer, args.engine, args.eod_token)
    shards, plan, plan_id = _plan(args, encoder)
    prefix = args.output_prefix
    done_path = prefix + ".done"
    if os.path.exists(done_path):
        with open(done_path) as f:
            if json.load(f).get("plan_id") == plan_id:
                print(f"{prefix}.bin/.idx are complete for these inputs; nothing to do")
                return 0
        os.remove(done_path)  # made from other inputs: rebuilt below
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    store = ShardStore(prefix)
    _claim_folder(store, plan, plan_id)

    mine = range(len(shards))
    if args.num_shards is not None:
        n, k = len(shards), args.shard_index
        mine = range(n * k // args.num_shards, n * (k + 1) // args.num_shards)
    pending = [(i, shards[i]) for i in mine if store.read_marker(i, plan_id) is None]
    print(f"{len(shards)} shards planned, {len(mine)} for this task, "
          f"{len(mine) - len(pending)} already finished, {len(pending)} to encode "
          f"with {encoder.name} on {min(args.workers, max(len(pending), 1))} workers",
          file=sys.stderr)
    cfg = {"tokenizer": args.tokenizer, "engine": args.engine, "eod_token": args.eod_token,
           "prefix": prefix, "dtype": token_dtype(encoder.vocab_size), "plan_id": plan_id,
           "text_key": args.text_key, "strict": args.strict, "split": args.split}
    total = sum(p.size for _, s in pending for p in s)
    progress = _run(pending, cfg, args.workers, total, encoder)
    seconds = progress.close()

    markers = [store.read_marker(i, plan_id) for i in range(len(shards))]
    new = [markers[i] for i, _ in pending]
    if any(m is None for m in new):
        raise InputError(f"some shards under {store.dir} failed to publish; rerun the command")
    stats = _summary([m for m in markers if m], seconds, sum(m["tokens"] for m in new), total)
    if args.num_shards is not None or any(m is None for m in markers):
        missing = sum(m is None for m in markers)
        print(stats + f"\n{missing} shards unfinished; once every task is done, run the same "
              "command without --shard-index/--num-shards to merge")
        return 0
    if sum(m["documents"] for m in markers) == 0:
        raise InputError(f"no documents in {args.input}: all were empty or skipped.\n{stats}")
    docs, tokens = merge_shards([store.shard_prefix(i) for i in range(len(shards))], prefix)
    atomic_write_bytes(done_path, json.dumps({
        "plan_id": plan_id, "documents": docs, "tokens": tokens, "eod_id": encoder.eod_id,
        "vocab_size": encoder.vocab_size, "tokenizer": os.path.abspath(args.tokenizer)},
        indent=1).encode())
    if not args.keep_shards:
        shutil.rmtree(store.dir)
    print(stats)
    print(f"wrote {prefix}.bin ({os.path.getsize(prefix + '.bin') / 1e6:.1f} MB) and {prefix}.idx: "
          f"EOD id {encoder.eod_id}, vocabulary {encoder.vocab_size}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return tokenize(args)
    except UserError as e:
        return report(e)


if __name__ == "__main__":
    sys.exit(main())
