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

from dataclasses import dataclass, field

import torch
from torch import nn

from hope_dist.model.parallel_plan import cms_levels, model_plan


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
    """Group a HopeModel's parameters by the clock its parallel plan names, reading period and
    lr_scale from the CMS level modules."""
    levels = {i: (level.period, level.lr_scale) for i, level in cms_levels(model)}
    groups = {"base": ClockGroup("base", 1, 1.0)}
    for idx, (period, scale) in sorted(levels.items()):
        groups[f"cms.{idx}"] = ClockGroup(f"cms.{idx}", period, scale)
    plan = model_plan(model)
    for name, p in model.named_parameters():
        groups[plan[name].clock].params.append((name, p))
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

    # ------------------------------------------------------------------ checkpoint entries
    # A checkpoint holds every data-parallel rank's clock under "clock.dp<r>" (DCP flattens it to
    # clock.dp<r>.acc.<param> and clock.dp<r>.window_tokens.<group>): the ranks' accumulators differ.
    KEY = "clock"
    KINDS = ("acc", "window_tokens")

    @staticmethod
    def rank_key(dp_rank: int) -> str:
        return f"dp{dp_rank}"

    @classmethod
    def parse_key(cls, flat_key: str) -> tuple[int, str, str] | None:
        """(dp rank, "acc" or "window_tokens", parameter or group name) of a flattened checkpoint key
        of the clock; None for a key another part of the checkpoint owns."""
        parts = flat_key.split(".", 3)
        if len(parts) < 4 or parts[0] != cls.KEY or parts[2] not in cls.KINDS:
            return None
        rank = parts[1].removeprefix("dp")
        return (int(rank), parts[2], parts[3]) if parts[1].startswith("dp") and rank.isdigit() else None

    @classmethod
    def flat_state(cls, dp_rank: int, state: dict) -> dict:
        """The clock state of dp rank `dp_rank` under its flattened checkpoint keys (parse_key's inverse)."""
        return {f"{cls.KEY}.{cls.rank_key(dp_rank)}.{kind}.{name}": v
                for kind in cls.KINDS for name, v in state[kind].items()}

    @classmethod
    def pop_flat(cls, flat: dict) -> list[dict]:
        """Take the clock's entries out of a flattened checkpoint: the state of every saved dp rank, in order."""
        saved: dict[int, dict] = {}
        for key, (r, kind, name) in [(k, parsed) for k in flat if (parsed := cls.parse_key(k)) is not None]:
            saved.setdefault(r, {kind: {} for kind in cls.KINDS})[kind][name] = flat.pop(key)
        return [saved[r] for r in sorted(saved)]

    def checkpoint_state(self, dp_rank: int) -> dict:
        """This rank's share of the checkpoint's clock entry."""
        return {self.rank_key(dp_rank): self.state_dict()}

    def load_target(self, saved_dp: int) -> dict:
        """Buffers for the clock entry of a checkpoint saved under `saved_dp` data-parallel ranks: every
        rank loads all of them, as under another dp size its state is re-split from their sum."""
        return {self.rank_key(r): {"acc": {n: torch.zeros_like(t) for n, t in self.acc.items()},
                                   "window_tokens": {g.name: g.window_tokens for g in self.groups}}
                for r in range(saved_dp)}

    def load_checkpoint_state(self, loaded: dict, dp_rank: int, dp_size: int) -> None:
        """Load this rank's clock from a loaded load_target (every saved dp rank's state)."""
        self.load_state_dict(self.resplit([loaded[self.rank_key(r)] for r in range(len(loaded))], dp_rank, dp_size))

    @staticmethod
    def resplit(saved: list[dict], dp_rank: int, dp_size: int) -> dict:
        """The clock state of data-parallel rank `dp_rank` of `dp_size`, from the states of every saved
        dp rank. With the same dp size a rank takes its own, bit for bit. Across dp sizes: a tick
        all-reduces (sums) the ranks' window accumulators, so only their total matters: new rank 0
        takes the total of all saved ranks (summed in rank order), the others zeros. The next tick
        then sees the same sum, up to float32 rounding of the reordered additions. window_tokens
        counts global tokens and is the same on every rank."""
        if len(saved) == dp_size:
            return saved[dp_rank]
        acc = {}
        for name, first in saved[0]["acc"].items():
            if dp_rank == 0:
                total = first.clone()
                for other in saved[1:]:
                    total += other["acc"][name]
                acc[name] = total
            else:
                acc[name] = torch.zeros_like(first)
        return {"acc": acc, "window_tokens": dict(saved[0]["window_tokens"])}
