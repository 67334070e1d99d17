"""Continuum Memory System (HOPE_SPEC sections 1 and 4): a chain of SwiGLU levels.

Each level is its own module (`levels.<l>`) so the trainer's clock and the parallel layer can
find, accumulate, shard and reduce a level's parameters as one unit. The clock itself lives in
hope_dist/clock.py: the model only records each level's period and lr_scale.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hope_dist.config import CMSLevel
from hope_dist.model.norms import RMSNorm


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
    """z_l = z_{l-1} + MLP_l(RMSNorm_l(z_{l-1})), updated by the optimizer every `period` steps."""

    def __init__(self, dim: int, level: CMSLevel, eps: float):
        super().__init__()
        self.period = level.period
        self.lr_scale = level.lr_scale
        self.norm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, level.width)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.mlp(self.norm(z))


class CMS(nn.Module):
    def __init__(self, dim: int, levels: list[CMSLevel], eps: float):
        super().__init__()
        self.levels = nn.ModuleList(CMSLevelBlock(dim, lvl, eps) for lvl in levels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for level in self.levels:
            h = level(h)
        return h
