"""Fast-weight state handed across the segments of a row (training.carry_state, and evaluation past
the context): which document of a packed row starts from the carried state, and whose end state is
carried on. Index arithmetic on the device only: no host synchronisation.

A row's first document continues the carried state where `Segments.carry` says so (None: every row
does); every other document starts fresh. The state carried on is the row's last document's.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from hope_dist.model.segments import Segments


class RowDocuments(NamedTuple):
    """The documents of a (B, T) batch as the packed memory call numbers them (N of them)."""
    row: torch.Tensor  # (N,) the row each document lies in
    continues: torch.Tensor  # (N,) bool: the document starts from the carried state of its row
    last: torch.Tensor  # (B,) each row's last document


def row_documents(segs: Segments | None, B: int, T: int, device: torch.device) -> RowDocuments:
    rows = torch.arange(B, device=device)
    carry = torch.ones(B, dtype=torch.bool, device=device) if segs is None or segs.carry is None else segs.carry
    if segs is None or segs.cu_seqlens is None:  # one document per row
        return RowDocuments(rows, carry, rows)
    starts = segs.cu_seqlens[:-1]
    row = starts // T
    continues = carry[row] & (starts % T == 0)
    last = torch.searchsorted(starts, (rows + 1) * T) - 1
    return RowDocuments(row, continues, last)


def start_states(carried: tuple, fresh: tuple, docs: RowDocuments) -> tuple:
    """Per document: its row's carried state where it continues, else `fresh` (N documents, from the
    model's initial weights, so their gradient reaches them). Same NamedTuple type as `fresh`."""
    def pick(c, f):
        if f is None:
            return None
        mask = docs.continues.view(-1, *([1] * (f.dim() - 1)))
        return torch.where(mask, c[docs.row].to(f.dtype), f)
    return type(fresh)(*(pick(c, f) for c, f in zip(carried, fresh)))


def end_states(final: tuple, docs: RowDocuments) -> tuple:
    """Each row's last document's final state (a NamedTuple like `final`)."""
    return type(final)(*(None if f is None else f[docs.last] for f in final))


def zero_rows(x: torch.Tensor, segs: Segments | None) -> torch.Tensor:
    """A state that starts at zero (a conv cache, an in-context CMS level's tensors), with the rows that
    do not continue zeroed."""
    if segs is None or segs.carry is None:
        return x
    return x * segs.carry.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
