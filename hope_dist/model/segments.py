"""Document segments of a packed batch: where the fast-weight state must reset.

A document starts at each row's first token and right after every end-of-document token.
Computed once per batch, before the model runs, and shared by every layer. This is the only place
that reads the offsets back to the host: the memory op gets them twice, on the device
(`cu_seqlens`, for its gathers) and on the host (`cu_seqlens_cpu` and `max_seqlen`, for its checks
and loop bounds, as flash-linear-attention's `cu_seqlens_cpu` and flash-attn's `max_seqlen`), so no
layer's forward or backward waits on the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Segments:
    seg: torch.Tensor  # (B, T) document index within the row
    cu_seqlens: torch.Tensor | None  # (N+1,) offsets into the flattened batch; None: one doc per row
    cu_seqlens_cpu: torch.Tensor | None = None  # the same offsets on the host (int64, CPU)
    max_seqlen: int | None = None  # the longest document, in tokens
    carry: torch.Tensor | None = None  # (B,) bool: the row's first document continues the state passed in
    # (None: every row does; model/carry.py)


def document_segments(tokens: torch.Tensor, eod_id: int | None, carry: torch.Tensor | None = None) -> Segments:
    """Segments of a (B, T) batch; one device -> host copy (the offsets), here and nowhere else.
    eod_id None: no resets inside rows. carry: see Segments.carry."""
    if eod_id is None:
        return Segments(torch.zeros_like(tokens), None, carry=carry)
    starts = torch.zeros_like(tokens, dtype=torch.bool)
    starts[:, 1:] = tokens[:, :-1] == eod_id
    seg = starts.long().cumsum(dim=1)
    starts[:, 0] = True
    B, T = tokens.shape
    offsets = starts.flatten().nonzero().squeeze(1)
    cu = torch.cat([offsets, offsets.new_tensor([B * T])]).to(torch.int64)
    cu_cpu = cu.cpu()
    if cu_cpu.numel() == B + 1:  # no end-of-document token inside a row: one document per row
        return Segments(seg, None, carry=carry)
    return Segments(seg, cu, cu_cpu, int(cu_cpu.diff().max()), carry)
