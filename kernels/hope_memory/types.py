"""Parameter and state containers of the HOPE memory op (docs/model.md section 2).

Memories are stacked on a leading `n_mem` axis: 5 for the self-modifying mixer, in the order
(k, v, eta, alpha, o), and 1 for the `titans` mixer (o only). M_o is always the last one.
A memory of depth 2 is M(z) = z + W1 silu(W2 z); of depth 1 it is M(z) = W2 z (W1 is None).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

MEMORY_NAMES = ("k", "v", "eta", "alpha", "o")


class MemoryParams(NamedTuple):
    """Outer (slow) parameters of the op, learned across sequences.

    w1:      (n_mem, H, d_h, d_m) initial W1 of each memory, None for depth 1.
    w2:      (n_mem, H, d_m, d_h) initial W2 (depth 2) or (n_mem, H, d_h, d_h) W (depth 1).
    eta_w, eta_b, alpha_w, alpha_b: (H, d_h) and (H,) read-outs of M_eta / M_alpha
             (selfmod only; None for titans, whose eta/alpha come from outer linear maps).
    gamma:   (H,) momentum logit, gamma = sigmoid(gamma); None when momentum is off.
    """

    w1: torch.Tensor | None
    w2: torch.Tensor
    eta_w: torch.Tensor | None = None
    eta_b: torch.Tensor | None = None
    alpha_w: torch.Tensor | None = None
    alpha_b: torch.Tensor | None = None
    gamma: torch.Tensor | None = None


class MemoryState(NamedTuple):
    """Fast-weight state, per sequence: a leading batch axis on every tensor of MemoryParams'
    w1/w2 shapes, plus their momenta (s1, s2) when momentum is on. Never a Parameter."""

    w1: torch.Tensor | None
    w2: torch.Tensor
    s1: torch.Tensor | None = None
    s2: torch.Tensor | None = None
