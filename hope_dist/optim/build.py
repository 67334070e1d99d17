"""M3's param groups from the trainer's clock groups, mirroring trainer.build_optimizer's AdamW ones."""
from __future__ import annotations

from torch import nn

from hope_dist.clock import ClockGroup
from hope_dist.config import OptimConfig
from hope_dist.optim.m3 import M3, hidden_matrices


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
