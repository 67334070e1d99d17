"""M3, Multi-scale Momentum Muon (Nested Learning, Algorithm 1), with AdamW for what is not a
hidden matrix. docs/optim.md has the algorithm, our reading of the paper and the measured cost.

Per hidden matrix (the weight of an nn.Linear other than the LM head), at its own t-th step:

    V  = beta2 V + (1 - beta2) g^2;  D = sqrt(V / (1 - beta2^t)) + eps     # Adam's second moment
    if (t - 1) % f == 0:  O2 = N(M2); M2 = beta3 M2                         # a slow step opens window k
    M2 += (1 - beta3) g            # so at the next slow step M2 = beta3 M2 + (1 - beta3) sum_window g
    M1 = beta1 M1 + (1 - beta1) g                                           # fast momentum
    theta = (1 - lr wd) theta - lr U

with optim.precondition = before_ns (default): N(M) = NS(M / D), U = N(M1) + alpha O2;
                        = after_ns (Algorithm 1 as printed): N(M) = NS(M), U = (N(M1) + alpha O2) / D.
after_ns divides a dense orthogonal matrix by per-element gradient scales, which is unbounded
(docs/optim.md measures weights of 1e4 after one step); before_ns keeps every update's spectral
norm below about 1.5 (1 + alpha). NS runs on the whole matrix, also when it is sharded (orthogonalize).

Every other parameter (embeddings, head, norms, the memories' initial states, the convolutions)
steps with torch's functional AdamW, bit for bit as torch.optim.AdamW. A parameter without a
gradient is skipped, state and all: under the CMS clocks a level's t counts its ticks, so its
slow momentum refreshes every f of its own steps.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim.adamw import adamw

from hope_dist.optim.newton_schulz import orthogonalize


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of t; in-place ops on it change t (the optimizer runs under no_grad)."""
    return t.to_local() if isinstance(t, DTensor) else t


def hidden_matrices(model: nn.Module) -> set[int]:
    """ids of the weights M3 orthogonalises: nn.Linear weights except the LM head's (as Muon users
    do; the embedding is an nn.Embedding). Identity-based, so FSDP2/TP-wrapped modules count too."""
    head = getattr(model, "output", None)
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear) and m is not head}


class M3(torch.optim.Optimizer):
    """Param groups with `orthogonalize: True` step by M3, the others by AdamW. State is created
    eagerly (as the trainer does for AdamW), so every checkpoint holds every level's state."""

    def __init__(self, param_groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, beta3: float, alpha: float, ns_steps: int, slow_every: int,
                 precondition: str):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, beta3=beta3, alpha=alpha,
                        ns_steps=ns_steps, slow_every=slow_every, precondition=precondition, orthogonalize=False)
        super().__init__(param_groups, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                state = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                         "exp_avg_sq": torch.zeros_like(p)}
                if group["orthogonalize"]:
                    state.update(slow_momentum=torch.zeros_like(p), slow_update=torch.zeros_like(p))
                self.state[p] = state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["orthogonalize"]:
                for p in params:
                    self._m3_step(p, group)
            elif params:
                states = [self.state[p] for p in params]
                adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                      [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states], amsgrad=False,
                      beta1=group["betas"][0], beta2=group["betas"][1], lr=group["lr"],
                      weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
        return loss

    def _m3_step(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        beta1, beta2 = group["betas"]
        beta3, lr = group["beta3"], group["lr"]
        state["step"] += 1
        t = int(state["step"].item())
        g = _local(p.grad)
        m1, v, m2, o2 = (_local(state[k]) for k in ("exp_avg", "exp_avg_sq", "slow_momentum", "slow_update"))
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(group["eps"])
        before = group["precondition"] == "before_ns"

        def ns(m: torch.Tensor) -> torch.Tensor:
            return orthogonalize(m / denom if before else m, p, group["ns_steps"])

        if (t - 1) % group["slow_every"] == 0:
            o2.copy_(ns(m2))
            m2.mul_(beta3)
        m2.add_(g, alpha=1 - beta3)
        m1.lerp_(g, 1 - beta1)
        update = ns(m1).add_(o2, alpha=group["alpha"])
        if not before:
            update.div_(denom)
        local = _local(p)
        local.mul_(1 - lr * group["weight_decay"])
        local.add_(update, alpha=-lr)
