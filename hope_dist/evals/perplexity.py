"""Perplexity over documents scored one by one, in windows of the training context.

Why this shape: in training the fast-weight state resets at every end-of-document token and each
row of seq_len tokens starts from a fresh state, so the model never carries state across a
document or beyond one context. Here each document d (EOD last) is scored on its own: inputs
d[:-1], targets d[1:] (every token but the first, EOD included), cut into windows of `window`
inputs, each window a fresh forward. Windows are batched (right-padded; causal, so padding
changes nothing before it) and padded targets are not counted.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from hope_dist.evals.loading import EvalError, model_device


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) per position, computed in float32 or wider."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none").view(targets.shape)


def windows(docs: Iterable[np.ndarray], window: int, max_tokens: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(document index, inputs, targets) per window, until `max_tokens` targets are handed out."""
    left = max_tokens
    for i, doc in enumerate(docs):
        for a in range(0, len(doc) - 1, window):
            n = min(window, len(doc) - 1 - a, left)
            yield i, doc[a:a + n], doc[a + 1:a + 1 + n]
            left -= n
            if left == 0:
                return


@torch.no_grad()
def perplexity(model: torch.nn.Module, docs: Iterable[np.ndarray], window: int, max_tokens: int,
               batch_size: int = 8, progress: bool = True) -> dict:
    """Mean NLL (nats/token) and perplexity of up to `max_tokens` target tokens of `docs`."""
    if window < 1 or max_tokens < 1 or batch_size < 1:
        raise EvalError(f"perplexity needs a positive window ({window}), --tokens ({max_tokens}) and "
                        f"--batch-size ({batch_size})")
    device = model_device(model)
    total, count, last_doc, elapsed = 0.0, 0, -1, 0.0
    bar = tqdm(total=max_tokens, desc="perplexity", unit="tok", disable=not progress, dynamic_ncols=True)
    batch: list[tuple[np.ndarray, np.ndarray]] = []

    def run():
        nonlocal total, count, elapsed
        t0 = time.perf_counter()
        T = max(len(x) for x, _ in batch)
        x = torch.zeros(len(batch), T, dtype=torch.long)
        y = torch.zeros(len(batch), T, dtype=torch.long)
        mask = torch.zeros(len(batch), T, dtype=torch.bool)
        for b, (inp, tgt) in enumerate(batch):
            x[b, :len(inp)], y[b, :len(tgt)], mask[b, :len(tgt)] = torch.from_numpy(inp), torch.from_numpy(tgt), True
        nll = token_nll(model(x.to(device)), y.to(device))
        total += float(nll[mask.to(device)].double().sum())
        n = int(mask.sum())
        count += n
        elapsed += time.perf_counter() - t0
        bar.update(n)
        bar.set_postfix(loss=f"{total / count:.3f}", tok_s=f"{count / elapsed:.0f}")
        batch.clear()

    for doc_index, inp, tgt in windows(docs, window, max_tokens):
        last_doc = doc_index
        batch.append((inp, tgt))
        if len(batch) == batch_size:
            run()
    if batch:
        run()
    bar.close()
    if count == 0:
        raise EvalError("perplexity: the documents hold no token to score (every document is a single token)")
    loss = total / count
    return {"tokens": count, "documents": last_doc + 1, "window": window, "batch_size": batch_size,
            "loss": loss, "perplexity": math.exp(loss), "bits_per_token": loss / math.log(2),
            "tokens_per_s": count / elapsed if elapsed else None,
            "complete": count == max_tokens,
            "definition": "documents scored one by one (first token not scored, EOD scored), in windows of "
                          f"{window} tokens, fresh state per window"}
