"""The rank layout: pp x dp_replicate x dp_shard x tp must equal the world size."""
from __future__ import annotations

from hope_dist.config import ConfigError, ParallelConfig


def check_world_size(p: ParallelConfig, world: int) -> None:
    """Fail before any work starts when the layout does not fit the ranks, and suggest one."""
    product = p.pp * p.dp_replicate * p.dp_shard * p.tp
    if product == world:
        return
    fit = world // (p.pp * p.tp) if world % (p.pp * p.tp) == 0 else None
    hint = (f"keep pp={p.pp}, tp={p.tp} and use --parallel.dp_shard={fit} --parallel.dp_replicate=1"
            if fit else f"e.g. --parallel.dp_replicate={world} --parallel.dp_shard=1 --parallel.tp=1 --parallel.pp=1")
    raise ConfigError(
        f"parallel layout pp={p.pp} x dp_replicate={p.dp_replicate} x dp_shard={p.dp_shard} x tp={p.tp} "
        f"= {product} ranks, but the world size is {world}: {hint}")
