"""Tokenizer engines behind one ``encode_batch``: Hugging Face ``tokenizers``, SentencePiece,
and tiktoken's BPE core loaded with a byte-level BPE's own merges (several times faster).

The tiktoken engine is only used when it is provably identical to ``tokenizers``: both split
text into words with the same GPT-2 pattern and encode each word on its own, so a document's
tokens are equal whenever every word's tokens are. Every distinct word of the data is therefore
checked against ``tokenizers`` the first time it is seen; a document holding a word where the two
disagree is encoded by ``tokenizers`` instead (counted in ``fallback_documents``).
Special tokens inside document text are encoded as plain text by every engine, so only the
appended EOD is ever an EOD. Shared by data_prep.tokenize and the evals (JSONL/parquet text is
tokenized exactly as for training), hence here, below both.
"""

import hashlib
import importlib.util
import json
import os

from hope_dist.data.tokenizer_info import EOD_TOKEN
from hope_dist.errors import UserError
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENGINES = ("auto", "tiktoken", "tokenizers")
MAX_CACHED_WORDS = 4_000_000  # verified words kept per worker; past that the cache restarts


class TokenizerError(UserError, ValueError):
    """A tokenizer that cannot be read or used; the message says what to pass instead."""

    label = "tokenizer error"


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted: char -> byte."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class HFEncoder:
    name = "tokenizers"

    def __init__(self, path: str, eod_token: str):
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(path)
        except Exception as e:  # the library raises bare Exceptions for unreadable files
            raise TokenizerError(f"cannot read tokenizer {path}: {e}. Pass a Hugging Face "
                                 "tokenizer.json, a SentencePiece .model, or train one with "
                                 "python -m data_prep.train_tokenizer") from e
        self.tok.encode_special_tokens = True
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.eod_id = self.tok.token_to_id(eod_token)
        if self.eod_id is None:
            raise TokenizerError(f"tokenizer {path} has no {eod_token!r} token; pass its "
                                 "end-of-document token with --eod-token")
        self.fallback_documents = 0

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]


class SentencePieceEncoder:
    name = "sentencepiece"

    def __init__(self, path: str, eod_token: str):
        import sentencepiece

        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except Exception as e:
            raise TokenizerError(f"cannot read SentencePiece model {path}: {e}") from e
        self.vocab_size = self.sp.get_piece_size()
        pid = self.sp.piece_to_id(eod_token)
        if self.sp.id_to_piece(pid) == eod_token:
            self.eod_id = pid
        elif self.sp.eos_id() >= 0:
            self.eod_id = self.sp.eos_id()
        else:
            raise TokenizerError(f"SentencePiece model {path} has neither {eod_token!r} nor an "
                                 "eos piece; pass its end-of-document piece with --eod-token")
        self.fallback_documents = 0

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=1)


def tiktoken_incompatibility(spec: dict) -> str | None:
    """Why a tokenizer.json cannot be run by tiktoken's BPE core, or None if it can."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return "model is not BPE"
    if model.get("dropout") or model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        return "BPE uses dropout, byte fallback or sub-word affixes"
    if spec.get("normalizer") is not None:
        return "tokenizer has a normalizer"
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        return "pre-tokenizer is not plain byte-level with the GPT-2 pattern"
    if any(not t.get("special") for t in spec.get("added_tokens", [])):
        return "tokenizer has non-special added tokens"
    alphabet = byte_level_alphabet()
    vocab = model["vocab"]
    if any(ch not in alphabet for tok in vocab for ch in tok):
        return "vocabulary is not byte-level"
    if len({tok for tok in vocab if len(tok) == 1}) < 256:
        return "vocabulary lacks some of the 256 byte tokens"
    ids = [vocab.get(m.replace(" ", "", 1) if isinstance(m, str) else m[0] + m[1])
           for m in model["merges"]]
    if None in ids or any(a >= b for a, b in zip(ids, ids[1:])):
        return "merge order differs from token id order"
    return None


class TiktokenEncoder:
    """tiktoken's BPE with a byte-level tokenizer.json's merges, checked word by word."""

    name = "tiktoken"

    def __init__(self, path: str, eod_token: str, spec: dict):
        import regex
        import tiktoken

        self.reference = HFEncoder(path, eod_token)
        self.vocab_size, self.eod_id = self.reference.vocab_size, self.reference.eod_id
        alphabet = byte_level_alphabet()
        ranks = {bytes(alphabet[ch] for ch in tok): i for tok, i in spec["model"]["vocab"].items()}
        self.enc = tiktoken.Encoding(f"bpe-{os.path.basename(path)}", pat_str=GPT2_PATTERN,
                                     mergeable_ranks=ranks, special_tokens={})
        self.words = regex.compile(GPT2_PATTERN)
        self.same: set[str] = set()
        self.differ: set[str] = set()
        self.fallback_documents = 0

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        out = [self.enc.encode_ordinary(t) for t in texts]
        words: set[str] = set()
        for t in texts:
            words.update(self.words.findall(t))
        unseen = list(words - self.same - self.differ)
        if len(self.same) > MAX_CACHED_WORDS:
            self.same.clear()  # bounded memory; forgotten words are simply checked again
        if unseen:
            for word, ref in zip(unseen, self.reference.encode_batch(unseen)):
                (self.same if self.enc.encode_ordinary(word) == ref else self.differ).add(word)
        if not words.isdisjoint(self.differ):
            for i, t in enumerate(texts):
                if not self.differ.isdisjoint(self.words.findall(t)):
                    out[i] = self.reference.encode_batch([t])[0]
                    self.fallback_documents += 1
        return out


def load_encoder(path: str, engine: str = "auto", eod_token: str = EOD_TOKEN):
    """The fastest engine for ``path`` that gives ``tokenizers``' exact output."""
    if not os.path.isfile(path):
        raise TokenizerError(f"tokenizer {path} does not exist; train one with "
                             "python -m data_prep.train_tokenizer")
    if engine not in ENGINES:
        raise TokenizerError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    if path.endswith(".model"):
        if engine == "tiktoken":
            raise TokenizerError("--engine tiktoken needs a byte-level BPE tokenizer.json")
        return SentencePieceEncoder(path, eod_token)
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except ValueError as e:
        raise TokenizerError(f"cannot read tokenizer {path}: not JSON ({e}). Pass a Hugging Face "
                             "tokenizer.json or a SentencePiece .model") from e
    if engine == "tokenizers":
        return HFEncoder(path, eod_token)
    try:
        reason = tiktoken_incompatibility(spec) if isinstance(spec, dict) else "not a tokenizer.json"
    except (AttributeError, KeyError, TypeError, IndexError) as e:  # malformed: `tokenizers` below names the problem
        reason = f"unexpected structure ({type(e).__name__}: {e})"
    if reason is None and importlib.util.find_spec("tiktoken") is None:
        reason = "tiktoken is not installed (pip install tiktoken)"
    if reason is None:
        return TiktokenEncoder(path, eod_token, spec)
    if engine == "tiktoken":
        raise TokenizerError(f"--engine tiktoken cannot run {path}: {reason}")
    return HFEncoder(path, eod_token)
