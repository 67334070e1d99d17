"""HopeModel's parallel plan: the one place that names the model's structure for the parallel code.

Every parameter gets a `ParamPlan`: how tensor parallelism splits it, which clock group steps it
(base, or the index of its CMS level) and which part of the model it counts under. The FSDP2 units
are listed here too. The generic code reads only this (clock.py, parallel/tensor_parallel.py,
parallel/fsdp.py, count_parameters), as torchtitan keeps one parallelize plan per model.

`check_plan` runs when a HopeModel is built: a parameter added to a module without an entry here
fails at once, on every layout, naming the parameter and this file.

The vocabulary (ParamPlan, the tensor-parallel kinds) is in plan_types.py; each mixer states the plan
of its own parameters (`parallel_plan()`), so a new mixer brings its plan in its own file.
"""
from __future__ import annotations

from collections.abc import Iterator
from torch import nn

from hope_dist.model.plan_types import TP_KINDS, ParamPlan, linear_plan  # noqa: F401 (the plan's vocabulary)


class PlanError(ValueError):
    """A parameter the plan does not cover (or covers twice): a model change the plan must follow."""


def _mixer_plan(mixer: nn.Module) -> dict[str, ParamPlan]:
    if not hasattr(mixer, "parallel_plan"):
        raise PlanError(f"{type(mixer).__name__} has no parallel plan: give it a parallel_plan() method "
                        "(hope_dist/model/plan_types.py has the vocabulary)")
    return mixer.parallel_plan()


def block_plan(block: nn.Module) -> dict[str, ParamPlan]:
    """Every parameter of a Block, keyed relative to it."""
    plan = {"mixer_norm.weight": ParamPlan("replicated", "norms_and_head")}
    plan.update({f"mixer.{k}": v for k, v in _mixer_plan(block.mixer).items()})
    for i, level in enumerate(block.cms.levels):
        clock, path = f"cms.{i}", f"cms.levels.{i}"
        plan[f"{path}.norm.weight"] = ParamPlan("replicated", "cms", clock)
        plan.update(linear_plan(level.mlp.gate, f"{path}.mlp.gate", "colwise", "cms", clock))
        plan.update(linear_plan(level.mlp.up, f"{path}.mlp.up", "colwise", "cms", clock))
        plan.update(linear_plan(level.mlp.down, f"{path}.mlp.down", "rowwise", "cms", clock))
    return plan


def model_plan(model: nn.Module) -> dict[str, ParamPlan]:
    """Every parameter of a HopeModel (or a pipeline stage's part of one), keyed as in
    named_parameters(); a tied head shares the embedding's entry."""
    plan: dict[str, ParamPlan] = {}
    if model.tok_embeddings is not None:
        plan["tok_embeddings.weight"] = ParamPlan("vocab_embedding", "embedding")
    for name, block in model.layers.items():
        plan.update({f"layers.{name}.{k}": v for k, v in block_plan(block).items()})
    if model.norm is not None:
        plan["norm.weight"] = ParamPlan("replicated", "norms_and_head")
    if model.output is not None and not (model.cfg.tie_embeddings and model.tok_embeddings is not None):
        plan["output.weight"] = ParamPlan("vocab_head", "norms_and_head")
    return plan


def check_plan(model: nn.Module) -> dict[str, ParamPlan]:
    """The plan, after checking it names exactly the model's parameters."""
    plan = model_plan(model)
    names = {n for n, _ in model.named_parameters()}
    missing, stale = sorted(names - plan.keys()), sorted(plan.keys() - names)
    if missing:
        raise PlanError(f"parameters {missing} have no entry in HopeModel's parallel plan "
                        "(hope_dist/model/parallel_plan.py): say how tensor parallelism splits each "
                        "(colwise/rowwise Linear, a head axis in the mixer's parallel_plan(), local or replicated), "
                        "so every layout shards, clocks and counts it")
    if stale:
        raise PlanError(f"HopeModel's parallel plan (hope_dist/model/parallel_plan.py) names parameters the "
                        f"model does not have: {stale}")
    return plan


def cms_levels(model: nn.Module) -> Iterator[tuple[int, nn.Module]]:
    """(level index, level module) of every block: the modules that carry period and lr_scale."""
    for block in model.layers.values():
        yield from enumerate(block.cms.levels)


def tp_group_users(block: nn.Module) -> list[nn.Module]:
    """Modules of a block that run a collective over the tp group themselves (in-context CMS levels)."""
    return list(block.cms.levels)


def fsdp_units(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, clock group) of every FSDP2 unit, inner units first: each CMS level alone (so it can
    skip its reduction between ticks), the rest of each block, the embedding, final norm and head."""
    units: list[tuple[nn.Module, str]] = []
    for block in model.layers.values():
        units += [(level, f"cms.{i}") for i, level in enumerate(block.cms.levels)]
        units.append((block, "base"))
    units += [(m, "base") for m in (model.tok_embeddings, model.norm, model.output) if m is not None]
    return units
