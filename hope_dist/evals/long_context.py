"""Loss by position over documents longer than the training context, state carried vs reset.

Why: a HOPE / Titans layer keeps a fixed-size fast-weight state, so it can read a document of
any length in segments of S tokens, handing the state from one segment to the next
(model(x, state=..., return_state=True)). If the memory helps, loss at late positions is lower
with the state carried than with it reset at every segment. The memory op counts its chunks
from the start of each call, so carrying equals one long forward exactly only when S is a
multiple of model.state_span (proj_chunk_size, and in-context CMS chunks, which count the same way;
checked; tests/unit/test_evaluate.py checks the equality to 1e-5).
Attention has no fixed-size state: carrying it means a KV cache over the whole document, at
positions past the trained window, so attention is scored within its window only (reset).
"""
from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
import torch
from tqdm import tqdm

from hope_dist.evals.loading import EvalError, model_device
from hope_dist.evals.perplexity import token_nll

ATTENTION_NOTE = ("attention has no fixed-size state to carry (carrying would mean a KV cache over the whole "
                  "document at positions past its trained window): it is scored within its window only, "
                  "reset at every segment")


def check_segment(model: torch.nn.Module, segment: int, length: int | None = None) -> None:
    """S must be a positive multiple of model.state_span (memory mixers: proj_chunk_size and the in-context
    CMS chunks) and shorter than the documents."""
    cfg = model.cfg
    if segment < 1:
        raise EvalError(f"--segment {segment}: must be positive")
    span = cfg.state_span
    if cfg.mixer_spec.recurrent and segment % span:
        lo = segment // span * span
        chunks = [c for c in cfg.cms_chunks if c]
        what = f"model.proj_chunk_size={cfg.proj_chunk_size}" + (f" and the in-context CMS chunks {chunks} (lcm {span})"
                                                       if chunks else "")
        raise EvalError(f"--segment {segment} is not a multiple of {what}: the memory op (and in-context CMS levels) "
                        f"count chunks from the start of each call, so only such segments carry the state exactly; "
                        f"use --segment {max(lo, span)} or {lo + span}")
    if length is not None and length <= segment:
        raise EvalError(f"--long-len {length} must exceed --segment {segment}: the eval compares positions "
                        "beyond one segment")


@torch.no_grad()
def segmented_logits(model: torch.nn.Module, tokens: torch.Tensor, segment: int, carry: bool) -> torch.Tensor:
    """Logits of `tokens` (B, T) read in segments of `segment`, the state carried or reset."""
    out, state = [], None
    for a in range(0, tokens.shape[1], segment):
        x = tokens[:, a:a + segment]
        if carry:
            y, state = model(x, state=state, return_state=True)
        else:
            y = model(x)
        out.append(y)
    return torch.cat(out, dim=1)


def bucket_edges(length: int, segment: int, kind: str = "segment") -> list[int]:
    """Position bucket edges over [0, length): every `segment` tokens, or powers of two."""
    if kind == "segment":
        edges = list(range(0, length, segment))
    elif kind == "pow2":
        edges = [0] + [1 << i for i in range(length.bit_length()) if (1 << i) < length]
    else:
        raise EvalError(f"--buckets {kind!r}: choose segment or pow2")
    return edges + [length]


@torch.no_grad()
def long_context(model: torch.nn.Module, docs: Iterable[np.ndarray], length: int, segment: int,
                 max_docs: int, batch_size: int = 4, buckets: str = "segment", progress: bool = True) -> dict:
    """Mean loss per position bucket over the first `length` targets of up to `max_docs`
    documents longer than `length` tokens, carry vs reset."""
    check_segment(model, segment, length)
    edges = bucket_edges(length, segment, buckets)
    modes = ("carry", "reset") if model.cfg.mixer_spec.recurrent else ("reset",)
    device = model_device(model)
    sums = {m: np.zeros(length) for m in modes}
    n_docs, elapsed, seen = 0, 0.0, 0
    bar = tqdm(total=max_docs * length * len(modes), desc="long_context", unit="tok", disable=not progress,
               dynamic_ncols=True)

    def run(rows):
        nonlocal n_docs, elapsed
        t0 = time.perf_counter()
        x = torch.from_numpy(np.stack(rows)).to(device)
        for m in modes:
            nll = token_nll(segmented_logits(model, x[:, :-1], segment, m == "carry"), x[:, 1:])
            sums[m] += nll.double().sum(0).cpu().numpy()
            bar.update(x.shape[0] * length)
        n_docs += len(rows)
        elapsed += time.perf_counter() - t0

    rows = []
    for doc in docs:
        seen += 1
        if len(doc) < length + 1:
            continue
        rows.append(doc[:length + 1])
        if len(rows) == batch_size or n_docs + len(rows) == max_docs:
            run(rows)
            rows = []
        if n_docs == max_docs:
            break
    if rows:
        run(rows)
    bar.close()
    if n_docs == 0:
        raise EvalError(f"long_context: none of the {seen} documents read has more than --long-len {length} tokens; "
                        "pass a smaller --long-len or data with longer documents")
    per_pos = {m: s / n_docs for m, s in sums.items()}
    table = []
    for a, b in zip(edges[:-1], edges[1:]):
        row = {"start": a, "end": b}
        row.update({m: float(per_pos[m][a:b].mean()) for m in modes})
        table.append(row)
    result = {"segment": segment, "length": length, "documents": n_docs, "modes": list(modes), "buckets": table,
              "bucket_kind": buckets, "loss": {m: float(per_pos[m].mean()) for m in modes},
              "tokens": n_docs * length * len(modes), "tokens_per_s": n_docs * length * len(modes) / elapsed,
              "definition": f"first {length} targets of documents longer than that, read in segments of {segment} "
                            "tokens; carry: fast-weight state handed from segment to segment; reset: fresh state "
                            "per segment; loss in nats/token averaged per position bucket"}
    if not model.cfg.mixer_spec.recurrent:
        result["note"] = ATTENTION_NOTE
    return result
