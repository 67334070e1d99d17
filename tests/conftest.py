"""Shared fixtures: small real Megatron datasets and tiny configs (no mocks)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU; must precede their import
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)


def write_indexed_dataset(prefix: Path, docs: list[np.ndarray]) -> Path:
    """Write `docs` (token arrays, EOD included) as PREFIX.bin/.idx with megatron-core's builder."""
    from data_prep.megatron_format import megatron_indexed_dataset

    builder = megatron_indexed_dataset().IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for doc in docs:
        builder.add_document(torch.as_tensor(doc.astype(np.int64)), [len(doc)])
    builder.finalize(str(prefix) + ".idx")
    return prefix


@pytest.fixture(scope="session")
def random_dataset(tmp_path_factory) -> tuple[Path, int, int]:
    """A learnable synthetic corpus: documents of a repeating pattern, EOD = 0. Returns
    (prefix, vocab_size, eod_id)."""
    rng = np.random.default_rng(0)
    vocab, eod = 96, 0
    docs = []
    for _ in range(400):
        period = int(rng.integers(2, 6))
        pattern = rng.integers(1, vocab, size=period)
        length = int(rng.integers(20, 90))
        docs.append(np.concatenate([np.resize(pattern, length), [eod]]))
    prefix = tmp_path_factory.mktemp("data") / "synthetic"
    return write_indexed_dataset(prefix, docs), vocab, eod


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory) -> Path:
    """A small byte-level BPE tokenizer.json (ids < 96, <|endoftext|> = 0) trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=96, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=list("abcdefghijklmnopqrstuvwxyz .,"))
    tok.train_from_iterator(["the cat sat on the mat, the dog sat on the log."] * 20, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def tiny_overrides(prefix: Path, vocab: int, eod: int, run_dir: Path, **extra) -> list[str]:
    """Command-line overrides for a tiny CPU job on `prefix`."""
    base = {
        "run_dir": run_dir, "model.vocab_size": vocab, "model.d_model": 32, "model.n_layers": 2,
        "model.n_heads": 2, "model.chunk_size": 8, "model.proj_chunk_size": 16,
        "model.cms": "[{width: 32, period: 1}, {width: 32, period: 2}, {width: 32, period: 4}]",
        "training.steps": 8, "training.seq_len": 32, "training.global_batch": 4, "training.micro_batch": 2,
        "optim.warmup_steps": 2, "optim.lr": 3e-3, "data.paths": f"[{prefix}]", "data.eod_id": eod,
        "metrics.wandb": False, "metrics.progress": False, "checkpoint.interval": 0,
        "eval.every": 0, "data.valid_fraction": 0.0,  # tests that validate opt in
    }
    base.update(extra)
    return [f"--{k}={v}" for k, v in base.items()]


def make_trainer(dataset: tuple[Path, int, int], run_dir: Path, **extra):
    """A Trainer for the tiny job on `dataset` (as returned by the random_dataset fixture)."""
    from hope_dist.config import load_config
    from hope_dist.trainer import Trainer

    prefix, vocab, eod = dataset
    return Trainer(load_config(None, tiny_overrides(prefix, vocab, eod, run_dir, **extra)))


def read_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from RUN_DIR/metrics.jsonl (a resumed run's later rows win)."""
    import json

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}
