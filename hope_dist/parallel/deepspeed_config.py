"""The user's DeepSpeed config file (parallel.ds_config), read and checked against the keys hope_dist sets.

Config validation calls it before any process starts; the engine (deepspeed_engine.py) merges the
generated keys over it. Takes plain values, so the config layer imports nothing of the engine.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from hope_dist.config_loading import ConfigError

# DeepSpeed keys the trainer sets itself, and the hope_dist key that sets them
OWNED = {"train_batch_size": "training.global_batch", "train_micro_batch_size_per_gpu": "training.micro_batch",
         "gradient_accumulation_steps": "training.global_batch", "gradient_clipping": "optim.grad_clip",
         "gradient_allreduce_op": "(always sum: token-sum loss)", "optimizer": "optim.*", "scheduler": "optim.*",
         "fp16": "training.mixed_precision", "bf16": "training.mixed_precision", "comms_logger": "(bytes_reduced)"}


def read_user_config(ds_config: str | None, zero_stage: int) -> dict:
    """parallel.ds_config's mapping ({} when unset), checked: no key hope_dist sets, the same ZeRO stage, no offload."""
    if ds_config is None:
        return {}
    try:
        user = yaml.safe_load(Path(ds_config).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"parallel.ds_config={ds_config!r} is not a readable JSON/YAML file ({e})") from None
    if not isinstance(user, dict):
        raise ConfigError(f"parallel.ds_config={ds_config!r} must hold a mapping (a DeepSpeed config)")
    for key, ours in OWNED.items():
        if key in user:
            raise ConfigError(f"parallel.ds_config={ds_config!r} sets {key!r}, which hope_dist sets from {ours}: "
                              f"remove it from the file")
    zero = user.get("zero_optimization") or {}
    if zero.get("stage", zero_stage) != zero_stage:
        raise ConfigError(f"parallel.ds_config={ds_config!r} has zero_optimization.stage={zero['stage']} but "
                          f"parallel.zero_stage={zero_stage}: set --parallel.zero_stage={zero['stage']} (1 or 2) to "
                          f"match, or drop the stage from the file")
    if zero.get("offload_optimizer") or zero.get("offload_param"):
        raise ConfigError(f"parallel.ds_config={ds_config!r} enables ZeRO offload, which this engine does not "
                          f"support (it needs DeepSpeed's CPU Adam ops): remove offload_optimizer/offload_param")
    return user
