"""Held-out validation during training (data/validation.py, Trainer.validate): a document-level split
that training never sees, a loss that resets the memories at every document as training does, and
errors that name the key. (Equality under every parallel layout: tests/integration/test_parallel_equivalence.py.)"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hope_dist.config import ConfigError, load_config
from hope_dist.data import build_train_stream
from hope_dist.data.validation import split_documents

from helpers import make_trainer, tiny_overrides, write_indexed_dataset

EOD = 0


@pytest.fixture(scope="module")
def labelled_dataset(tmp_path_factory):
    """Document i is made only of token i + 1 (then EOD): every token says which document it is from."""
    rng = np.random.default_rng(1)
    docs = [np.concatenate([np.full(int(rng.integers(5, 40)), i + 1), [EOD]]) for i in range(300)]
    prefix = tmp_path_factory.mktemp("labelled") / "docs"
    return write_indexed_dataset(prefix, docs), 320, EOD


def test_split_is_fixed_disjoint_and_complete():
    train, valid = split_documents(1000, 0.05)
    assert len(valid) == 50 and len(train) == 950
    assert not set(train) & set(valid) and set(train) | set(valid) == set(range(1000))
    assert np.array_equal(split_documents(1000, 0.05)[1], valid)  # independent of any training seed


def test_training_never_sees_held_out_documents(labelled_dataset, tmp_path):
    prefix, vocab, eod = labelled_dataset
    _, held = split_documents(300, 0.1)
    held_ids = set((held + 1).tolist())
    for seed in (0, 1):
        stream = build_train_stream([str(prefix)], None, seq_len=16, global_batch=4, dp_rank=0, dp_size=1,
                                    seed=seed, eod_id=eod, valid_fraction=0.1)
        per_epoch = stream.datasets[0].per_epoch
        seen = np.concatenate([stream.sample(j) for j in range(per_epoch)])
        assert not held_ids & set(seen.tolist())
        assert len(set(seen.tolist()) - {eod}) == 300 - len(held)  # and every other document is used
    trainer = make_trainer(labelled_dataset, tmp_path, **{"data.valid_fraction": 0.1, "eval.every": 1,
                                                          "eval.tokens": 10_000})
    rows = np.concatenate([b["tokens"].numpy() for b in trainer.valid.batches()])
    assert set(rows.ravel().tolist()) - {eod} <= held_ids


def test_validation_loss_resets_the_state_at_every_document(random_dataset, tmp_path):
    """Trainer.validate == every document piece of every row scored alone from a fresh state."""
    trainer = make_trainer(random_dataset, tmp_path, **{"data.valid_fraction": 0.1, "eval.every": 1,
                                                        "eval.tokens": 200})
    got = trainer.validate()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in trainer.valid.batches():
            for tokens, labels in zip(batch["tokens"], batch["labels"]):
                ends = (tokens == EOD).nonzero().flatten().tolist()
                for start, end in zip([0] + [e + 1 for e in ends], ends + [len(tokens) - 1]):
                    if start > end:
                        continue
                    logits = trainer.model(tokens[None, start:end + 1])
                    total += F.cross_entropy(logits[0].double(), labels[start:end + 1], reduction="sum").item()
                    count += end + 1 - start
    assert got["val_tokens"] == count == trainer.valid.num_tokens >= 200
    assert got["val_loss"] == pytest.approx(total / count, rel=1e-5)


def test_trainer_logs_validation_and_memory_health(random_dataset, tmp_path):
    trainer = make_trainer(random_dataset, tmp_path, **{"data.valid_fraction": 0.05, "eval.every": 3,
                                                        "training.steps": 7})
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 5, 6]  # every 3 steps and after the last
    assert all(np.isfinite(r["val_loss"]) and r["val_ppl"] == pytest.approx(np.exp(r["val_loss"]))
               for r in rows if "val_loss" in r)
    for r in rows:
        for layer in ("L0", "L1"):
            assert 0 < r[f"mem/{layer}/fw_norm_max"] < 100 and 0 < r[f"mem/{layer}/alpha_mean"] < 1
            assert r[f"mem/{layer}/fw_norm_mean"] <= r[f"mem/{layer}/fw_norm_max"]


@pytest.mark.parametrize("extra,match", [
    ({"eval.every": 5}, "eval.every=5 needs validation data"),
    ({"data.valid_fraction": 1.0}, "data.valid_fraction=1.0 must be in"),
    ({"data.valid_fraction": 0.1, "data.valid_paths": "[x]"}, "not both"),
    ({"eval.tokens": 0}, "eval.tokens=0 must be >= 1"),
])
def test_config_errors_name_the_key(random_dataset, tmp_path, extra, match):
    prefix, vocab, eod = random_dataset
    with pytest.raises(ConfigError, match=match):
        load_config(None, tiny_overrides(prefix, vocab, eod, tmp_path, **extra))


def test_bad_validation_data_is_named(random_dataset, tmp_path):
    tiny = write_indexed_dataset(tmp_path / "tiny", [np.array([5, 6, EOD])])
    with pytest.raises(ValueError, match=r"tiny.*fewer than one global batch.*data.valid_paths"):
        make_trainer(random_dataset, tmp_path / "a", **{"data.valid_paths": f"[{tiny}]", "eval.every": 1})
    wide = write_indexed_dataset(tmp_path / "wide", [np.array([5, 500, EOD])] * 100)
    with pytest.raises(ValueError, match=r"token id 500 >= model.vocab_size=96.*re-tokenize"):
        make_trainer(random_dataset, tmp_path / "b", **{"data.valid_paths": f"[{wide}]", "eval.every": 1})
    with pytest.raises(Exception, match="missing"):
        make_trainer(random_dataset, tmp_path / "c", **{"data.valid_paths": f"[{tmp_path / 'missing'}]",
                                                        "eval.every": 1})

