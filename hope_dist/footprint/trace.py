"""What one micro-batch's forward and backward hold in memory, traced on fake tensors.

The real model code runs forward and backward under FakeTensorMode (shapes and dtypes only, nothing
allocated, no arithmetic), while a dispatch mode counts every tensor storage an op creates until
Python frees it. The peak of that count is what the same code holds on a device, up to the
allocator's rounding and the kernels' own workspaces (tests/unit/test_estimate_memory.py compares it
with the CPU allocator's peak). So the estimate follows the code: what autograd saves, what
activation checkpointing and the memory op's recompute drop, autocast's low-precision weight copies,
the logits and the loss, and the transient buffers of the backward.

torch internals used here (FakeTensorMode, TorchDispatchMode) are the ones torch's own
torch.distributed._tools.mem_tracker builds on.
"""
from __future__ import annotations

import contextlib
import dataclasses
import weakref

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from hope_dist.config import ModelConfig
from hope_dist.model import HopeModel
from hope_dist.parallel.parallelize import apply_activation_checkpointing
from kernels.hope_memory import torch_chunked


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that ops created and that are still alive, and their peak. `existing`:
    tensors made before (parameters, gradients, inputs), whose storages ops may return (views,
    in-place updates) and which are not counted."""

    def __init__(self, existing=()):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen = WeakIdKeyDictionary()  # storage -> its weakref, whose callback subtracts its bytes
        for t in existing:
            self._seen[t.untyped_storage()] = None

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st not in self._seen:
                    n = st.nbytes()
                    self._seen[st] = weakref.ref(st, lambda _ref, n=n: self._free(n))
                    self.live += n
        self.peak = max(self.peak, self.live)
        return out


@contextlib.contextmanager
def op_recompute(enabled: bool):
    """The chunked memory op's per-chunk recompute (kernels/hope_memory/torch_chunked.py), for this block only."""
    before = torch_chunked.RECOMPUTE
    torch_chunked.RECOMPUTE = enabled
    try:
        yield
    finally:
        torch_chunked.RECOMPUTE = before


@dataclasses.dataclass(frozen=True)
class Recompute:
    """What the backward recomputes: whole blocks (parallel.activation_checkpoint) and/or the memory
    op's chunk steps (parallel.memory_op_recompute)."""

    blocks: bool = False
    memory_op: bool = False


def trace_step(model_cfg: ModelConfig, n_layers: int, batch: int, seq_len: int, amp_dtype: torch.dtype | None,
               recompute: Recompute) -> int:
    """Peak bytes of one micro-batch of `batch` x `seq_len` tokens through a copy of the model
    with `n_layers` blocks: forward under autocast (amp_dtype None: float32), the trainer's token-sum
    loss, backward. The peak counts what the step creates on top of the parameters and their gradient
    buffers (allocated first, as gradient accumulation keeps them); one document per row."""
    cfg = dataclasses.replace(model_cfg, n_layers=n_layers)
    with FakeTensorMode():
        model = HopeModel(cfg)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        if recompute.blocks:
            apply_activation_checkpointing(model)
        tokens = torch.zeros(batch, seq_len, dtype=torch.long)
        existing = [*model.parameters(), *(p.grad for p in model.parameters()), *model.buffers(), tokens]
        with op_recompute(recompute.memory_op), LiveBytes(existing) as live:
            with torch.autocast("cpu", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = model(tokens)
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), reduction="sum")
            loss.backward()  # the trainer holds the logits until its backward returns
            del loss, logits
    return live.peak
