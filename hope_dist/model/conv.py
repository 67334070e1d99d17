"""Causal depthwise convolution that never looks across a document boundary.

The fast-weight state resets at each document start, so the short convolution in front of the
memories must reset there too, or a packed batch would differ from its documents run alone.
"""
from __future__ import annotations

import torch
from torch import nn


class CausalConv(nn.Module):
    """y_t = sum_i w_i * x_{t-i} over the same document; `cache` carries the last width-1 inputs."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.empty(channels, width))

    def init_weights(self) -> None:
        nn.init.normal_(self.weight, std=self.width ** -0.5)

    def forward(self, x: torch.Tensor, seg: torch.Tensor | None = None,
                cache: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C); seg (B, T) document ids or None; cache (B, width-1, C) or None."""
        B, T, C = x.shape
        w = self.width
        past = cache if cache is not None else x.new_zeros(B, w - 1, C)
        xpad = torch.cat([past, x], dim=1)
        if seg is not None:
            # the cache belongs to the row's first document; zeros padding is harmless either way
            seg_pad = torch.cat([seg[:, :1].expand(B, w - 1), seg], dim=1)
        y = x * self.weight[:, w - 1]
        for i in range(1, w):
            shifted = xpad[:, w - 1 - i: w - 1 - i + T]
            if seg is not None:
                same = seg_pad[:, w - 1 - i: w - 1 - i + T] == seg
                shifted = shifted * same.unsqueeze(-1).to(x.dtype)
            y = y + shifted * self.weight[:, w - 1 - i]
        return y, xpad[:, T:]
