"""Held-out validation rows: separate datasets (`data.valid_paths`) or a document-level split of the
training datasets (`data.valid_fraction`), packed exactly like training rows.

The split is drawn from a fixed seed, not the training seed, so every run on the same files holds
out the same documents and validation losses compare across seeds and configs; the training stream
never sees them. Validation rows are the held-out documents in file order, concatenated with their
EOD tokens and cut into rows of seq_len + 1 tokens (overlapping by one, as training samples), so the
model resets its fast-weight state at every document start exactly as in training. The set is a
whole number of global batches, sliced over data-parallel ranks like training batches, so its loss
does not depend on the layout.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from hope_dist.data.token_file import TokenFile
from hope_dist.errors import DataError

SPLIT_SEED = 0x5EED_0F_7E57  # fixed: the held-out documents do not depend on training.seed


def split_documents(num_documents: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) document indices, each in increasing order. At least one document is
    held out and at least one kept; `fraction` of them (rounded) are held out."""
    if num_documents < 2:
        raise DataError(f"data.valid_fraction needs at least 2 documents to hold one out, found "
                        f"{num_documents}; use data.valid_paths with a separate validation set")
    n_valid = min(max(1, round(fraction * num_documents)), num_documents - 1)
    held = np.zeros(num_documents, dtype=bool)
    held[np.random.default_rng(SPLIT_SEED).permutation(num_documents)[:n_valid]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


class ValidationSet:
    """`n_batches` global batches of held-out rows; `batches()` yields this rank's slices."""

    def __init__(self, sources: list[tuple[TokenFile, np.ndarray]], *, seq_len: int, tokens: int,
                 global_batch: int, dp_rank: int, dp_size: int):
        self.seq_len, self.global_batch = seq_len, global_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        wanted = math.ceil(tokens / (seq_len * global_batch)) * global_batch  # rows
        stream = self._concatenate(sources, wanted * seq_len + 1)
        available = (len(stream) - 1) // seq_len // global_batch * global_batch
        if available == 0:
            names = ", ".join(f.prefix for f, _ in sources)
            raise DataError(f"validation data ({names}) holds {len(stream)} tokens, fewer than one global "
                             f"batch of {global_batch} rows of {seq_len} + 1 tokens; raise data.valid_fraction, "
                             f"give larger data.valid_paths, or lower training.global_batch")
        self.n_rows = min(wanted, available)
        self.rows = np.lib.stride_tricks.sliding_window_view(stream, seq_len + 1)[::seq_len][:self.n_rows]

    @staticmethod
    def _concatenate(sources, limit: int) -> np.ndarray:
        parts, total = [], 0
        for data, docs in sources:
            for d in docs:
                start, length = int(data.doc_start[d]), int(data.doc_len[d])
                parts.append(np.asarray(data.tokens[start:start + min(length, limit - total)], dtype=np.int64))
                total += len(parts[-1])
                if total >= limit:
                    return np.concatenate(parts)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    @property
    def num_tokens(self) -> int:
        return self.n_rows * self.seq_len

    def batches(self):
        local = self.global_batch // self.dp_size
        for first in range(0, self.n_rows, self.global_batch):
            rows = torch.from_numpy(self.rows[first + self.dp_rank * local:first + (self.dp_rank + 1) * local].copy())
            yield {"tokens": rows[:, :-1].contiguous(), "labels": rows[:, 1:].contiguous()}


def build_validation_set(train_paths: list[str], valid_paths: list[str], valid_fraction: float, *,
                         seq_len: int, tokens: int, global_batch: int, dp_rank: int, dp_size: int,
                         vocab_size: int) -> ValidationSet:
    """From separate files, or the held-out documents of the training files (same split as
    `split_documents` gives the training stream). Token ids must fit the model's vocabulary."""
    if valid_paths:
        files = [TokenFile(p) for p in valid_paths]
        sources = [(f, np.arange(f.num_documents)) for f in files]
    else:
        files = [TokenFile(p) for p in train_paths]
        sources = [(f, split_documents(f.num_documents, valid_fraction)[1]) for f in files]
    for f in files:
        if f.max_token_id() >= vocab_size:
            raise DataError(f"validation data {f.prefix} holds token id {f.max_token_id()} >= model.vocab_size="
                             f"{vocab_size}: it was tokenized with another tokenizer; re-tokenize it with "
                             f"data.tokenizer")
    return ValidationSet(sources, seq_len=seq_len, tokens=tokens, global_batch=global_batch,
                         dp_rank=dp_rank, dp_size=dp_size)
