"""Passkey retrieval (needle in a haystack) at 512..16K tokens, generated here from fixed seeds.

Why: it asks whether anything written early in a long context can be read back at the end, which
is what a carried fast-weight memory is for. Each sample is `length` tokens: filler, a needle
("The pass key is 12345. Remember it. 12345 is the pass key.") at a seeded depth, and a prompt
("What is the pass key? The pass key is"). Scoring is by log-likelihood, not generation: the
right 5-digit key and `candidates - 1` distractor keys (of the same token count, so no key wins
by being shorter) are scored as continuations of the prompt
and the sample is right iff the true key's total log-probability is strictly the highest, so
chance is 1 / candidates even for an untrained model. The context is read in segments with the
state carried (memory mixers; for attention a KV cache at positions that may lie past its
trained window). Text mode uses the model's tokenizer; token mode (no tokenizer) uses fixed
token ids for the digits, the needle and prompt markers and a fixed random filler.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from hope_dist.evals.loading import EvalError, model_device

LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
PROMPT = "What is the pass key? The pass key is"
ANSWER = " {key}"


@dataclass
class Vocab:
    """How keys, needle, prompt and filler become token ids."""

    mode: str  # text | tokens
    encode: Callable[[str], list[int]] | None = None
    ids: np.ndarray | None = None  # token mode: 10 digits, 3 needle markers, 3 prompt markers, 16 filler

    @classmethod
    def text(cls, encode: Callable[[str], list[int]]) -> "Vocab":
        return cls("text", encode=encode)

    @classmethod
    def tokens(cls, vocab_size: int, eod_id: int | None) -> "Vocab":
        pool = np.array([i for i in range(vocab_size) if i != eod_id])
        if len(pool) < 32:
            raise EvalError(f"passkey in token mode needs 32 token ids besides EOD; the model has {vocab_size}")
        return cls("tokens", ids=np.random.default_rng(1234).permutation(pool)[:32])

    def _digits(self, key: str) -> list[int]:
        return [int(self.ids[int(c)]) for c in key]

    def needle(self, key: str) -> list[int]:
        if self.mode == "text":
            return self.encode(NEEDLE.format(key=key))
        return [int(i) for i in self.ids[10:13]] + self._digits(key)

    def prompt(self) -> list[int]:
        return self.encode(PROMPT) if self.mode == "text" else [int(i) for i in self.ids[13:16]]

    def answer(self, key: str) -> list[int]:
        return self.encode(ANSWER.format(key=key)) if self.mode == "text" else self._digits(key)

    def filler(self, n: int) -> list[int]:
        if self.mode == "text":
            unit = self.encode(FILLER)
        else:
            unit = [int(i) for i in np.random.default_rng(4321).choice(self.ids[16:], 64)]
        return (unit * (n // len(unit) + 1))[:n]


@dataclass
class Sample:
    length: int
    depth: float
    key: str
    context: list[int]  # exactly `length` tokens, ending with the prompt
    needle_pos: int  # context[needle_pos: needle_pos + len(needle)] is the needle
    needle: list[int]
    candidates: list[list[int]]  # continuations; candidates[answer] is the true key
    answer: int


def min_length(vocab: Vocab) -> int:
    return len(vocab.needle("00000")) + len(vocab.prompt()) + 1


def make_samples(vocab: Vocab, lengths=LENGTHS, depths=DEPTHS, per_cell: int = 1, candidates: int = 10,
                 seed: int = 0) -> list[Sample]:
    """Deterministic samples: sample i at (length, depth j) depends only on (seed, length, j, i)."""
    need = max(len(vocab.needle(str(k))) for k in (10000, 99999)) + len(vocab.prompt()) + 1
    short = [n for n in lengths if n < need]
    if short:
        raise EvalError(f"--passkey-lengths {short}: below the {need} tokens that the needle, the prompt and one "
                        "filler token take; use longer lengths")
    if not 2 <= candidates <= 1000:
        raise EvalError(f"--passkey-candidates {candidates}: need 2..1000 (the true key and distractors)")
    bad = [d for d in depths if not 0 <= d <= 1]
    if bad:
        raise EvalError(f"--passkey-depths {bad}: depths are fractions of the filler in [0, 1]")
    out = []
    for length in lengths:
        for j, depth in enumerate(depths):
            for i in range(per_cell):
                rng = np.random.default_rng([seed, length, j, i])
                pool = [str(k) for k in rng.choice(np.arange(10000, 100000), 20 * candidates, replace=False)]
                widths = [len(vocab.answer(k)) for k in pool]  # all candidates of one token count: no length bias
                common = [w for w in widths if widths.count(w) >= candidates]
                if not common:
                    raise EvalError("passkey: the tokenizer splits 5-digit keys too unevenly to find "
                                    f"{candidates} keys of one token count; use fewer --passkey-candidates")
                keys = [k for k, w in zip(pool, widths) if w == common[0]][:candidates]
                needle = vocab.needle(keys[0])
                prompt = vocab.prompt()
                n_fill = length - len(needle) - len(prompt)
                if n_fill < 1:
                    raise EvalError(f"--passkey-lengths {length}: the needle and prompt take {length - n_fill} "
                                    "tokens; use a longer length")
                filler = vocab.filler(n_fill)
                pos = int(round(depth * n_fill))
                context = filler[:pos] + needle + filler[pos:] + prompt
                order = rng.permutation(candidates)
                out.append(Sample(length, depth, keys[0], context, pos, needle,
                                  [vocab.answer(keys[k]) for k in order], int(np.flatnonzero(order == 0)[0])))
    return out


def _expand(state, n: int):
    """Repeat every tensor of a (nested) state along its batch axis n times."""
    if isinstance(state, torch.Tensor):
        return state.expand(n, *state.shape[1:]).contiguous()
    if isinstance(state, dict):
        return {k: _expand(v, n) for k, v in state.items()}
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*(_expand(v, n) for v in state))
    if isinstance(state, (list, tuple)):
        return type(state)(_expand(v, n) for v in state)
    return state


def model_scorer(model: torch.nn.Module, feed: int = 1024) -> Callable[[Sample], list[float]]:
    """Total log-probability of each candidate after the context. The context up to the last
    state_span boundary is read once in segments (a multiple of it: proj_chunk_size, CMS chunks) with the state
    carried; the rest of it and each candidate then run as one batch from copies of that state."""
    span = model.cfg.state_span
    feed = max(span, feed // span * span)
    device = model_device(model)

    @torch.no_grad()
    def score(sample: Sample) -> list[float]:
        ctx = sample.context
        boundary = (len(ctx) - 1) // span * span
        state = None
        for a in range(0, boundary, feed):
            _, state = model(torch.tensor([ctx[a:min(a + feed, boundary)]], device=device), state=state,
                             return_state=True)
        tail = ctx[boundary:]
        cands = sample.candidates
        T = len(tail) + max(len(c) for c in cands)
        x = torch.zeros(len(cands), T, dtype=torch.long)
        for b, c in enumerate(cands):
            x[b, :len(tail) + len(c)] = torch.tensor(tail + c)
        logits = model(x.to(device), state=_expand(state, len(cands)) if state is not None else None)
        logp = torch.log_softmax(logits.float(), -1)
        return [float(sum(logp[b, len(tail) + i - 1, t] for i, t in enumerate(c))) for b, c in enumerate(cands)]

    return score


def oracle_scorer(sample: Sample) -> list[float]:
    """A cheating scorer for tests: 1 for a candidate whose ids occur in the context, else 0."""
    ctx = sample.context
    return [float(any(ctx[i:i + len(c)] == c for i in range(len(ctx) - len(c) + 1))) for c in sample.candidates]


def passkey(samples: list[Sample], scorer: Callable[[Sample], list[float]], progress: bool = True,
            mode: str = "text") -> dict:
    """Accuracy per length and per (length, depth)."""
    right: dict[tuple[int, float], list[bool]] = {}
    tokens, elapsed = 0, 0.0
    for s in tqdm(samples, desc="passkey", unit="sample", disable=not progress, dynamic_ncols=True):
        t0 = time.perf_counter()
        scores = scorer(s)
        elapsed += time.perf_counter() - t0
        tokens += s.length + sum(len(c) for c in s.candidates)
        ok = scores[s.answer] > max(v for k, v in enumerate(scores) if k != s.answer)
        right.setdefault((s.length, s.depth), []).append(ok)
    lengths = sorted({s.length for s in samples})
    depths = sorted({s.depth for s in samples})
    n_cand = len(samples[0].candidates)
    by_length = [{"length": n, "accuracy": float(np.mean([ok for (m, _), v in right.items() if m == n for ok in v])),
                  "by_depth": {str(d): float(np.mean(right[(n, d)])) for d in depths}} for n in lengths]
    return {"mode": mode, "candidates": n_cand, "chance": 1 / n_cand, "samples": len(samples),
            "depths": depths, "by_length": by_length,
            "accuracy": float(np.mean([ok for v in right.values() for ok in v])),
            "tokens": tokens, "tokens_per_s": tokens / elapsed if elapsed else None,
            "definition": f"log-likelihood of the true 5-digit key vs {n_cand - 1} distractor keys of the same token "
                          "count as the continuation of the prompt; right iff strictly highest; context read with "
                          "the state carried"}
