"""The in-chunk unit-lower-triangular solves of the delta rule (the role of flash-linear-attention's
fla/ops/utils/solve_tril.py): (I + A)^{-1} Y and its adjoint (I + A)^{-T} Y, for a strictly
lower-triangular (BC, BC) A held in registers, by substitution row by row in float32."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def forward_substitution(a, rhs, BC: tl.constexpr, CHUNK: tl.constexpr):
    """(I + a)^{-1} rhs for a strictly lower-triangular (BC, BC) a, row by row (rows from
    CHUNK on are padding: a has no entries there)."""
    rows = tl.arange(0, BC)
    x = rhs
    for i in range(1, CHUNK):
        a_i = tl.sum(tl.where(rows[:, None] == i, a, 0.0), 0)
        x = tl.where(rows[:, None] == i, x - tl.sum(a_i[:, None] * x, 0)[None, :], x)
    return x


@triton.jit
def backward_substitution(a, y, BC: tl.constexpr, CHUNK: tl.constexpr):
    """(I + a)^{-T} y for a strictly lower-triangular (BC, BC) a, last row first (rows and
    columns from CHUNK on are padding: a has no entries there)."""
    rows = tl.arange(0, BC)
    x = y
    for j in range(1, CHUNK):
        i = CHUNK - 1 - j
        a_i = tl.sum(tl.where(rows[None, :] == i, a, 0.0), 1)
        x = tl.where(rows[:, None] == i, x - tl.sum(a_i[:, None] * x, 0)[None, :], x)
    return x
