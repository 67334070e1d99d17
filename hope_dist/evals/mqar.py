"""Multi-query associative recall (MQAR, Zoology: Arora et al. 2023), generated from fixed seeds.

Why: recall of many key-value bindings from context is where fixed-size recurrent memories are
known to fall behind attention; accuracy as the number of pairs N grows shows how much a fast-weight
memory can hold. A sample is k1 v1 k2 v2 ... kN vN followed by every key once more in a seeded
order, each followed by its value: q1 a1 q2 a2 ... (4N tokens, teacher-forced). At each query
position the model must predict the value bound to that key. Keys and values are disjoint halves
of a token-id range of the model's vocabulary (EOD excluded); keys distinct within a sample.
Accuracy is the argmax over the whole vocabulary (Zoology's metric); `accuracy_values` restricts
the argmax to the value half (chance 1 / number of values).
"""
from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm

from hope_dist.evals.loading import EvalError, model_device

PAIRS = (4, 8, 16, 32, 64)


def split_vocab(lo: int, hi: int, eod_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array([i for i in range(lo, hi) if i != eod_id])
    half = len(ids) // 2
    return ids[:half], ids[half:]


def make_mqar(n_pairs: int, n_samples: int, keys: np.ndarray, values: np.ndarray, seed: int = 0
              ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (n_samples, 4N), query positions (N,)): the target of query position p is tokens[:, p + 1]."""
    if n_pairs > len(keys):
        raise EvalError(f"MQAR with {n_pairs} pairs needs {n_pairs} distinct keys; the vocabulary range gives "
                        f"{len(keys)}: use fewer --mqar-pairs or a wider --mqar-vocab")
    rng = np.random.default_rng([seed, n_pairs])
    tokens = np.zeros((n_samples, 4 * n_pairs), dtype=np.int64)
    for s in range(n_samples):
        k = rng.choice(keys, n_pairs, replace=False)
        v = rng.choice(values, n_pairs, replace=True)
        order = rng.permutation(n_pairs)
        tokens[s, 0:2 * n_pairs:2], tokens[s, 1:2 * n_pairs:2] = k, v
        tokens[s, 2 * n_pairs::2], tokens[s, 2 * n_pairs + 1::2] = k[order], v[order]
    return tokens, np.arange(2 * n_pairs, 4 * n_pairs, 2)


def check(model: torch.nn.Module, pairs, vocab: tuple[int, int] | None, eod_id: int | None
          ) -> tuple[np.ndarray, np.ndarray]:
    """(keys, values) for these settings, or an EvalError naming the setting to change."""
    lo, hi = vocab or (0, model.cfg.vocab_size)
    if not 0 <= lo < hi <= model.cfg.vocab_size:
        raise EvalError(f"--mqar-vocab {lo}:{hi}: must lie within the model's vocabulary [0, {model.cfg.vocab_size})")
    keys, values = split_vocab(lo, hi, eod_id)
    if not pairs or min(pairs) < 1 or max(pairs) > len(keys):
        raise EvalError(f"--mqar-pairs {list(pairs)}: each must be 1..{len(keys)} (distinct keys available in "
                        f"ids {lo}..{hi - 1}); use fewer pairs or a wider --mqar-vocab")
    return keys, values


@torch.no_grad()
def mqar(model: torch.nn.Module, pairs=PAIRS, n_samples: int = 64, vocab: tuple[int, int] | None = None,
         eod_id: int | None = None, batch_size: int = 16, seed: int = 0, train_seq_len: int | None = None,
         progress: bool = True) -> dict:
    """Accuracy at each number of key-value pairs."""
    lo, hi = vocab or (0, model.cfg.vocab_size)
    keys, values = check(model, pairs, vocab, eod_id)
    data = {n: make_mqar(n, n_samples, keys, values, seed) for n in pairs}  # all checked before any scoring
    device = model_device(model)
    value_ids = torch.as_tensor(values, device=device)
    rows, tokens, elapsed = [], 0, 0.0
    bar = tqdm(total=sum(t.size for t, _ in data.values()), desc="mqar", unit="tok", disable=not progress,
               dynamic_ncols=True)
    for n, (seqs, qpos) in data.items():
        right = right_values = 0
        for a in range(0, n_samples, batch_size):
            t0 = time.perf_counter()
            x = torch.from_numpy(seqs[a:a + batch_size]).to(device)
            logits = model(x)[:, torch.as_tensor(qpos, device=device)]
            target = x[:, torch.as_tensor(qpos + 1, device=device)]
            right += int((logits.argmax(-1) == target).sum())
            right_values += int((value_ids[logits[..., value_ids].argmax(-1)] == target).sum())
            elapsed += time.perf_counter() - t0
            tokens += x.numel()
            bar.update(x.numel())
        total = n_samples * len(qpos)
        rows.append({"pairs": n, "seq_len": 4 * n, "queries": total, "accuracy": right / total,
                     "accuracy_values": right_values / total,
                     "beyond_train_context": bool(train_seq_len and 4 * n > train_seq_len)})
    bar.close()
    return {"by_pairs": rows, "samples": n_samples, "vocab": [lo, hi], "keys": len(keys), "values": len(values),
            "chance_values": 1 / len(values), "tokens": tokens, "tokens_per_s": tokens / elapsed if elapsed else None,
            "definition": "k1 v1 .. kN vN then every key again (seeded order) each followed by its value; accuracy "
                          "of the argmax at each query position over the full vocabulary (accuracy_values: over "
                          "the value ids only); one forward per sample, fresh state"}
