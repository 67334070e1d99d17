"""Config loading, overrides and validation: every bad input is an error naming its key."""
import pytest

from hope_dist.config import ConfigError, load_config, parse_args
from hope_dist.parallel.mesh import check_world_size


def test_tiny_config_loads_with_overrides():
    cfg = load_config("configs/tiny.yaml", ["--model.d_model=128", "--training.steps=7",
                                            "--metrics.wandb=false", "--model.cms=[{width: 8, period: 2}]"])
    assert cfg.model.d_model == 128 and cfg.training.steps == 7 and cfg.metrics.wandb is False
    assert [(lvl.width, lvl.period) for lvl in cfg.model.cms] == [(8, 2)]


@pytest.mark.parametrize("override, key", [
    ("--model.d_modle=64", "model.d_modle"),
    ("--trainin.steps=3", "trainin"),
    ("--model.n_heads=5", "model.n_heads"),
    ("--model.cms=[{width: 8, period: 0}]", "model.cms[0].period"),
    ("--model.cms=[{width: 8, period: 1, speed: 2}]", "model.cms[0].speed"),
    ("--model.mixer=mamba", "model.mixer"),
    ("--model.proj_chunk_size=24", "model.proj_chunk_size"),
    ("--training.steps=many", "training.steps"),
    ("--metrics.wandb=perhaps", "metrics.wandb"),
    ("--parallel.tp=3", "parallel.tp"),
    ("--parallel.pp=9", "parallel.pp"),
    ("--training.global_batch=6", "training.global_batch"),
])
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config("configs/tiny.yaml", [override])


def test_missing_config_file_and_bad_override_form():
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config("configs/nope.yaml")
    with pytest.raises(ConfigError, match="--key.sub=value"):
        parse_args(["--config", "configs/tiny.yaml", "model.d_model"])


def test_resume_flag_maps_to_checkpoint_resume():
    assert parse_args(["--config=configs/tiny.yaml", "--resume=never"]).checkpoint.resume == "never"
    assert parse_args(["--config", "configs/tiny.yaml", "--resume"]).checkpoint.resume == "auto"


def test_world_size_mismatch_names_sizes_and_a_fit():
    cfg = load_config("configs/tiny.yaml", ["--parallel.tp=2"])
    check_world_size(cfg.parallel, 2)
    with pytest.raises(ConfigError, match=r"tp=2 = 2 ranks, but the world size is 4: .*dp_shard=2"):
        check_world_size(cfg.parallel, 4)
