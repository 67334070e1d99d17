r"""Train a byte-level BPE tokenizer with ``tokenizers`` and save it as ``tokenizer.json``.

    python -m data_prep.train_tokenizer --input data/stdlib/corpus.jsonl --vocab-size 4096 \
        --out data/stdlib/tokenizer.json

Id 0 is the end-of-document token ``<|endoftext|>``; ids 1-256 are the 256 bytes, so any text
encodes without unknown tokens; merges follow in the order they were learnt (which is what lets
``data_prep.tokenize`` run the result on tiktoken's faster BPE core).
"""

import argparse
import os
import sys
import time

from hope_dist.data.encoders import EOD_TOKEN
from hope_dist.data.readers import DocumentReader, InputError, plan_shards
from hope_dist.errors import report


def train(inputs: list[str], vocab_size: int, out: str, text_key: str = "text",
          max_mb: float | None = None, min_frequency: int = 2) -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    shards, _ = plan_shards(inputs, None)
    reader = DocumentReader(text_key, strict=False)
    budget = None if max_mb is None else int(max_mb * 1e6)
    used = {"documents": 0, "chars": 0}

    def texts():
        for shard in shards:
            for text, _ in reader.read(shard):
                if budget is not None and used["chars"] >= budget:
                    return
                used["documents"] += 1
                used["chars"] += len(text)
                yield text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[EOD_TOKEN], show_progress=sys.stderr.isatty(),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts(), trainer)
    if used["documents"] == 0:
        raise InputError(f"no documents in {inputs}; nothing to train on")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, out)
    return {**used, "vocab_size": tok.get_vocab_size(), "skipped": sum(reader.skipped.values())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.train_tokenizer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="same inputs as data_prep.tokenize")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help="where to write tokenizer.json")
    p.add_argument("--text-key", default="text")
    p.add_argument("--max-mb", type=float, default=None, help="train on the first N MB only")
    p.add_argument("--min-frequency", type=int, default=2)
    args = p.parse_args(argv)
    if args.vocab_size < 257:
        p.error("--vocab-size must be at least 257 (256 bytes + <|endoftext|>)")
    t0 = time.perf_counter()
    try:
        s = train(args.input, args.vocab_size, args.out, args.text_key, args.max_mb,
                  args.min_frequency)
    except InputError as e:
        return report(e)
    print(f"wrote {args.out}: byte-level BPE, vocabulary {s['vocab_size']:,} (<|endoftext|> = 0), "
          f"trained on {s['documents']:,} documents / {s['chars'] / 1e6:.1f} M characters in "
          f"{time.perf_counter() - t0:.1f} s ({s['skipped']:,} skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
