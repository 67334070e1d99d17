"""The trainer's optimizers, built from its clock groups: AdamW and M3 (optim.name), one param group per
(clock group, kind) so the CMS clocks and each level's lr_scale work the same for both."""
from __future__ import annotations

import torch
from torch import nn

from hope_dist.clock import ClockGroup
from hope_dist.config import OptimConfig
from hope_dist.optim.m3 import M3, hidden_matrices


def build_optimizer(groups: list[ClockGroup], cfg: OptimConfig,
                    model: nn.Module | None = None) -> torch.optim.Optimizer:
    """optim.name=m3: M3, which needs `model` to find its hidden matrices; adamw: build_adamw."""
    if cfg.name == "m3":
        return build_m3(groups, cfg, model)
    return build_adamw(groups, cfg)


def build_adamw(groups: list[ClockGroup], cfg: OptimConfig) -> torch.optim.AdamW:
    """One AdamW; a param group per (clock group, decay). Matrices decay, vectors don't.
    State is created eagerly (step 0, zero moments): identical to AdamW's lazy init, but a
    checkpoint then always holds every level, even one that has not ticked yet."""
    param_groups = []
    for g in groups:
        for decay in (True, False):
            params = [p for _, p in g.params if (p.ndim >= 2) == decay]
            if params:
                param_groups.append({"params": params, "clock": g.name, "lr_scale": g.lr_scale,
                                     "weight_decay": cfg.weight_decay if decay else 0.0})
    opt = torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    for group in opt.param_groups:
        for p in group["params"]:
            opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                            "exp_avg_sq": torch.zeros_like(p)}
    return opt


def build_m3(groups: list[ClockGroup], cfg: OptimConfig, model: nn.Module) -> M3:
    """A param group per (clock group, kind): hidden matrices (M3, decay), other tensors of 2+
    dims (AdamW, decay) and vectors (AdamW, no decay), so clocks and lr_scale work as for AdamW."""
    matrices = hidden_matrices(model)
    param_groups = []
    for g in groups:
        kinds = {"m3": [], "decay": [], "no_decay": []}
        for _, p in g.params:
            kinds["m3" if id(p) in matrices else "decay" if p.ndim >= 2 else "no_decay"].append(p)
        for kind, params in kinds.items():
            if params:
                param_groups.append({"params": params, "clock": g.name, "lr_scale": g.lr_scale,
                                     "orthogonalize": kind == "m3",
                                     "weight_decay": 0.0 if kind == "no_decay" else cfg.weight_decay})
    return M3(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay,
              beta3=cfg.beta3, alpha=cfg.alpha, ns_steps=cfg.ns_steps, slow_every=cfg.slow_every,
              precondition=cfg.precondition)
