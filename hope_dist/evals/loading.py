"""What an evaluation reads: the model, its tokenizer and the documents to score.

Everything is checked here, before any evaluation runs, so a bad input fails in seconds with a
message naming the file and the fix instead of after an hour of scoring: an uncommitted or damaged
checkpoint (hope_dist.checkpoint.verify, the same check tools.convert makes), a tokenizer with more
tokens than the model's vocabulary, missing or empty data, token ids the model cannot embed.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hope_dist.checkpoint import CheckpointError, committed_steps, read_meta, read_model, verify
from hope_dist.config import ConfigError, ModelConfig, from_dict
from hope_dist.dtypes import DTYPES
from hope_dist.errors import UserError
from hope_dist.model import HopeModel
from hope_dist.pretrained_io import build_from_weights, read_config, read_weights

_STEP = re.compile(r"^step-\d+$")


class EvalError(UserError, ValueError):
    """An input an evaluation cannot use; the message names it and says what to do."""

    label = "eval error"


@dataclass
class Loaded:
    """A model ready to evaluate, with what its training knew about context and tokens."""

    model: HopeModel
    source: str
    kind: str  # "checkpoint" | "export"
    step: int | None
    seq_len: int | None  # training context, None when the folder does not record it
    tokenizer: str | None  # path of a tokenizer.json / .model matching the model, if known
    eod_id: int | None

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> dict:
        return {"source": self.source, "kind": self.kind, "step": self.step, "mixer": self.cfg.mixer,
                "parameters": sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values()),
                "vocab_size": self.cfg.vocab_size, "train_seq_len": self.seq_len,
                "proj_chunk_size": self.cfg.proj_chunk_size, "tokenizer": self.tokenizer, "eod_id": self.eod_id,
                "device": str(self.device), "dtype": str(next(self.model.parameters()).dtype)}


# ------------------------------------------------------------------ models
def _checkpoint_problems(path: Path) -> list[str]:
    problems = verify(path)
    if not problems:
        return []
    if path.parent.is_dir():
        done = committed_steps(path.parent)
        problems.append(f"committed checkpoints next to it: {', '.join(f'step-{s}' for s in done)}" if done
                        else f"no committed step-N folder in {path.parent}; train further or export another run")
    return problems


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: str = "float32",
               seq_len: int | None = None, tokenizer: str | None = None) -> Loaded:
    """A committed step-N checkpoint folder or an export-hf folder -> Loaded (model in eval mode)."""
    path = Path(path)
    if not path.is_dir():
        raise EvalError(f"{path}: no such folder; pass a committed RUN_DIR/checkpoints/step-N folder "
                        "or a folder written by python -m tools.convert export-hf")
    if (path / "config.json").is_file():
        loaded = _load_export(path, device, DTYPES[dtype])
    elif (path / "meta.json").is_file() or (path / ".metadata").is_file() or _STEP.match(path.name):
        loaded = _load_checkpoint(path, device, DTYPES[dtype])
    elif (path / "checkpoints").is_dir():
        done = committed_steps(path / "checkpoints")
        raise EvalError(f"{path} is a run directory; pass one of its checkpoints, e.g. "
                        f"{path / 'checkpoints' / f'step-{done[-1]}'}" if done else
                        f"{path} is a run directory without a committed checkpoint")
    else:
        raise EvalError(f"{path}: neither a checkpoint (no meta.json / COMMITTED) nor an exported folder "
                        "(no config.json)")
    if seq_len is not None:
        loaded.seq_len = seq_len
    if tokenizer is not None:
        if not Path(tokenizer).is_file():
            raise EvalError(f"--tokenizer {tokenizer}: no such file")
        loaded.tokenizer = str(tokenizer)
    if loaded.tokenizer is not None:
        vocab, eod = tokenizer_vocab(loaded.tokenizer)
        if vocab > loaded.cfg.vocab_size:
            raise EvalError(f"tokenizer {loaded.tokenizer} has {vocab} tokens but the model's vocabulary is "
                            f"{loaded.cfg.vocab_size} (model.vocab_size): it is not this model's tokenizer; "
                            "pass the one the model was trained with (--tokenizer PATH)")
        loaded.eod_id = eod if eod is not None else loaded.eod_id
    return loaded


def _load_checkpoint(path: Path, device, dtype) -> Loaded:
    problems = _checkpoint_problems(path)
    if problems:
        raise EvalError(f"{path} is not a complete committed checkpoint:\n  " + "\n  ".join(problems))
    try:
        meta = read_meta(path)
        config = meta["config"]
        model_cfg = from_dict(ModelConfig, config["model"], prefix="model")
    except (CheckpointError, ConfigError, KeyError) as e:
        raise EvalError(f"{path / 'meta.json'}: cannot read the model config ({e})") from None
    model = build_from_weights(model_cfg, read_model(path), str(path), device, dtype)
    data = config.get("data", {})
    tok = data.get("tokenizer")
    tok = tok if tok and Path(tok).is_file() else None
    return Loaded(model, str(path), "checkpoint", meta.get("step"), config.get("training", {}).get("seq_len"),
                  tok, data.get("eod_id"))


def _load_export(path: Path, device, dtype) -> Loaded:
    model_cfg = read_config(path)
    model = build_from_weights(model_cfg, read_weights(path), str(path), device, dtype)
    config = json.loads((path / "config.json").read_text())
    source = config.get("hope_dist", {}).get("source", {})
    seq_len = source.get("seq_len")  # written by tools.convert export-hf
    if seq_len is None and source.get("checkpoint") and (Path(source["checkpoint"]) / "meta.json").is_file():
        try:  # the checkpoint it was exported from, if still there, knows the training context
            seq_len = read_meta(Path(source["checkpoint"]))["config"].get("training", {}).get("seq_len")
        except (CheckpointError, KeyError, ValueError):
            seq_len = None
    tok = path / "tokenizer.json"
    return Loaded(model, str(path), "export", source.get("step"), seq_len,
                  str(tok) if tok.is_file() else None, None)


# ------------------------------------------------------------------ tokenizers
def tokenizer_vocab(path: str) -> tuple[int, int | None]:
    from hope_dist.data.tokenizer_info import tokenizer_info

    try:
        return tokenizer_info(str(path))
    except ValueError as e:
        raise EvalError(str(e)) from None


def load_encoder(loaded: Loaded):
    """The training data's encoder for the model's tokenizer (hope_dist.data.encoders, as data_prep.tokenize)."""
    from hope_dist.data.encoders import TokenizerError, load_encoder as load

    if loaded.tokenizer is None:
        raise EvalError("this eval needs the model's tokenizer and none is known (the export has no "
                        "tokenizer.json, the checkpoint's data.tokenizer is missing): pass --tokenizer PATH")
    try:
        return load(loaded.tokenizer)
    except TokenizerError as e:
        raise EvalError(str(e)) from None


# ------------------------------------------------------------------ documents
def data_kind(path: str) -> str:
    """megatron | jsonl | parquet for an existing, non-empty input; otherwise an EvalError."""
    p = Path(path)
    for suffix in (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet"):
        if p.name.endswith(suffix):
            if not p.is_file():
                raise EvalError(f"--data {path}: no such file")
            if p.stat().st_size == 0:
                raise EvalError(f"--data {path}: the file is empty; pass a file with documents")
            return "parquet" if suffix == ".parquet" else "jsonl"
    prefix = str(p)[:-4] if p.suffix in (".bin", ".idx") else str(p)
    missing = [f"{prefix}{s}" for s in (".bin", ".idx") if not Path(prefix + s).is_file()]
    if missing:
        raise EvalError(f"--data {path}: {' and '.join(missing)} missing; pass a Megatron prefix (PREFIX.bin/.idx "
                        "written by python -m data_prep.tokenize), a .jsonl (field 'text') or a .parquet file")
    return "megatron"


def open_documents(path: str, loaded: Loaded, text_key: str = "text",
                   heldout: float | None = None) -> Iterator[np.ndarray]:
    """Token ids (int64, EOD last) of each document of `path`, in file order, checked against
    the model's vocabulary. JSONL / parquet text is tokenized with the model's tokenizer and
    gets EOD appended, as data_prep.tokenize does for training. With `heldout` = F (Megatron
    prefixes only), only the documents a run with `data.valid_fraction: F` held out from training
    are read (hope_dist/data/validation.py's split). The file and tokenizer are checked now; the
    documents are read lazily."""
    kind = data_kind(path)
    if heldout is not None and kind != "megatron":
        raise EvalError(f"--heldout {heldout} needs --data as a Megatron PREFIX (the split is by its documents), "
                        f"not {path}")
    if heldout is not None and not 0 < heldout < 1:
        raise EvalError(f"--heldout {heldout}: must be in (0, 1), the run's data.valid_fraction")
    if kind == "megatron":
        from hope_dist.data.megatron_format import FormatError
        from hope_dist.data.token_file import TokenFile
        from hope_dist.data.validation import split_documents

        try:
            tf = TokenFile(path)
        except (FormatError, OSError) as e:
            raise EvalError(f"--data {path}: {e}") from None
        chosen = range(len(tf.doc_len)) if heldout is None else split_documents(len(tf.doc_len), heldout)[1]
        docs = ((tf.tokens[tf.doc_start[i]:tf.doc_start[i] + tf.doc_len[i]].astype(np.int64),
                 f"{tf.prefix}.bin document {i}") for i in map(int, chosen))
    else:
        docs = _tokenized(path, load_encoder(loaded), text_key)
    return _checked(docs, path, loaded.cfg.vocab_size)


def _checked(docs, path: str, vocab: int) -> Iterator[np.ndarray]:
    count = 0
    for ids, where in docs:
        if len(ids) and int(ids.max()) >= vocab:
            raise EvalError(f"{where}: token id {int(ids.max())} >= the model's vocab_size {vocab}; the data was "
                            "tokenized with another tokenizer: re-tokenize it with the model's")
        count += 1
        yield ids
    if count == 0:
        raise EvalError(f"--data {path}: holds no documents; pass a file with documents")


def _tokenized(path: str, encoder, text_key: str) -> Iterator[tuple[np.ndarray, str]]:
    from hope_dist.data.readers import DocumentReader, InputError, plan_shards

    eod = [encoder.eod_id] if encoder.eod_id is not None else []
    try:
        shards, _ = plan_shards([path], None)
        reader = DocumentReader(text_key, strict=False)
        i = 0
        for shard in shards:
            for text, _ in reader.read(shard):
                yield np.asarray(encoder.encode_batch([text])[0] + eod, dtype=np.int64), f"{path} document {i}"
                i += 1
    except InputError as e:
        raise EvalError(str(e)) from None


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
