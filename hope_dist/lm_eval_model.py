"""lm-evaluation-harness model "hope": an exported folder (tools.convert export-hf) under lm-eval.

    python -m hope_dist.lm_eval_cli --model hope --model_args pretrained=DIR[,max_length=N,dtype=float32] --tasks ...

Importing this module registers the model (lm-eval 0.4.13 has no plugin discovery, hence the
lm_eval_cli wrapper). Every request is its own stream: a scoring forward carries no state in, and
generation resets HopeLM's fast-weight state (memories, conv caches, KV cache) first, so results do
not depend on request order.
Scoring requests (loglikelihood, rolling windows) run `batch_size` at a time: rows of one forward,
sorted by length and padded on the right, which leaves every row's earlier positions unchanged (the
model is causal and each row starts from a fresh state). generate_until runs one request at a time.

max_length bounds the tokens the model reads per request (context + continuation - 1, or prompt
+ max_gen_toks - 1); longer loglikelihood / generate_until requests are refused with an error
naming them, and rolling (perplexity) requests are cut into lm-eval's rolling windows of that
size. Default: the training seq_len for attention models (RoPE has seen no later positions);
8192 for selfmod/titans, whose state has a fixed size: a compute bound, not a model limit.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from hope_dist.dtypes import DTYPES
from hope_dist.mixer_specs import MIXERS
from hope_dist.pretrained import from_pretrained
from hope_dist.pretrained_io import CONFIG, EOT, PretrainedError

log = logging.getLogger(__name__)
MEMORY_MIXER_MAX_LENGTH = 8192


class RequestTooLong(ValueError):
    """An lm-eval request the model may not read; the message names it, the limit and the fix."""


def parse_batch_size(batch_size, max_batch_size) -> int:
    """lm-eval's batch_size (None, a number, or "auto[:N]") as a row count; auto takes max_batch_size
    (default 1): no search for the largest batch that fits."""
    if batch_size is None:
        return 1
    if str(batch_size).startswith("auto"):
        log.warning("hope: batch_size=%s does not search; using max_batch_size=%s", batch_size, max_batch_size or 1)
        return int(max_batch_size or 1)
    if not str(batch_size).isdigit() or int(batch_size) < 1:
        raise ValueError(f"model_args batch_size={batch_size!r}: give a positive number of requests per forward")
    return int(batch_size)


def default_max_length(folder: Path, mixer: str) -> int:
    """The training seq_len (recorded by export-hf) for attention; a compute bound otherwise."""
    import json

    if MIXERS[mixer].recurrent:
        return MEMORY_MIXER_MAX_LENGTH
    seq_len = json.loads((folder / CONFIG).read_text())["hope_dist"].get("source", {}).get("seq_len")
    if seq_len is None:
        raise PretrainedError(f"{folder / CONFIG}: hope_dist.source.seq_len is missing, so the attention model's "
                              f"trained context is unknown; pass it: --model_args pretrained={folder},max_length=N")
    return int(seq_len)


@register_model("hope")
class HopeEvalLM(TemplateLM):
    def __init__(self, pretrained: str, device: str | None = None, dtype: str = "float32",
                 max_length: int | None = None, eot_token: str = EOT, batch_size=None, max_batch_size=None,
                 **unused) -> None:
        super().__init__()
        if unused:
            log.warning("hope: ignoring model_args %s", sorted(unused))
        folder = Path(pretrained)
        if not (folder / CONFIG).is_file():
            raise PretrainedError(f"pretrained={pretrained}: {folder / CONFIG} missing; pass an exported folder "
                                  f"(python -m tools.convert export-hf CKPT OUT --tokenizer tokenizer.json)")
        if dtype not in DTYPES:
            raise ValueError(f"model_args dtype={dtype!r}: use one of {sorted(DTYPES)}")
        device = device or "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            log.warning("hope: device=%s but CUDA is not available; using cpu", device)
            device = "cpu"
        self.lm = from_pretrained(folder, device=device, dtype=DTYPES[dtype])  # checks the tokenizer's vocab
        if self.lm.tokenizer is None:
            raise PretrainedError(f"{folder}: no tokenizer.json; lm-eval passes text. Export again with "
                                  f"--tokenizer PATH/tokenizer.json")
        self.tokenizer = self.lm.tokenizer
        self._eot = self.tokenizer.token_to_id(eot_token)
        if self._eot is None:
            raise PretrainedError(f"{folder}/tokenizer.json has no {eot_token!r} token (lm-eval needs an end-of-text "
                                  f"id for empty contexts, rolling windows and stopping); pass eot_token=TOKEN")
        self.folder = folder
        self._device = torch.device(device)
        self.max_length = (int(max_length) if max_length is not None
                           else default_max_length(folder, self.lm.config.mixer))
        self.batch_size = parse_batch_size(batch_size, max_batch_size)

    # ------------------------------------------------------------------ TemplateLM hooks
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def tokenizer_name(self) -> str:
        return str(self.folder.resolve())

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def _check(self, n: int, what: str, req) -> None:
        if n > self.max_length:
            raise RequestTooLong(
                f"lm-eval request {req.task_name}/doc {req.doc_id} (request #{req.idx}): the model would read {n} "
                f"tokens ({what}) > max_length={self.max_length}. Raise it: --model_args "
                f"pretrained={self.folder},max_length={n}" + (" (the model was trained at this length; beyond it "
                "attention positions are untrained)" if not MIXERS[self.lm.config.mixer].recurrent else "")
                + ", or shorten the request (fewer few-shot examples, smaller max_gen_toks)")

    def _score_batch(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """log p(continuation | context) of each pair, and whether greedy decoding gives it: one forward
        with no carried state (every row fresh), rows padded on the right with end-of-text."""
        rows = [ctx + cont[:-1] for ctx, cont in pairs]
        ids = torch.full((len(rows), max(map(len, rows))), self._eot, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
        with torch.no_grad():
            logits = self.lm.model(ids.to(self._device))
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        out = []
        for i, (ctx, cont) in enumerate(pairs):
            pred = logits[i, len(ctx) - 1:len(ctx) - 1 + len(cont)]
            target = torch.tensor(cont, device=pred.device)
            logprob = F.log_softmax(pred, -1).gather(1, target[:, None]).sum()
            out.append((float(logprob), bool((pred.argmax(-1) == target).all())))
        return out

    def _score_all(self, pairs: list[tuple[list[int], list[int]]], desc: str,
                   disable_tqdm: bool) -> list[tuple[float, bool]]:
        """_score_batch over `pairs` in batches of batch_size, longest first (least padding); input order out."""
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)  # an empty continuation: nothing to score
        order = sorted((i for i, (_, cont) in enumerate(pairs) if cont), key=lambda i: -sum(map(len, pairs[i])))
        batches = [order[k:k + self.batch_size] for k in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, disable=disable_tqdm, desc=desc):
            for i, result in zip(batch, self._score_batch([pairs[i] for i in batch])):
                out[i] = result
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, instances=None):
        return self._score_all([(ctx, cont) for _, ctx, cont in requests], "hope loglikelihood", disable_tqdm)

    # ------------------------------------------------------------------ the three request types
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        encoded = []
        for req in requests:  # refuse before computing anything
            _, ctx, cont = self._encode(req)
            self._check(len(ctx) + len(cont) - 1, f"context {len(ctx)} + continuation {len(cont)} - 1", req)
            encoded.append((req, ctx, cont))
        out = self._score_all([(ctx, cont) for _, ctx, cont in encoded], "hope loglikelihood", disable_tqdm)
        for (req, _, _), result in zip(encoded, out):
            self.cache_hook.add_partial("loglikelihood", req.args, result)
        return out

    def _encode(self, req) -> tuple[tuple[str, str], list[int], list[int]]:
        """TemplateLM's encoding of one (context, continuation) request, empty context included."""
        context, continuation = req.args
        if context == "":
            cont = self.tok_encode(continuation)
            if cont and cont[0] == self.prefix_token_id:
                return (context, continuation), cont[:1], cont[1:]
            return (context, continuation), [self.prefix_token_id], cont
        ctx, cont = self._encode_pair(context, continuation)
        return (context, continuation), ctx, cont

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Every request's rolling windows, all scored in batches, summed per request."""
        owner, windows = [], []
        for n, req in enumerate(requests):
            for w in get_rolling_token_windows(self.tok_encode(req.args[0]), self.prefix_token_id, self.max_length, 1):
                owner.append(n)
                windows.append(make_disjoint_window(w))
        out = [0.0] * len(requests)
        for n, (logprob, _) in zip(owner, self._score_all(windows, "hope loglikelihood_rolling", disable_tqdm)):
            out[n] += logprob
        for req, total in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        jobs = []
        for req in requests:
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs or {}))
            prompt = self.tok_encode(context) or [self.prefix_token_id]
            self._check(len(prompt) + kwargs["max_gen_toks"] - 1,
                        f"prompt {len(prompt)} + max_gen_toks {kwargs['max_gen_toks']} - 1", req)
            jobs.append((req, prompt, kwargs))
        out = []
        for req, prompt, kwargs in tqdm(jobs, disable=disable_tqdm, desc="hope generate_until"):
            out.append(self._generate(prompt, kwargs))
            self.cache_hook.add_partial("generate_until", req.args, out[-1])
        return out

    def _generate(self, prompt: list[int], kwargs: dict) -> str:
        """Token by token from a fresh state until an `until` string, end of text or max_gen_toks."""
        until = [s for s in kwargs.get("until", []) if s]
        sample = bool(kwargs.get("do_sample")) and kwargs.get("temperature", 0.0) > 0
        temperature = kwargs.get("temperature", 0.0) if sample else 0.0
        seed = kwargs.get("seed")
        self.lm.reset()
        new: list[int] = []
        feed = prompt
        for step in range(kwargs["max_gen_toks"]):
            tok = self.lm.generate_ids(feed, 1, temperature=temperature, top_k=kwargs.get("top_k"),
                                       seed=None if seed is None else seed + step)[0]
            feed = []
            if tok == self._eot:
                break
            new.append(tok)
            text = self.tok_decode(new)
            if any(s in text for s in until):
                break
        text = self.tok_decode(new)
        cut = min((text.index(s) for s in until if s in text), default=len(text))
        return text[:cut]
