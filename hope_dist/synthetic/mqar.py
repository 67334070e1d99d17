"""Multi-query associative recall for training, after Zoology's protocol (Arora et al. 2023,
HazyResearch/zoology `zoology/data/multiquery_ar.py`): written here from its description.

A sample of length T starts with N key-value pairs k1 v1 ... kN vN (keys distinct ids from the lower
half of the vocabulary, values distinct ids from the upper half). The rest of the row holds each key
once more at an even offset drawn without replacement from a power law that favours short gaps
(p(g) ~ g^(power_a - 1)); every other position is a uniformly random token. The label of a query
position is its key's value; every other label is IGNORE, so loss and accuracy count only answers.
Token 0 is never a key or value. Fresh seeds give fresh examples: training draws batch after batch
from one generator, the test set from another seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100


@dataclass(frozen=True)
class MQARSetting:
    seq_len: int
    pairs: int
    vocab_size: int = 8192
    power_a: float = 0.01

    def __post_init__(self) -> None:
        if self.seq_len % 2 or 4 * self.pairs > self.seq_len:
            raise ValueError(f"MQAR seq_len={self.seq_len}, pairs={self.pairs}: seq_len must be even and "
                             f">= 4 * pairs (pairs, then room for every query)")
        if self.vocab_size // 2 - 1 < self.pairs or self.vocab_size <= self.seq_len:
            raise ValueError(f"MQAR vocab_size={self.vocab_size}: needs > seq_len ({self.seq_len}) and at "
                             f"least {self.pairs} keys in its lower half")


def _gap_probs(space: int, power_a: float) -> np.ndarray:
    p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    return p / p.sum()


def mqar_batch(s: MQARSetting, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels), both (n, seq_len) int64; labels are IGNORE except at query positions."""
    ctx = 2 * s.pairs
    half = s.vocab_size // 2
    keys = np.stack([rng.choice(np.arange(1, half), s.pairs, replace=False) for _ in range(n)])
    values = np.stack([rng.choice(np.arange(half, s.vocab_size), s.pairs, replace=False) for _ in range(n)])
    space = (s.seq_len - ctx) // 2
    probs = _gap_probs(space, s.power_a)
    gaps = np.stack([rng.choice(space, s.pairs, replace=False, p=probs) for _ in range(n)])
    row = np.zeros((n, s.seq_len + 1), dtype=np.int64)
    row[:, 0:ctx:2], row[:, 1:ctx:2] = keys, values
    np.put_along_axis(row, ctx + 2 * gaps, keys, axis=1)
    labels = np.full((n, s.seq_len + 1), IGNORE, dtype=np.int64)
    np.put_along_axis(labels, ctx + 2 * gaps + 1, values, axis=1)
    inputs, labels = row[:, :-1], labels[:, 1:]
    empty = inputs == 0
    inputs[empty] = rng.integers(0, s.vocab_size, size=int(empty.sum()))
    return torch.from_numpy(inputs.copy()), torch.from_numpy(labels.copy())
