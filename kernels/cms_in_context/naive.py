"""Per-token reference of the in-context CMS update (docs/cms_in_context.md): the contract the
chunked path is tested against. A plain loop over tokens that holds a dense fast weight per
sequence and applies the accumulated chunk step at every chunk boundary, literally.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

NORM_EPS = 1e-6  # added to a chunk's summed key norms (a chunk with no key gives a zero step)


class CMSState(NamedTuple):
    """Per-sequence state of one in-context level. Never a Parameter, never shared across the batch.

    delta:   (B, d, f) the down projection's in-context deviation from its slow weight.
    key:     (B, f) the last token's hidden h_{T-1}: the key of the pair completed by the next token.
    key_out: (B, d) the slow output W_down h_{T-1} of that key.
    """

    delta: torch.Tensor
    key: torch.Tensor
    key_out: torch.Tensor


def fresh_state(h: torch.Tensor, d: int) -> CMSState:
    """A new document's state: no deviation and no pending key."""
    B, _, f = h.shape
    return CMSState(h.new_zeros(B, d, f), h.new_zeros(B, f), h.new_zeros(B, d))


def naive_cms_in_context(h, y_slow, z, seg, state: CMSState | None, chunk_size: int, lr: float,
                         stopgrad_writes: bool) -> tuple[torch.Tensor, CMSState]:
    """Token loop. At t % chunk == 0 (t > 0) the accumulated step is applied; at a document start
    the deviation, the accumulators and the pending key reset. Then y_fast_t = delta h_t, and the pair
    (key = h_{t-1}, value = z_t) adds its gradient e k^T, e = W_down k + delta k - z_t, to the step."""
    B, T, f = h.shape
    d = z.shape[-1]
    delta, key, key_out = state if state is not None else fresh_state(h, d)
    grad, norm = h.new_zeros(B, d, f), h.new_zeros(B)
    sg = (lambda x: x.detach()) if stopgrad_writes else (lambda x: x)
    out = []
    for t in range(T):
        if t and t % chunk_size == 0:
            delta = delta - sg(lr / (norm + NORM_EPS))[:, None, None] * grad
            grad, norm = torch.zeros_like(grad), torch.zeros_like(norm)
        if t and seg is not None:
            keep = (seg[:, t] == seg[:, t - 1]).to(h.dtype)
            delta, grad = delta * keep[:, None, None], grad * keep[:, None, None]
            norm, key, key_out = norm * keep, key * keep[:, None], key_out * keep[:, None]
        out.append(torch.einsum("bdf,bf->bd", delta, h[:, t]))
        err = key_out + torch.einsum("bdf,bf->bd", delta, key) - z[:, t]
        grad = grad + sg(err[:, :, None] * key[:, None, :])
        norm = norm + key.square().sum(-1)
        key, key_out = h[:, t], y_slow[:, t]
    delta = delta - sg(lr / (norm + NORM_EPS))[:, None, None] * grad
    return torch.stack(out, dim=1), CMSState(delta, key, key_out)
