"""Config loading, overrides and validation: every bad input is an error naming its key."""
import dataclasses
import subprocess
import sys
import typing

import pytest

from hope_dist.config import CMSLevel, ConfigError, JobConfig, ModelConfig, field_docs, load_config, parse_args
from hope_dist.parallel.mesh import check_world_size

from helpers import REPO



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


def _documented_keys(cls, prefix=""):
    """(dotted key, docstring) of every field, walked independently of the --help code."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _documented_keys(tp, f"{prefix}{f.name}.")
            continue
        assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
        yield prefix + f.name, docs[f.name]
        if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            yield from _documented_keys(typing.get_args(tp)[0], f"{prefix}{f.name}[i].")


def test_help_lists_every_key_with_type_default_and_docstring():
    out = subprocess.run([sys.executable, "hope_dist/pretrain.py", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: pretrain.py --config")
    lines = {line.split()[0]: line for line in out.stdout.splitlines() if line.startswith("  ")}
    keys = dict(_documented_keys(JobConfig))
    assert len(keys) > 80 and set(lines) == set(keys)
    for key, doc in keys.items():
        assert lines[key].rstrip().endswith(doc), lines[key]
    assert "model.d_model" in lines and " int = 64 " in lines["model.d_model"]
    assert "selfmod|titans|attention = selfmod" in lines["model.mixer"]
    assert "[{period: 1}, {period: 4}, {period: 16}, {period: 64}]" in lines["model.cms"]


@pytest.mark.parametrize("override, message", [
    ("--model.kernel=cuda", "model.kernel='cuda' is not one of auto, triton, torch, naive"),
    ("--training.nonfinite=3", "training.nonfinite=3 is not one of stop, skip"),
    ("--checkpoint.on_save_error=retry", "checkpoint.on_save_error='retry' is not one of stop, continue"),
    ("--model.chunk=16", "'model.chunk': it was renamed to 'model.chunk_size'"),
    ("--model.proj_chunk=16", "renamed to 'model.proj_chunk_size'"),
    ("--model.cms=[{width: 8, period: 1}, {width: 8, period: 2, chunk: 4}]",
     "'model.cms[1].chunk': it was renamed to 'model.cms[1].chunk_size'"),
    ("--parallel.microbatches=2", "renamed to 'parallel.pp_microbatches'"),
    ("--model.memory_depth=3", "model.memory_depth=3 must be 1 (linear) or 2 (residual MLP)"),
    ("--model.cms=[]", "model.cms is empty"),
    ("--optim.lr=0", "optim.lr=0.0 must be > 0"),
    ("--checkpoint.keep_last=0", "checkpoint.keep_last=0 must be >= 1"),
    ("--eval.every=-1", "eval.every=-1 must be >= 0"),
    ("--parallel.pp_microbatches=0", "parallel.pp_microbatches=0 must be >= 1"),
])
def test_choices_renames_and_field_ranges_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", [override])
    assert message in str(err.value)


def test_sections_check_their_own_fields_on_construction():
    """Single-field ranges hold for configs built in code too (the message names the field);
    cross-field checks wait for validate()."""
    with pytest.raises(ConfigError, match=r"period=0 must be >= 1 \(1 = every step\)"):
        CMSLevel(64, 0)
    with pytest.raises(ConfigError, match=r"alpha_init=1\.0 must be in \(0, 1\)"):
        ModelConfig(alpha_init=1.0)
    cfg = JobConfig(model=ModelConfig(d_model=64, n_heads=5))
    with pytest.raises(ConfigError, match="model.n_heads=5 does not divide model.d_model=64"):
        cfg.validate()
