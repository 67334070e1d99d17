"""`from_pretrained`: an exported folder (its format: hope_dist/pretrained_io.py) as a `HopeLM`
for scoring and generation.

`HopeLM` carries the fast-weight state across calls. A memory op counts its chunks from the
start of each call, so the state is carried only at multiples of `model.state_span` tokens
(proj_chunk_size, and the in-context CMS chunks if any): the session keeps the state at the last such
boundary and re-runs the tokens after it (fewer than the span) with every call. Scoring or
generating piece by piece therefore computes exactly what one forward over the whole text computes,
for all three mixers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from hope_dist.model import HopeModel
from hope_dist.pretrained_io import (CONFIG, INDEX, TOKENIZER, WEIGHTS, PretrainedError, build_from_weights,
                                     check_tokenizer, read_config, read_weights)


@dataclass
class Score:
    token_ids: list[int]
    logprobs: torch.Tensor  # log p(token_i | everything before it); the session's first token has none

    @property
    def total(self) -> float:
        return float(self.logprobs.sum())

    @property
    def perplexity(self) -> float:
        return float(torch.exp(-self.logprobs.mean())) if len(self.logprobs) else float("nan")


class HopeLM:
    """An exported model with a running context: `score` and `generate` continue where the last
    call stopped (fast-weight state, conv caches, KV cache) until `reset()`."""

    def __init__(self, model: HopeModel, tokenizer=None):
        self.model = model
        self.config = model.cfg
        self.tokenizer = tokenizer
        self.span = model.cfg.state_span  # state is carried at multiples of this many tokens
        self.reset()

    def reset(self) -> None:
        self._state: list | None = None  # per-layer state at the last span boundary
        self._tail: list[int] = []  # tokens since that boundary (< span)
        self._next_logits: torch.Tensor | None = None  # prediction for the next token

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """Append `ids` to the context; return their logits (len(ids), vocab): row i predicts
        the token after ids[i]."""
        out = []
        tail, fresh = list(self._tail), list(ids)
        while fresh:
            take = min(len(fresh), self.span - len(tail))
            window = tail + fresh[:take]
            x = torch.tensor([window], dtype=torch.long, device=self.device)
            y, state = self.model(x, state=self._state, return_state=True)
            out.append(y[0, len(tail):])
            fresh = fresh[take:]
            if len(window) == self.span:
                self._state, tail = state, []
            else:
                tail = window
        self._tail = tail
        result = torch.cat(out) if out else torch.empty(0, self.config.vocab_size, device=self.device)
        if len(result):
            self._next_logits = result[-1]
        return result

    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise PretrainedError("this folder has no tokenizer.json; pass token ids (score_ids / generate_ids) "
                                  "or export with --tokenizer")
        return self.tokenizer.encode(text).ids

    def score_ids(self, ids: list[int]) -> Score:
        """Log-likelihood of `ids` following the current context."""
        prev = self._next_logits
        logits = self.logits(ids)
        preds = logits[:-1] if prev is None else torch.cat([prev[None], logits[:-1]])
        preds = preds.to(torch.promote_types(preds.dtype, torch.float32))
        targets = torch.tensor(ids[1:] if prev is None else ids, device=logits.device)
        logprobs = (F.log_softmax(preds, dim=-1).gather(1, targets[:, None])[:, 0] if len(targets)
                    else preds.new_zeros(0))
        return Score(list(ids), logprobs.cpu())

    def score(self, text: str) -> Score:
        return self.score_ids(self._encode(text))

    @torch.no_grad()
    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                     top_k: int | None = None, seed: int | None = None, stop_id: int | None = None) -> list[int]:
        """Feed the prompt, then sample: greedy at temperature 0, else softmax(logits / T) over
        the top_k. The generated tokens stay in the context."""
        if prompt_ids:
            self.logits(prompt_ids)
        if self._next_logits is None:
            raise ValueError("generate needs a prompt or an earlier call: there is nothing to continue")
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        new: list[int] = []
        for _ in range(max_new_tokens):
            logits = self._next_logits
            if temperature <= 0:
                tok = int(logits.argmax())
            else:
                scaled = logits.cpu() / temperature
                if top_k is not None:
                    kth = scaled.topk(min(top_k, scaled.numel())).values[-1]
                    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
                tok = int(torch.multinomial(scaled.softmax(-1), 1, generator=gen))
            new.append(tok)
            self.logits([tok])
            if stop_id is not None and tok == stop_id:
                break
        return new

    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int | None = None, seed: int | None = None) -> str:
        eod = self.tokenizer.token_to_id("<|endoftext|>") if self.tokenizer is not None else None
        ids = self.generate_ids(self._encode(prompt), max_new_tokens, temperature, top_k, seed, stop_id=eod)
        return self.tokenizer.decode(ids)


def from_pretrained(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> HopeLM:
    """Load an exported folder for scoring and generation (see HopeLM)."""
    folder = Path(path)
    model_cfg = read_config(folder)
    tokenizer = None
    if (folder / TOKENIZER).is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(folder / TOKENIZER))
        check_tokenizer(tokenizer, model_cfg.vocab_size, folder / TOKENIZER)
    files = folder / (INDEX if (folder / INDEX).is_file() else WEIGHTS)
    model = build_from_weights(model_cfg, read_weights(folder), f"{files} vs {folder / CONFIG}", device, dtype)
    return HopeLM(model, tokenizer)
