"""lm-evaluation-harness model "hope": an exported folder (tools.convert export-hf) under lm-eval.

    python -m hope_dist.lm_eval_cli --model hope --model_args pretrained=DIR[,max_length=N,dtype=float32] --tasks ...

Importing this module registers the model (lm-eval 0.4.13 has no plugin discovery, hence the
lm_eval_cli wrapper). Every request is its own stream: HopeLM.reset() clears the fast-weight
state (memories, conv caches, KV cache) before it, so results do not depend on request order.
Requests run one at a time (batch_size is accepted and ignored).

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

from hope_dist.pretrained import from_pretrained
from hope_dist.pretrained_io import CONFIG, EOT, PretrainedError

log = logging.getLogger(__name__)
MEMORY_MIXER_MAX_LENGTH = 8192
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


class RequestTooLong(ValueError):
    """An lm-eval request the model may not read; the message names it, the limit and the fix."""


def default_max_length(folder: Path, mixer: str) -> int:
    """The training seq_len (recorded by export-hf) for attention; a compute bound otherwise."""
    import json

    if mixer != "attention":
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
                "attention positions are untrained)" if self.lm.config.mixer == "attention" else "")
                + ", or shorten the request (fewer few-shot examples, smaller max_gen_toks)")

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """log p(continuation | context) from a fresh state, and whether greedy decoding gives it."""
        if not continuation:
            return 0.0, True
        self.lm.reset()  # and one forward with no carried state (same numbers as lm.logits, fewer calls)
        with torch.no_grad():
            ids = torch.tensor([context + continuation[:-1]], device=self._device)
            logits = self.lm.model(ids)[0, len(context) - 1:]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        target = torch.tensor(continuation, device=logits.device)
        logprob = F.log_softmax(logits, -1).gather(1, target[:, None]).sum()
        return float(logprob), bool((logits.argmax(-1) == target).all())

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, instances=None):
        progress = tqdm(requests, disable=disable_tqdm, desc="hope loglikelihood")
        return [self._score(ctx, cont) for _, ctx, cont in progress]

    # ------------------------------------------------------------------ the three request types
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        encoded = []
        for req in requests:  # refuse before computing anything
            _, ctx, cont = self._encode(req)
            self._check(len(ctx) + len(cont) - 1, f"context {len(ctx)} + continuation {len(cont)} - 1", req)
            encoded.append((req, ctx, cont))
        out = []
        for req, ctx, cont in tqdm(encoded, disable=disable_tqdm, desc="hope loglikelihood"):
            out.append(self._score(ctx, cont))
            self.cache_hook.add_partial("loglikelihood", req.args, out[-1])
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
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="hope loglikelihood_rolling"):
            windows = get_rolling_token_windows(self.tok_encode(req.args[0]), self.prefix_token_id, self.max_length, 1)
            out.append(sum(self._score(*make_disjoint_window(w))[0] for w in windows))
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, out[-1])
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
