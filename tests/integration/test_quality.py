"""The quality comparison's configs: equal parameters within 1% at every size, and the three CPU-size
models train and evaluate end to end through bench/bench_quality.py (a few steps, real processes)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hope_dist.config import load_config
from hope_dist.model import HopeModel, count_parameters

from bench import bench_quality
from helpers import REPO, write_indexed_dataset

SIZES = sorted({p.stem.split("_")[1] for p in (REPO / "configs/quality").glob("hope_*.yaml")})


@pytest.mark.parametrize("size", SIZES)
def test_equal_parameters_and_recipe(size):
    cfgs = {m: load_config(REPO / f"configs/quality/{m}_{size}.yaml", []) for m in bench_quality.MODELS}
    counts = {}
    for m, cfg in cfgs.items():
        with torch.device("meta"):
            counts[m] = count_parameters(HopeModel(cfg.model))["total"]
    assert {c.model.mixer for c in cfgs.values()} == {"selfmod", "titans", "attention"}
    assert max(counts.values()) / min(counts.values()) - 1 < 0.01, counts
    same = lambda c: (c.model.vocab_size, c.model.d_model, c.model.n_layers, c.model.n_heads, c.training, c.optim,
                      c.data, c.eval)
    assert len({repr(same(c)) for c in cfgs.values()}) == 1, "data, context, schedule and width must match"


@pytest.fixture(scope="module")
def long_documents(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    docs = [np.concatenate([np.resize(rng.integers(1, 96, int(rng.integers(3, 9))), 300), [0]]) for _ in range(40)]
    return write_indexed_dataset(tmp_path_factory.mktemp("quality") / "docs", docs)


def test_bench_quality_trains_and_reports(long_documents, tmp_path):
    out = tmp_path / "QUALITY.md"
    out.write_text("# kept title\n\nkept text\n")
    bench_quality.main([
        "--stages", "main", "report", "--seeds", "0", "--run-root", str(tmp_path / "runs"), "--out", str(out),
        "--eval-tokens", "500", "--long-factor", "2", "--long-docs", "2", "--passkey-doublings", "1",
        "--passkey-samples", "1", "--mqar-pairs", "4,8,16", "--mqar-samples", "2",
        "--training.steps=2", "--training.seq_len=64", "--training.global_batch=2", "--training.micro_batch=2",
        "--optim.warmup_steps=1", "--model.vocab_size=96", f"--data.paths=[{long_documents}]", "--data.tokenizer=null",
        "--data.eod_id=0", "--data.valid_fraction=0.1", "--eval.every=1", "--eval.tokens=128"])
    runs = [json.loads(x) for x in (tmp_path / "runs/results.jsonl").read_text().splitlines()]
    assert sorted(r["model"] for r in runs) == ["hope", "titans", "transformer"]
    for r in runs:
        assert r["finished"] and r["tokens"] == 2 * 2 * 64 and len(r["val_curve"]) == 2, r
        ev = r["eval"]
        assert ev["perplexity"]["tokens"] == 500 and np.isfinite(ev["perplexity"]["loss"])
        modes = ["reset"] if r["model"] == "transformer" else ["carry", "reset"]
        assert ev["long_context"]["modes"] == modes and ev["long_context"]["segment"] == 64
        assert [x["length"] for x in ev["passkey"]["by_length"]] == [64, 128]
        assert [x["pairs"] for x in ev["mqar"]["by_pairs"]] == [4, 8, 16]
    text = out.read_text()
    assert text.startswith("# kept title\n\nkept text\n")
    for label in ("| HOPE | 2,268,960 |", "| Titans | 2,268,464 |", "| Transformer++ | 2,268,800 |",
                  "HOPE within 2% of Transformer++"):
        assert label in text
    assert (tmp_path / "quality/val_loss.png").read_bytes()[:4] == b"\x89PNG"
