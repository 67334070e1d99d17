"""In-context CMS levels (docs/cms_in_context.md): a level's down projection learns in context.

For a SwiGLU level with input z_t, hidden h_t = silu(W_g x_t) * (W_u x_t) (x = RMSNorm(z)) and slow
output W_down h_t, the op returns the fast part y_fast_t = delta_c h_t, where delta_c is the
per-sequence deviation of W_down as of the start of t's chunk (absolute positions: chunks of
`chunk` tokens from the start of the call). The inner objective is next-position association,
l_j = 1/2 ||(W_down + delta_c) h_{j-1} - z_j||^2 for each pair (h_{j-1}, z_j) inside one document, and
at every chunk end delta takes one normalised gradient step over the chunk's pairs:

    delta_{c+1} = delta_c - lr * sum_j e_j h_{j-1}^T / (sum_j ||h_{j-1}||^2 + 1e-6)

Conventions (both paths): the deviation, the step and the pending key reset at every document start
(seg changes); the state of a call is the state after its last (possibly short) chunk's step, so two
segments equal one long sequence when the first one's length is a multiple of `chunk`. Outer
gradients flow through the writes unless stopgrad_writes. The paths compute in at least float32 with
autocast off and return y_fast and the state in that dtype.
"""
from __future__ import annotations

import torch

from .chunk import chunk_cms_in_context
from .naive import CMSState, naive_cms_in_context

__all__ = ["CMSState", "cms_in_context"]

IMPLS = ("naive", "torch")


def cms_in_context(h: torch.Tensor, y_slow: torch.Tensor, z: torch.Tensor, *, chunk_size: int, lr: float,
                   seg: torch.Tensor | None = None, initial_state: CMSState | None = None,
                   stopgrad_writes: bool = False, impl: str = "torch",
                   group=None) -> tuple[torch.Tensor, CMSState]:
    """h (B, T, f): the level's hidden (this rank's columns under tp); y_slow (B, T, d) = W_down h
    (summed over ranks); z (B, T, d): the level's input, the targets. seg (B, T) int: document index
    per token (None: one document per row). initial_state: what an earlier call returned (None: fresh).
    group: the tensor-parallel process group (chunked path only). Returns (y_fast (B, T, d), state)."""
    _check(h, y_slow, z, chunk_size, lr, seg, initial_state, impl, group)
    dtype = torch.promote_types(h.dtype, torch.float32)
    cast = lambda x: None if x is None else x.to(dtype)
    with torch.autocast(h.device.type, enabled=False):
        state = None if initial_state is None else CMSState(*map(cast, initial_state))
        args = (cast(h), cast(y_slow), cast(z), seg, state, chunk_size, float(lr), stopgrad_writes)
        if impl == "naive":
            return naive_cms_in_context(*args)
        return chunk_cms_in_context(*args, group=group)


def _check(h, y_slow, z, chunk_size, lr, seg, state, impl, group) -> None:
    """Shapes and flags, with errors naming the argument."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "naive" and group is not None:
        raise ValueError("impl='naive' is the single-process reference: it takes no tensor-parallel group")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (tokens per in-context update), got {chunk_size!r}")
    if not 0 < lr <= 1:
        raise ValueError(f"lr must be in (0, 1] (the normalised step), got {lr!r}")
    if not isinstance(h, torch.Tensor) or h.dim() != 3 or not h.is_floating_point() or h.shape[1] == 0:
        raise ValueError("h must be a floating-point tensor of shape (B, T, f) with T >= 1")
    B, T, f = h.shape
    if not isinstance(z, torch.Tensor) or z.dim() != 3 or z.shape[:2] != (B, T):
        raise ValueError(f"z must be (B, T, d) = ({B}, {T}, d), got {getattr(z, 'shape', z)}")
    d = z.shape[-1]
    for name, x, shape in (("y_slow", y_slow, (B, T, d)), ("seg", seg, (B, T))):
        if x is not None and (not isinstance(x, torch.Tensor) or tuple(x.shape) != shape):
            raise ValueError(f"{name} must have shape {shape}, got {tuple(getattr(x, 'shape', ()))}")
    if y_slow is None:
        raise ValueError(f"y_slow (the slow output W_down h, shape {(B, T, d)}) is required")
    if seg is not None and seg.is_floating_point():
        raise ValueError("seg must be an int tensor of document indices (B, T)")
    if state is not None:
        if not isinstance(state, CMSState):
            raise TypeError(f"initial_state must be a CMSState, got {type(state).__name__}")
        for name, shape in (("delta", (B, d, f)), ("key", (B, f)), ("key_out", (B, d))):
            got = tuple(getattr(state, name).shape)
            if got != shape:
                raise ValueError(f"initial_state.{name} has shape {got}, expected {shape} (batch B = {B})")
