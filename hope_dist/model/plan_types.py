"""The parallel plan's vocabulary (what parallel_plan.py and each mixer's own `parallel_plan` speak).

Tensor-parallel kinds (docs/model.md section 5):
- colwise / rowwise: an nn.Linear split on its outputs (whole heads or hidden units per rank) /
  on its inputs (its output summed over tp);
- vocab_embedding / vocab_head: the embedding and LM head split over the vocabulary;
- heads: a parameter with a head axis, sharded there; the mixer computes with the local shard;
- local: replicated but used on this rank's heads only, so its gradient is summed over tp;
- replicated: every rank computes the same with it.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

TP_KINDS = ("colwise", "rowwise", "vocab_embedding", "vocab_head", "heads", "local", "replicated")


@dataclass(frozen=True)
class ParamPlan:
    tp: str  # one of TP_KINDS
    part: str  # count_parameters' part: embedding | mixer | cms | norms_and_head
    clock: str = "base"  # the clock group: base, or cms.<level index>
    head_axis: int | None = None  # tp == "heads": the axis split over tp ranks


def linear_plan(module: nn.Module, path: str, tp: str, part: str, clock: str = "base") -> dict[str, ParamPlan]:
    """The plan of an nn.Linear's own parameters (weight, bias) under `path`."""
    return {f"{path}.{n}": ParamPlan(tp, part, clock) for n, _ in module.named_parameters(recurse=False)}


def projections_plan(mixer: nn.Module) -> dict[str, ParamPlan]:
    """Every mixer's input projections (column-parallel by head) and output projection (row-parallel)."""
    plan: dict[str, ParamPlan] = {}
    for name, lin in mixer.proj.items():
        plan.update(linear_plan(lin, f"proj.{name}", "colwise", "mixer"))
    plan.update(linear_plan(mixer.out, "out", "rowwise", "mixer"))
    return plan
