"""training.carry_state: the fast-weight state each row of this rank hands from one step to the next.

The data stream reads the corpus in lanes (data/samples.py), so row b of a step continues row b of
the step before that read the same lane group (the step before, with data.lane_groups = 1); each group
keeps its own states. Every forward that trains (one per micro-batch, or per pipeline stage and
microbatch) starts from the state its key kept a step earlier and keeps the state it ends with,
detached: truncated backpropagation through time, one segment deep. Under tensor parallelism each
rank keeps its own heads' state; under pipeline parallelism each stage keeps its layers'.

In the checkpoint the states are one entry per global rank ("carry.rank<r>"), as bytes, so a resume
under the same layout continues bit-exactly. Another layout or micro-batch cannot reuse them: the
rows start afresh there, with a warning.
"""
from __future__ import annotations

import io
import logging

import torch

from kernels.cms_in_context import CMSState
from kernels.hope_memory.types import MemoryState

log = logging.getLogger(__name__)
STATE_TYPES = [MemoryState, CMSState]  # the NamedTuples a state holds (allow-listed for loading)


def _detach(tree):
    if isinstance(tree, torch.Tensor):
        return tree.detach()
    if isinstance(tree, tuple):
        return type(tree)(*map(_detach, tree)) if hasattr(tree, "_fields") else tuple(map(_detach, tree))
    if isinstance(tree, list):
        return [_detach(x) for x in tree]
    if isinstance(tree, dict):
        return {k: _detach(v) for k, v in tree.items()}
    return tree


class CarriedState:
    KEY = "carry"

    def __init__(self, rank: int, eod_id: int | None, device: torch.device, layout: dict):
        self.rank, self.device = rank, device
        self.layout = layout  # what the keys and rows depend on (layout_of); saved in meta.json
        self.eod_id = eod_id  # rows whose previous token ends a document start afresh (None: never)
        self.states: dict[str, list] = {}

    def carry_mask(self, prev: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the rows that continue their lane (prev: the token before each row, -1 at a lane's start)."""
        keep = prev >= 0
        return keep & (prev != self.eod_id) if self.eod_id is not None else keep

    def get(self, key: str) -> list | None:
        return self.states.get(key)

    def put(self, key: str, state: list) -> None:
        self.states[key] = _detach(state)

    def checkpoint_state(self) -> dict:
        buf = io.BytesIO()
        torch.save({k: _detach(v) for k, v in self.states.items()}, buf)
        return {f"rank{self.rank}": buf.getvalue()}

    def load_target(self, stored: set[str]) -> dict:
        """The entry to load into: this rank's, where the checkpoint (its flattened keys) has one."""
        key = f"rank{self.rank}"
        return {key: b""} if f"{self.KEY}.{key}" in stored else {}

    def load_checkpoint_state(self, loaded: dict, saved_layout: dict | None) -> None:
        data = loaded.get(f"rank{self.rank}", b"")
        if saved_layout != self.layout or not data:
            if self.rank == 0:
                log.warning("training.carry_state: the checkpoint holds no carried states for this layout "
                            "(written without carry_state, or under another layout or micro-batch); every "
                            "row starts afresh")
            return
        with torch.serialization.safe_globals(STATE_TYPES):
            self.states = torch.load(io.BytesIO(data), map_location=self.device, weights_only=True)


def layout_of(cfg, dp_size: int) -> dict:
    """The settings a rank's carried states are keyed and shaped by."""
    p, t = cfg.parallel, cfg.training
    return {"dp": dp_size, "tp": p.tp, "pp": p.pp, "pp_schedule": p.pp_schedule, "pp_microbatches": p.pp_microbatches,
            "global_batch": t.global_batch, "micro_batch": t.micro_batch,
            "lane_groups": cfg.data.lane_groups}
