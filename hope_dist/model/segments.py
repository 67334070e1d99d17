"""Document segments of a packed batch: where the fast-weight state must reset.

A document starts at each row's first token and right after every end-of-document token.
Computed once per forward (one host sync for the varlen offsets) and shared by every layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Segments:
    seg: torch.Tensor  # (B, T) document index within the row
    cu_seqlens: torch.Tensor | None  # (N+1,) offsets into the flattened batch; None: one doc per row


def document_segments(tokens: torch.Tensor, eod_id: int) -> Segments:
    starts = torch.zeros_like(tokens, dtype=torch.bool)
    starts[:, 1:] = tokens[:, :-1] == eod_id
    seg = starts.long().cumsum(dim=1)
    if not bool(starts.any()):
        return Segments(seg, None)
    starts[:, 0] = True
    B, T = tokens.shape
    offsets = starts.flatten().nonzero().squeeze(1)
    cu = torch.cat([offsets, offsets.new_tensor([B * T])]).to(torch.int64)
    return Segments(seg, cu)
