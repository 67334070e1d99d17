"""CMS clocks (docs/model.md section 4): who steps at optimizer step s, and the window accumulators.

Parameters are split into clock groups: `base` (everything that is not a CMS level with
period > 1; period 1) and one group per CMS level index `cms.<l>` (level l of every layer
ticks together). At 0-based step s a group ticks iff (s + 1) % period == 0.

Between ticks a group's gradients are summed locally in float32 (over micro-batches and
steps) and its optimizer never sees them; on a tick the window sum is handed back as .grad,
reduced once over the data-parallel group, divided by the window's global token count, and
the group's optimizer state steps once. The accumulators and token counts are training state.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

_LEVEL = re.compile(r"(?:^|\.)cms\.levels\.(\d+)\.")


@dataclass
class ClockGroup:
    name: str
    period: int
    lr_scale: float
    params: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    window_tokens: int = 0  # global tokens seen since this group's last tick

    def ticks(self, step: int) -> bool:
        return (step + 1) % self.period == 0


def build_clock_groups(model: nn.Module) -> list[ClockGroup]:
    """Group parameters by clock, reading period and lr_scale from the CMS level modules."""
    levels: dict[int, tuple[int, float]] = {}
    for name, module in model.named_modules():
        m = _LEVEL.search(name + ".")
        if m and hasattr(module, "period") and name.endswith(f"levels.{m.group(1)}"):
            levels[int(m.group(1))] = (module.period, module.lr_scale)
    groups = {"base": ClockGroup("base", 1, 1.0)}
    for idx, (period, scale) in sorted(levels.items()):
        groups[f"cms.{idx}"] = ClockGroup(f"cms.{idx}", period, scale)
    for name, p in model.named_parameters():
        m = _LEVEL.search(name)
        groups[f"cms.{m.group(1)}" if m else "base"].params.append((name, p))
    return [g for g in groups.values() if g.params]


class CMSClock:
    """Holds a float32 window accumulator for every parameter of a clocked group (period > 1),
    allocated up front so a checkpoint always has the same keys."""

    def __init__(self, groups: list[ClockGroup]):
        self.groups = groups
        self.acc: dict[str, torch.Tensor] = {
            name: torch.zeros_like(p, dtype=torch.float32)
            for g in groups if g.period > 1 for name, p in g.params}

    def ticking(self, step: int) -> list[ClockGroup]:
        return [g for g in self.groups if g.ticks(step)]

    def advance(self, step: int, step_tokens: int) -> list[ClockGroup]:
        """After the backward passes of `step`: bank the gradients of clocked groups, and hand
        the window sums back as .grad to those that tick now. Returns the ticking groups."""
        for g in self.groups:
            g.window_tokens += step_tokens
            if g.period == 1:
                continue
            tick = g.ticks(step)
            for name, p in g.params:
                acc = self.acc[name]
                if p.grad is not None:
                    acc.add_(p.grad)
                p.grad = acc.to(p.dtype, copy=True) if tick else None
                if tick:
                    acc.zero_()
        return self.ticking(step)

    @staticmethod
    def finish_tick(groups: list[ClockGroup]) -> None:
        for g in groups:
            g.window_tokens = 0

    def state_dict(self) -> dict:
        return {"acc": self.acc, "window_tokens": {g.name: g.window_tokens for g in self.groups}}

    def load_state_dict(self, state: dict) -> None:
        for name, t in state["acc"].items():
            self.acc[name].copy_(t)
        for g in self.groups:
            g.window_tokens = int(state["window_tokens"][g.name])
