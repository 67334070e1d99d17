"""data_prep end to end on small generated corpora: every input format round-trips through
megatron-core's IndexedDataset, workers and crashes do not change a byte, bad input is named."""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep import corpus, tokenize
from hope_dist.data.encoders import TiktokenEncoder, load_encoder, tiktoken_incompatibility
from data_prep.train_tokenizer import train

from helpers import REPO

WORDS = ["alpha", "beta", "gamma", "delta", "naïve", "日本語", "def", "return", "    ", "\n", "x=1;",
         "Ünïcödé", "42", "3.14", "'s", " don't", "<|endoftext|>", "emoji🙂", "\t", "tab\ttab"]


def make_texts(n: int, seed: int = 0, words: int = 60) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(WORDS[i] + (" " if rng.random() < 0.6 else "")
                    for i in rng.integers(0, len(WORDS), size=int(rng.integers(1, words))))
            for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("tok")
    src = d / "train.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(400, seed=1)))
    out = str(d / "tokenizer.json")
    train([str(src)], 400, out, min_frequency=1)
    return out


def hf_reference(tokenizer: str, texts: list[str]) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer)
    tok.encode_special_tokens = True  # document text never yields special tokens
    eod = tok.token_to_id("<|endoftext|>")
    return [tok.encode(t, add_special_tokens=False).ids + [eod] for t in texts]


def read_megatron(prefix: str) -> list[list[int]]:
    from hope_dist.data.megatron_format import megatron_indexed_dataset

    ds = megatron_indexed_dataset().IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def run_tokenize(inputs, tokenizer, prefix, *extra) -> int:
    args = ["--input", *map(str, inputs), "--tokenizer", str(tokenizer), "--output-prefix",
            str(prefix), *map(str, extra)]
    return tokenize.main(args)


def write_format(kind: str, d: Path, texts: list[str]) -> Path:
    lines = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts))
    if kind == "jsonl":
        (d / "a.jsonl").write_text(lines)
    elif kind == "jsonl.gz":
        with gzip.open(d / "a.jsonl.gz", "wt") as f:
            f.write(lines)
    elif kind == "jsonl.zst":
        import zstandard

        (d / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": texts}), d / "a.parquet", row_group_size=7)
    elif kind == "txt":
        for i, t in enumerate(texts):
            (d / f"doc{i:03d}.txt").write_text(t, encoding="utf-8")
    elif kind in ("hf", "arrow"):
        import datasets

        datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(d / "hfds"))
        if kind == "arrow":
            return next((d / "hfds").glob("*.arrow"))
    return d


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "txt", "hf", "arrow"])
def test_round_trip_every_format(kind, tokenizer_json, tmp_path):
    texts = make_texts(40, seed=2)
    (tmp_path / "in").mkdir()
    src = write_format(kind, tmp_path / "in", texts)
    prefix = tmp_path / "out" / "ds"
    assert run_tokenize([src], tokenizer_json, prefix, "--shard-size-mb", 0.002) == 0
    assert read_megatron(str(prefix)) == hf_reference(tokenizer_json, texts)
    assert not (tmp_path / "out" / "ds.shards").exists()


def test_sentencepiece_model(tmp_path):
    import sentencepiece as spm

    texts = make_texts(60, seed=3)
    (tmp_path / "train.txt").write_text("\n".join(texts))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "train.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=90, user_defined_symbols=["<|endoftext|>"],
                                   minloglevel=2)
    src = write_format("jsonl", tmp_path, texts)
    assert run_tokenize([src / "a.jsonl"], tmp_path / "sp.model", tmp_path / "ds") == 0
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    eod = sp.piece_to_id("<|endoftext|>")
    assert read_megatron(str(tmp_path / "ds")) == [ids + [eod] for ids in sp.encode(texts)]


def test_tiktoken_engine_is_chosen_and_identical(tokenizer_json):
    with open(tokenizer_json) as f:
        assert tiktoken_incompatibility(json.load(f)) is None
    fast = load_encoder(tokenizer_json)
    assert isinstance(fast, TiktokenEncoder)
    texts = make_texts(200, seed=4, words=200)
    ref = [ids[:-1] for ids in hf_reference(tokenizer_json, texts)]
    assert fast.encode_batch(texts) == ref
    assert fast.fallback_documents == 0


def test_tiktoken_disagreement_falls_back_per_document(tmp_path):
    """A vocabulary where tiktoken's rank-greedy BPE and the merge list disagree on "abc"."""
    from hope_dist.data.encoders import byte_level_alphabet

    chars = {b: c for c, b in byte_level_alphabet().items()}
    vocab = {"<|endoftext|>": 0, **{chars[b]: 1 + b for b in range(256)}}
    for tok in ("ab", "bc", "abc"):
        vocab[tok] = len(vocab)
    spec = {"version": "1.0", "truncation": None, "padding": None, "normalizer": None,
            "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": False,
                              "lstrip": False, "rstrip": False, "normalized": False, "special": True}],
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                              "use_regex": True},
            "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True,
                                                "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": [["a", "b"], ["b", "c"], ["a", "bc"]]}}
    path = tmp_path / "abc.json"
    path.write_text(json.dumps(spec))
    fast = load_encoder(str(path))
    assert isinstance(fast, TiktokenEncoder)
    assert fast.enc.encode_ordinary("abc") != fast.reference.encode_batch(["abc"])[0]  # premise
    texts = ["abc abd", "bcd ab", "xabcx", "no such word"]
    assert fast.encode_batch(texts) == fast.reference.encode_batch(texts)
    assert fast.fallback_documents == 2  # the two documents holding a word where they differ


def test_one_and_two_workers_byte_identical(tokenizer_json, tmp_path):
    src = write_format("jsonl", tmp_path, make_texts(300, seed=5))
    outs = []
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}" / "ds"
        assert run_tokenize([src / "a.jsonl"], tokenizer_json, prefix, "--workers", workers,
                            "--shard-size-mb", 0.005) == 0
        outs.append((prefix.with_suffix(".bin").read_bytes(), prefix.with_suffix(".idx").read_bytes()))
    assert outs[0] == outs[1]
    assert len(read_megatron(str(tmp_path / "w2" / "ds"))) == 300


def test_sigkill_then_rerun_redoes_only_unfinished_shards(tokenizer_json, tmp_path):
    src = write_format("jsonl", tmp_path, make_texts(2000, seed=6, words=300))
    cmd = [sys.executable, "-m", "data_prep.tokenize", "--input", str(src / "a.jsonl"),
           "--tokenizer", tokenizer_json, "--shard-size-mb", "0.1", "--keep-shards"]
    shards = tmp_path / "crash" / "ds.shards"
    proc = subprocess.Popen(cmd + ["--output-prefix", str(tmp_path / "crash" / "ds")], cwd=REPO,
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.time() + 120
    while not list(shards.glob("*.done")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.done")}
    planned = len(json.loads((shards / "plan.json").read_text())["shards"])
    assert 0 < len(finished) < planned, "the kill must land mid-run"
    assert not (tmp_path / "crash" / "ds.done").exists()

    assert subprocess.run(cmd + ["--output-prefix", str(tmp_path / "crash" / "ds")], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                          check=True).stderr.count(f"{len(finished)} already finished") == 1
    assert {p: (shards / p).stat().st_mtime_ns for p in finished} == finished  # not redone
    assert len(list(shards.glob("*.done"))) == planned
    subprocess.run(cmd + ["--output-prefix", str(tmp_path / "clean" / "ds")], cwd=REPO,
                   capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / "crash" / f"ds{suffix}").read_bytes() == \
            (tmp_path / "clean" / f"ds{suffix}").read_bytes()


def test_damaged_shard_is_redone(tokenizer_json, tmp_path, capsys):
    src = write_format("jsonl", tmp_path, make_texts(200, seed=7))
    args = ([src / "a.jsonl"], tokenizer_json, tmp_path / "ds", "--shard-size-mb", 0.004)
    assert run_tokenize(*args, "--keep-shards") == 0
    victim = tmp_path / "ds.shards" / "000001.bin"
    victim.write_bytes(victim.read_bytes()[:-2])  # truncated after its marker was written
    (tmp_path / "ds.done").unlink()
    assert run_tokenize(*args) == 0
    assert "11 already finished, 1 to encode" in capsys.readouterr().err
    assert read_megatron(str(tmp_path / "ds")) == hf_reference(tokenizer_json, make_texts(200, seed=7))


def test_job_array_tasks_then_merge(tokenizer_json, tmp_path, capsys):
    texts = make_texts(150, seed=8)
    src = write_format("jsonl", tmp_path, texts)
    common = ([src / "a.jsonl"], tokenizer_json, tmp_path / "ds", "--shard-size-mb", 0.003)
    for task in (1, 0):
        assert run_tokenize(*common, "--shard-index", task, "--num-shards", 2) == 0
        assert not (tmp_path / "ds.bin").exists()
    assert run_tokenize(*common) == 0
    assert read_megatron(str(tmp_path / "ds")) == hf_reference(tokenizer_json, texts)
    assert run_tokenize(*common) == 0  # complete: nothing to do
    assert "nothing to do" in capsys.readouterr().out
    write_format("jsonl", tmp_path, texts[:100])  # changed input: rebuilt, not reused
    assert run_tokenize(*common) == 0
    assert read_megatron(str(tmp_path / "ds")) == hf_reference(tokenizer_json, texts[:100])


def test_malformed_lines_skipped_counted_or_strict(tokenizer_json, tmp_path, capsys):
    good = make_texts(5, seed=9)
    lines = [json.dumps({"text": good[0]}), "{not json", json.dumps({"text": good[1]}), "",
             json.dumps({"text": ""}), "[1, 2]", *(json.dumps({"text": t}) for t in good[2:])]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    assert run_tokenize([tmp_path / "a.jsonl"], tokenizer_json, tmp_path / "ds") == 0
    out = capsys.readouterr().out
    assert "skipped 3" in out and "malformed JSON: 1" in out and "empty text: 1" in out
    assert f"{tmp_path / 'a.jsonl'}:2" in out
    assert read_megatron(str(tmp_path / "ds")) == hf_reference(tokenizer_json, good)
    assert run_tokenize([tmp_path / "a.jsonl"], tokenizer_json, tmp_path / "s", "--strict") == 2
    assert f"{tmp_path / 'a.jsonl'}:2: malformed JSON" in capsys.readouterr().err


def test_line_numbers_in_later_shards(tokenizer_json, tmp_path, capsys):
    lines = [json.dumps({"text": t}) for t in make_texts(120, seed=10)]
    lines[97] = "{broken"
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    assert run_tokenize([tmp_path / "a.jsonl"], tokenizer_json, tmp_path / "ds", "--strict",
                        "--shard-size-mb", 0.002) == 2
    assert "a.jsonl:98: malformed JSON" in capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("missing_key", "no key 'text'"), ("empty", "no documents"), ("bad_tokenizer", "cannot read tokenizer"),
    ("no_input", "does not exist"), ("wrong_type", "unsupported file type")])
def test_bad_input_is_a_clear_error(case, message, tokenizer_json, tmp_path, capsys):
    src, tok = tmp_path / "a.jsonl", tokenizer_json
    src.write_text(json.dumps({"text": "hello"}) + "\n")
    if case == "missing_key":
        src.write_text(json.dumps({"content": "hello"}) + "\n")
    elif case == "empty":
        src.write_text("")
    elif case == "bad_tokenizer":
        tok = tmp_path / "tokenizer.json"
        tok.write_text('{"model": ')
    elif case == "no_input":
        src = tmp_path / "missing.jsonl"
    elif case == "wrong_type":
        src = tmp_path / "a.csv"
        src.write_text("text\nhello\n")
    assert run_tokenize([src], tok, tmp_path / "ds") == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "ds.bin").exists()


def test_train_tokenizer_defines_eod_and_all_bytes(tokenizer_json):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_json)
    assert tok.token_to_id("<|endoftext|>") == 0 and tok.get_vocab_size() == 400
    text = "ÿ\x00\x7f 😀 \u200b"
    assert tok.decode(tok.encode(text).ids) == text


def test_stdlib_corpus_is_deterministic_and_capped(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    stats = corpus.build(str(a), 0.3, include_site_packages=False)
    corpus.build(str(b), 0.3, include_site_packages=False)
    assert a.read_bytes() == b.read_bytes()
    docs = [json.loads(line)["text"] for line in a.read_text().splitlines()]
    assert len(docs) == stats["documents"] > 5 and len(set(docs)) == len(docs)
    assert sum(len(d.encode()) for d in docs) == stats["bytes"] <= 0.3e6
    assert any('"""' in d and "def " in d for d in docs)  # real sources with their docstrings
