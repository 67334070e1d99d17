"""Chunked in-context CMS update (docs/cms_in_context.md): equals naive.py, one step per chunk.

Within a chunk every token reads the deviation as of the chunk start, so a chunk is two batched
products (read + error, then the rank-C step) and the Python loop runs over chunks only. Everything
that does not depend on the deviation (shifted keys, document masks, step sizes) is computed once.
Under tensor parallelism h, the deviation and the keys hold this rank's hidden columns; the
products over the hidden axis are summed across ranks (`reduce`: all-reduce forward, identity
backward) and the replicated error and step size enter the local write through `copy` (identity
forward, all-reduce backward), Megatron's g and f operators, so no rank ever holds another's shard.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .naive import NORM_EPS, CMSState, fresh_state


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def _masks(seg: torch.Tensor | None, B: int, T: int, chunk_size: int, device, dtype):
    """read (B, T): token t reads the deviation (no document start since its chunk began);
    pair (B, T): the pair ending at t counts in its chunk's step (same document as the chunk's last
    token, and not a document start); keep (B, n_chunks): the deviation survives the chunk."""
    if seg is None:
        ones = torch.ones(B, T, device=device, dtype=dtype)
        return ones, ones, torch.ones(B, -(-T // chunk_size), device=device, dtype=dtype)
    starts = torch.arange(0, T, chunk_size, device=device)
    lasts = (starts + chunk_size).clamp(max=T) - 1
    owner = seg[:, (starts - 1).clamp(min=0)]  # document of the token before each chunk (row start: its own)
    per_token = torch.arange(T, device=device) // chunk_size
    read = seg == owner[:, per_token]
    same_prev = torch.ones_like(read)
    same_prev[:, 1:] = seg[:, 1:] == seg[:, :-1]
    pair = same_prev & (seg == seg[:, lasts][:, per_token])
    keep = seg[:, lasts] == owner
    return read.to(dtype), pair.to(dtype), keep.to(dtype)


def chunk_cms_in_context(h, y_slow, z, seg, state: CMSState | None, chunk_size: int, lr: float,
                         stopgrad_writes: bool, group=None) -> tuple[torch.Tensor, CMSState]:
    B, T, f = h.shape
    d = z.shape[-1]
    reduce = (lambda x: _Reduce.apply(x, group)) if group is not None else (lambda x: x)
    copy = (lambda x: _Copy.apply(x, group)) if group is not None else (lambda x: x)
    delta, key, key_out = state if state is not None else fresh_state(h, d)
    read, pair, keep = _masks(seg, B, T, chunk_size, h.device, h.dtype)
    keys = torch.cat([key[:, None], h], dim=1)  # keys[:, t] = h_{t-1}; keys[:, t + 1] = h_t
    key_outs = torch.cat([key_out[:, None], y_slow[:, :-1]], dim=1)  # slow output of keys[:, t]
    n_chunks = -(-T // chunk_size)
    norms = reduce(keys[:, :T].square().sum(-1) * pair)  # (B, T), summed over the hidden axis
    pad = n_chunks * chunk_size - T
    norms = torch.nn.functional.pad(norms, (0, pad)).view(B, n_chunks, chunk_size).sum(-1)
    step = copy(lr / (norms + NORM_EPS))  # (B, n_chunks)
    out = []
    for c, s in enumerate(range(0, T, chunk_size)):
        e = min(s + chunk_size, T)
        fast = reduce(keys[:, s:e + 1] @ delta.mT)  # rows: h_{s-1} (the key of pair s), h_s, ..., h_{e-1}
        m = read[:, s:e, None]
        out.append(fast[:, 1:] * m)
        err = copy((key_outs[:, s:e] + fast[:, :-1] * m - z[:, s:e]) * pair[:, s:e, None])
        write = step[:, c, None, None] * (err.mT @ keys[:, s:e])
        delta = delta * keep[:, c, None, None] - (write.detach() if stopgrad_writes else write)
    return torch.cat(out, dim=1), CMSState(delta, h[:, -1], y_slow[:, -1])
