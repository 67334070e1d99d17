"""What tests share besides fixtures (tests/conftest.py): the repository's paths, tiny job configs,
Megatron datasets written with megatron-core, trainers and their metrics. Imported as `helpers`
(pyproject's pytest pythonpath has tests/), also by scripts the tests run under torchrun."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"  # committed fixtures: recorded memory inputs, lm-eval tasks


def write_indexed_dataset(prefix: Path, docs: list[np.ndarray]) -> Path:
    """Write `docs` (token arrays, EOD included) as PREFIX.bin/.idx with megatron-core's builder."""
    from hope_dist.data.megatron_format import megatron_indexed_dataset

    builder = megatron_indexed_dataset().IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for doc in docs:
        builder.add_document(torch.as_tensor(doc.astype(np.int64)), [len(doc)])
    builder.finalize(str(prefix) + ".idx")
    return prefix


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
