"""Layout errors come before any work, and the pipeline split is balanced (no processes)."""
from __future__ import annotations

import pytest

from hope_dist.config import ConfigError, ParallelConfig, load_config
from hope_dist.model import build_model
from hope_dist.parallel.mesh import check_world_size
from hope_dist.parallel.pipeline import balanced_split, describe_split, plan_stages
from hope_dist.trainer import Trainer

from helpers import tiny_overrides


def test_mesh_that_does_not_fit_names_sizes_and_a_fit():
    with pytest.raises(ConfigError) as e:
        check_world_size(ParallelConfig(pp=2, dp_shard=3, tp=2), 8)
    msg = str(e.value)
    assert "pp=2 x dp_replicate=1 x dp_shard=3 x tp=2 = 12 ranks" in msg and "world size is 8" in msg
    assert "--parallel.dp_shard=2" in msg  # 2 x 2 x 2 = 8 fits
    with pytest.raises(ConfigError, match="--parallel.dp_replicate=6"):
        check_world_size(ParallelConfig(tp=4), 6)  # 4 does not divide 6: fall back to pure dp


def test_trainer_rejects_layout_before_any_work(random_dataset, tmp_path, monkeypatch):
    """torchrun with 4 ranks but a 2-rank layout: the error comes before the process group,
    the data or the model exist (no rendezvous is attempted, so this returns at once)."""
    prefix, vocab, eod = random_dataset
    cfg = load_config(None, tiny_overrides(prefix, vocab, eod, tmp_path / "run", **{"parallel.tp": 2}))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="= 2 ranks, but the world size is 4"):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, key", [
    ({"parallel.tp": 3, "model.n_heads": 4, "model.d_model": 48}, "does not divide model.n_heads=4"),
    ({"parallel.pp": 3, "model.n_layers": 2}, "parallel.pp=3 is larger than model.n_layers=2"),
    ({"parallel.tp": 2, "model.vocab_size": 97}, "not divisible by parallel.tp=2"),
    ({"parallel.pp": 2, "parallel.pp_microbatches": 3}, "multiple of parallel.pp_microbatches=3"),
    ({"parallel.pp": 2, "parallel.pp_microbatches": 1}, "must be a multiple of parallel.pp=2"),
    ({"parallel.pp": 2, "parallel.pp_microbatches": 2, "parallel.pp_schedule": "interleaved_1f1b"},
     "model.n_layers=2 must be >= 4"),
])
def test_bad_layouts_are_config_errors(random_dataset, tmp_path, override, key):
    prefix, vocab, eod = random_dataset
    with pytest.raises(ConfigError, match=key.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, tiny_overrides(prefix, vocab, eod, tmp_path, **override))


def test_balanced_split_minimises_the_largest_stage():
    assert balanced_split([10, 10, 10, 30], 2) == [[0, 1, 2], [3]]
    assert balanced_split([10, 10, 10, 10], 2) == [[0, 1], [2, 3]]
    # a large embedding on the first stage pushes layers to the later stages
    assert balanced_split([10, 10, 10, 10], 2, first_extra=20) == [[0], [1, 2, 3]]
    assert balanced_split([5, 5, 5, 5], 4) == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="at least 3 layers"):
        balanced_split([1, 1], 3)


def test_split_of_a_real_model_is_printed_by_parameters(random_dataset, tmp_path):
    prefix, vocab, eod = random_dataset
    cfg = load_config(None, tiny_overrides(prefix, vocab, eod, tmp_path, **{"model.n_layers": 4}))
    model = build_model(cfg.model)
    split = plan_stages(model, 2)
    assert sorted(i for s in split for i in s) == [0, 1, 2, 3] and all(split)
    text = describe_split(model, split, 2)
    total = sum(int(line.rsplit(", ", 1)[1].split()[0].replace(",", "")) for line in text.splitlines())
    assert total == sum(p.numel() for p in model.parameters())
    assert "+ embedding" in text.splitlines()[0] and "+ norm/head" in text.splitlines()[-1]
