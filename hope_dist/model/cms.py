"""Continuum Memory System (docs/model.md sections 1 and 4): a chain of SwiGLU levels.

Each level is its own module (`levels.<l>`) so the trainer's clock and the parallel layer can
find, accumulate, shard and reduce a level's parameters as one unit. The clock itself lives in
hope_dist/clock.py: the model only records each level's period and lr_scale.

With model.cms_in_context a level with chunk > 0 also learns in context: its down projection gets a
per-sequence deviation written every `chunk` tokens (kernels/cms_in_context, docs/cms_in_context.md),
a fast state on top of the slow weights the clock steps. Its state rides in the block's state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hope_dist.config import CMSLevel, ModelConfig
from hope_dist.model.carry import zero_rows
from hope_dist.model.norms import RMSNorm
from hope_dist.model.segments import Segments
from kernels.cms_in_context import CMSState, cms_in_context


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.gate.weight, std=std)
        nn.init.normal_(self.up.weight, std=std)
        nn.init.normal_(self.down.weight, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class CMSLevelBlock(nn.Module):
    """z_l = z_{l-1} + MLP_l(RMSNorm_l(z_{l-1})), updated by the optimizer every `period` steps;
    with chunk > 0 the down projection also learns in context every `chunk` tokens."""

    def __init__(self, cfg: ModelConfig, level: CMSLevel, chunk_size: int):
        super().__init__()
        self.period = level.period
        self.lr_scale = level.lr_scale
        self.chunk_size = chunk_size
        self.inner_lr = cfg.cms_inner_lr
        self.stopgrad_writes = cfg.cms_stopgrad_writes
        self.kernel = "naive" if cfg.kernel == "naive" else "torch"
        self.tp_group = None  # set by tensor_parallel.apply_tp: h and the deviation hold this rank's columns
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, level.width)

    def forward(self, z: torch.Tensor, segs: Segments | None = None,
                state: CMSState | None = None) -> tuple[torch.Tensor, CMSState | None]:
        if not self.chunk_size:
            return z + self.mlp(self.norm(z)), None
        x = self.norm(z)
        h = F.silu(self.mlp.gate(x)) * self.mlp.up(x)
        y_slow = self.mlp.down(h)
        seg = segs.seg if segs is not None and segs.cu_seqlens is not None else None
        if state is not None:  # rows that start afresh start from zero (model/carry.py)
            state = CMSState(*(zero_rows(x, segs) for x in state))
        y_fast, new_state = cms_in_context(h, y_slow, z, chunk_size=self.chunk_size, lr=self.inner_lr, seg=seg,
                                           initial_state=state, stopgrad_writes=self.stopgrad_writes,
                                           impl=self.kernel, group=self.tp_group)
        return z + y_slow + y_fast.to(z.dtype), new_state


class CMS(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.levels = nn.ModuleList(CMSLevelBlock(cfg, lvl, chunk_size) for lvl, chunk_size in zip(cfg.cms,
                                                                                                   cfg.cms_chunks))
        self.in_context = any(cfg.cms_chunks)

    def forward(self, h: torch.Tensor, segs: Segments | None = None,
                state: list | None = None) -> tuple[torch.Tensor, list]:
        """state: each level's CMSState from an earlier call (None entries: fresh or not in context)."""
        new_state = []
        for i, level in enumerate(self.levels):
            h, st = level(h, segs, state[i] if state is not None else None)
            new_state.append(st)
        return h, new_state
