"""HopeModel's parallel plan: the one place that names the model's structure for the parallel code.

Every parameter gets a `ParamPlan`: how tensor parallelism splits it, which clock group steps it
(base, or the index of its CMS level) and which part of the model it counts under. The FSDP2 units
are listed here too. The generic code reads only this (clock.py, parallel/tensor_parallel.py,
parallel/fsdp.py, count_parameters), as torchtitan keeps one parallelize plan per model.

`check_plan` runs when a HopeModel is built: a parameter added to a module without an entry here
fails at once, on every layout, naming the parameter and this file.

Tensor-parallel kinds (docs/model.md section 5):
- colwise / rowwise: an nn.Linear split on its outputs (whole heads or hidden units per rank) /
  on its inputs (its output summed over tp);
- vocab_embedding / vocab_head: the embedding and LM head split over the vocabulary;
- heads: a parameter with a head axis, sharded there; the mixer computes with the local shard;
- local: replicated but used on this rank's heads only, so its gradient is summed over tp;
- replicated: every rank computes the same with it.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from hope_dist.model.attention import AttentionMixer
from hope_dist.model.memory_mixer import MemoryMixer

TP_KINDS = ("colwise", "rowwise", "vocab_embedding", "vocab_head", "heads", "local", "replicated")

# head axis of the memory mixer's own parameters (mem_w*: (n_mem, H, ., .); the rest: (H, ...))
MEMORY_MIXER_HEAD_AXIS = {"mem_w1": 1, "mem_w2": 1, "eta_w": 0, "eta_b": 0, "alpha_w": 0, "alpha_b": 0, "gamma": 0}


class PlanError(ValueError):
    """A parameter the plan does not cover (or covers twice): a model change the plan must follow."""


@dataclass(frozen=True)
class ParamPlan:
    tp: str  # one of TP_KINDS
    part: str  # count_parameters' part: embedding | mixer | cms | norms_and_head
    clock: str = "base"  # the clock group: base, or cms.<level index>
    head_axis: int | None = None  # tp == "heads": the axis split over tp ranks


def _linear(module: nn.Module, path: str, tp: str, part: str, clock: str = "base") -> dict[str, ParamPlan]:
    return {f"{path}.{n}": ParamPlan(tp, part, clock) for n, _ in module.named_parameters(recurse=False)}


def _mixer_plan(mixer: nn.Module) -> dict[str, ParamPlan]:
    """Keys relative to the mixer."""
    plan: dict[str, ParamPlan] = {}
    for name, lin in mixer.proj.items():
        plan.update(_linear(lin, f"proj.{name}", "colwise", "mixer"))
    plan.update(_linear(mixer.out, "out", "rowwise", "mixer"))
    if isinstance(mixer, AttentionMixer):
        return plan
    if not isinstance(mixer, MemoryMixer):
        raise PlanError(f"{type(mixer).__name__} has no parallel plan: add one to hope_dist/model/parallel_plan.py")
    if not mixer.selfmod:  # titans' rate read-outs: one output per head, split like the projections
        for name, lin in mixer.rates.items():
            plan.update(_linear(lin, f"rates.{name}", "colwise", "mixer"))
    for name in mixer.conv:  # channels are heads x d_h, head-major
        plan[f"conv.{name}.weight"] = ParamPlan("heads", "mixer", head_axis=0)
    for name, axis in MEMORY_MIXER_HEAD_AXIS.items():
        if getattr(mixer, name, None) is not None:
            plan[name] = ParamPlan("heads", "mixer", head_axis=axis)
    plan["out_norm.weight"] = ParamPlan("local", "mixer")  # one RMSNorm shared by all heads
    return plan


def block_plan(block: nn.Module) -> dict[str, ParamPlan]:
    """Every parameter of a Block, keyed relative to it."""
    plan = {"mixer_norm.weight": ParamPlan("replicated", "norms_and_head")}
    plan.update({f"mixer.{k}": v for k, v in _mixer_plan(block.mixer).items()})
    for i, level in enumerate(block.cms.levels):
        clock, path = f"cms.{i}", f"cms.levels.{i}"
        plan[f"{path}.norm.weight"] = ParamPlan("replicated", "cms", clock)
        plan.update(_linear(level.mlp.gate, f"{path}.mlp.gate", "colwise", "cms", clock))
        plan.update(_linear(level.mlp.up, f"{path}.mlp.up", "colwise", "cms", clock))
        plan.update(_linear(level.mlp.down, f"{path}.mlp.down", "rowwise", "cms", clock))
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
                        "(colwise/rowwise Linear, a head axis in MEMORY_MIXER_HEAD_AXIS, local or replicated), "
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
