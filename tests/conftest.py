"""Shared fixtures: small real Megatron datasets and a tokenizer (no mocks); plain helpers are in
tests/helpers. Sets the environment every test process needs before torch or Triton load."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import write_indexed_dataset

os.environ.setdefault("WANDB_MODE", "disabled")
if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU; must precede their import
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)


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


# pytest-xdist (`-n 2`, pyproject addopts) runs tests on two workers. Tests that share one machine-wide
# resource stay on one worker, in file order: the SLURM cluster (apt-get, munge and the daemons).
SERIAL_MODULES = {"test_slurm_launch": "slurm", "test_launch_errors": "slurm", "test_faults": "slurm"}


# Started first, so that no worker is left running one of them alone at the end (longest first).
LONG_TESTS = ("test_tiny_hope_learns_the_stdlib", "test_gpu_check_dry_run_writes_every_row")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups into the node ids
def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: (item.originalname not in LONG_TESTS, "slow" not in item.keywords))
    for item in items:
        group = SERIAL_MODULES.get(item.module.__name__.rsplit(".", 1)[-1])
        if group is None and "cluster" in item.fixturenames:  # any other test on the SLURM cluster
            group = "slurm"
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


def pytest_collection_finish(session):
    """On an xdist worker, refuse to run if the groups did not reach the node ids (the SLURM tests would
    then start two clusters that collide on rendezvous ports)."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    lost = [i.nodeid for i in session.items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
    if lost:
        raise pytest.UsageError(f"pytest-xdist's --dist loadgroup did not tag {lost[0]} with its group "
                                f"(pytest {pytest.__version__}): install the pytest pinned in pyproject.toml")
