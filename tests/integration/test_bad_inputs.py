"""The counted bad-input table (docs/reliability.md): configs and overrides, data files,
tokenizers, checkpoints and export folders, each broken on purpose and run through the real
command (pretrain.py as one process, tools.convert, data_prep.tokenize) in this process.

Every case must exit 2 with one message that names the file or key (and the fix), no traceback,
and leave nothing a later run would trust (no COMPLETE, no newly committed checkpoint, no export
folder with a config.json). `HOPE_RELIABILITY_TABLE=docs/reliability.md` writes the table.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import traceback
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import REPO, make_trainer, tiny_overrides, write_indexed_dataset
from data_prep import tokenize
from hope_dist import pretrain
from hope_dist.checkpoint import committed_steps, verify
from hope_dist.config import ConfigError, JobConfig, parse_args
from helpers.reliability_table import Table
from tools import convert

TABLE = Table("bad-inputs")
MAINS = {"pretrain.py": pretrain.main, "tools.convert": convert.main, "data_prep.tokenize": tokenize.main}
LABEL = re.compile(r"[a-z]+ error: ")  # hope_dist.errors.describe: "config error: ...", "data error: ..."


table = TABLE.fixture(REPO)


# ------------------------------------------------------------------ shared artefacts
@pytest.fixture(scope="module")
def trained(random_dataset, tmp_path_factory):
    """A committed step-2 checkpoint of the tiny job and an export of it."""
    run_dir = tmp_path_factory.mktemp("good_run")
    make_trainer(random_dataset, run_dir, **{"training.steps": 2}).train()
    export = run_dir / "export"
    assert convert.main(["export-hf", str(run_dir / "checkpoints" / "step-2"), str(export)]) == 0
    return run_dir / "checkpoints" / "step-2", export


def vocab_json(path: Path, size: int, eod: bool = True) -> Path:
    """A minimal tokenizer.json: `size` ids, id 0 = <|endoftext|> unless `eod` is false."""
    vocab = {("<|endoftext|>" if eod and i == 0 else f"t{i}"): i for i in range(size)}
    path.write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": []}, "added_tokens": []}))
    return path


def copy_dataset(dataset, tmp: Path) -> Path:
    prefix = tmp / "data" / "corpus"
    prefix.parent.mkdir(parents=True)
    for suffix in (".bin", ".idx"):
        shutil.copyfile(str(dataset[0]) + suffix, str(prefix) + suffix)
    return prefix


def patch_bytes(file: Path, offset: int, data: bytes) -> None:
    raw = bytearray(file.read_bytes())
    raw[offset:offset + len(data)] = data
    file.write_bytes(bytes(raw))


def flip_bit(file: Path) -> None:
    raw = bytearray(file.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    file.write_bytes(bytes(raw))


def copy_ckpt(trained, tmp: Path) -> Path:
    dst = tmp / "run" / "checkpoints" / "step-2"
    shutil.copytree(trained[0], dst)
    return dst


def copy_export(trained, tmp: Path) -> Path:
    dst = tmp / "export"
    shutil.copytree(trained[1], dst)
    return dst


def edit_json(file: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data))


def edit_safetensors(file: Path, edit: Callable[[dict], None]) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(str(file))
    edit(weights)
    save_file(weights, str(file), metadata={"format": "pt"})


# ------------------------------------------------------------------ the cases
@dataclass
class Env:
    """What a case builds on: its own folder, the dataset, the trained artefacts, a tokenizer."""
    tmp: Path
    dataset: tuple
    trained: tuple
    tokenizer: Path

    def train(self, prefix: Path | None = None, **extra) -> list[str]:
        prefix = prefix or self.dataset[0]
        return tiny_overrides(prefix, self.dataset[1], self.dataset[2], self.tmp / "run", **extra)

    def resume(self, ckpt: Path, **extra) -> list[str]:
        return self.train(**{"checkpoint.resume": str(ckpt), "training.steps": 4, **extra})


@dataclass
class Case:
    category: str
    name: str
    command: str
    make: Callable[[Env], list[str]]  # breaks something under env.tmp; returns the command's arguments
    expect: tuple[str, ...]  # fragments of the message: the file or key, and the fix
    untrusted: str | None = None  # a path under env.tmp that must not look complete afterwards


def _truncated_bin(e):
    p = copy_dataset(e.dataset, e.tmp)
    with open(f"{p}.bin", "r+b") as f:
        f.truncate(f.seek(0, 2) - 10)
    return e.train(p)


def _idx_header(offset, data):
    def make(e):
        p = copy_dataset(e.dataset, e.tmp)
        patch_bytes(Path(f"{p}.idx"), offset, data)
        return e.train(p)
    return make


def _missing(suffix):
    def make(e):
        p = copy_dataset(e.dataset, e.tmp)
        Path(f"{p}{suffix}").unlink()
        return e.train(p)
    return make


def _dataset_of(docs):
    def make(e):
        (e.tmp / "data").mkdir()
        return e.train(write_indexed_dataset(e.tmp / "data" / "small", docs))
    return make


def _tokenized_with(e):
    p = copy_dataset(e.dataset, e.tmp)
    Path(f"{p}.done").write_text(json.dumps({"vocab_size": 96, "eod_id": 0, "tokenizer": "/data/tok96.json"}))
    return e.train(p, **{"data.tokenizer": vocab_json(e.tmp / "tok128.json", 128), "data.eod_id": None,
                         "model.vocab_size": 128})


def _ckpt(damage, **extra):
    def make(e):
        path = copy_ckpt(e.trained, e.tmp)
        damage(path)
        return e.resume(path, **extra)
    return make


def _shard(path: Path) -> Path:
    return sorted(path.glob("*.distcp"))[0]


def _drop_optimizer_entry(path: Path) -> None:
    """A checkpoint whose (consistent, checksummed) index lacks one optimizer tensor the job needs,
    as one written with another optimizer would."""
    import pickle

    from hope_dist.checkpoint import file_crc32

    md = pickle.loads((path / ".metadata").read_bytes())
    del md.state_dict_metadata[next(k for k in sorted(md.state_dict_metadata) if k.startswith("optim.state."))]
    (path / ".metadata").write_bytes(pickle.dumps(md))
    edit_json(path / "manifest.json", lambda m: m.update({".metadata": file_crc32(path / ".metadata")}))


def _truncate(file: Path) -> None:
    with open(file, "r+b") as f:
        f.truncate(100)


def _convert_ckpt(damage, command="consolidate"):
    def make(e):
        path = copy_ckpt(e.trained, e.tmp)
        damage(path)
        out = e.tmp / ("out.safetensors" if command == "consolidate" else "out")
        return [command, str(path), str(out)]
    return make


def _import(damage, base=False):
    def make(e):
        folder = copy_export(e.trained, e.tmp)
        damage(folder)
        return ["import-hf", str(folder), str(e.tmp / "imported" / "step-2")] + (
            ["--base", str(e.trained[0])] if base else [])
    return make


def _drop_tensor(folder):
    edit_safetensors(folder / "model.safetensors", lambda w: w.pop(sorted(w)[0]))


def _reshape_tensor(folder):
    def edit(w):
        key = next(k for k in sorted(w) if w[k].dim() == 2)
        w[key] = torch.zeros(w[key].shape[0] + 1, w[key].shape[1])
    edit_safetensors(folder / "model.safetensors", edit)


def _other_model(folder):
    """Same shapes, another function: the folder is consistent, but not the base's model."""
    edit_json(folder / "config.json", lambda c: c["hope_dist"]["model"].update(rope_theta=500.0))


def _shards_with_missing(folder):
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    from safetensors import safe_open

    with safe_open(str(folder / "model-00001-of-00001.safetensors"), "pt") as f:
        keys = list(f.keys())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "model-00001-of-00002.safetensors" for k in keys}}))


def _export_with(tokenizer):
    def make(e):
        return ["export-hf", str(e.trained[0]), str(e.tmp / "exported"), "--tokenizer", str(tokenizer(e))]
    return make


def _corrupt_tokenizer(e):
    bad = e.tmp / "tokenizer.json"
    bad.write_text(e.tokenizer.read_text()[:200])
    return bad


def _big_tokenizer(e):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(e.tokenizer))
    tok.add_tokens([f"extra{i}" for i in range(100)])
    tok.save(str(e.tmp / "tokenizer.json"))
    return e.tmp / "tokenizer.json"


def _tokenize(tokenizer):
    def make(e):
        corpus = e.tmp / "corpus.jsonl"
        corpus.write_text('{"text": "the cat sat on the mat"}\n')
        return ["--input", str(corpus), "--tokenizer", str(tokenizer(e)), "--output-prefix", str(e.tmp / "out" / "c"),
                "--workers", "1"]
    return make


def _yaml_file(text):
    def make(e):
        (e.tmp / "job.yaml").write_text(text)
        return ["--config", str(e.tmp / "job.yaml")] + e.train()
    return make


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _small_vocab_data(e: Env) -> Path:
    """A validation set tokenized with a larger tokenizer: ids up to 120 against a model of 96."""
    (e.tmp / "valid").mkdir()
    docs = [np.append(np.arange(1, 121, dtype=np.int64), 0) for _ in range(8)]
    return write_indexed_dataset(e.tmp / "valid" / "v", docs)


CASES = [
    # -------------------------------------------------------------- configs and CLI overrides
    Case("config", "unknown key", "pretrain.py", lambda e: e.train(**{"model.d_modle": 64}),
         ("model.d_modle", "valid keys here")),
    Case("config", "value of the wrong type", "pretrain.py", lambda e: e.train(**{"training.steps": "ten"}),
         ("training.steps", "must be int")),
    Case("config", "inconsistent values", "pretrain.py", lambda e: e.train(**{"model.n_heads": 5}),
         ("model.n_heads=5", "pick n_heads")),
    Case("config", "missing config file", "pretrain.py", lambda e: ["--config", str(e.tmp / "nope.yaml")],
         ("nope.yaml", "does not exist")),
    Case("config", "config file that is not YAML", "pretrain.py", _yaml_file("model: {d_model: 64\ntraining: [1"),
         ("job.yaml", "not valid YAML", "line")),
    Case("config", "config file that is a list", "pretrain.py", _yaml_file("- 1\n- 2\n"),
         ("job.yaml", "mapping at the top level")),
    Case("config", "override that is not YAML", "pretrain.py", lambda e: e.train(**{"model.cms": "[{width: 32"}),
         ("--model.cms", "not valid YAML")),
    Case("config", "override without =", "pretrain.py", lambda e: ["--config", "configs/tiny.yaml", "--training.steps"],
         ("--training.steps", "--key.sub=value")),
    Case("config", "--config without a path", "pretrain.py", lambda e: ["--config"], ("--config needs a path",)),
    Case("config", "non-finite number", "pretrain.py", lambda e: e.train(**{"optim.lr": "nan"}),
         ("optim.lr", "finite")),
    Case("config", "number too large for an int", "pretrain.py", lambda e: e.train(**{"model.d_model": "1e400"}),
         ("model.d_model", "must be int")),
    Case("config", "boolean where a number goes", "pretrain.py", lambda e: e.train(**{"model.n_layers": "yes"}),
         ("model.n_layers", "must be int")),
    Case("config", "negative seed", "pretrain.py", lambda e: e.train(**{"training.seed": -1}),
         ("training.seed=-1", ">= 0")),
    Case("config", "layout that does not fit the world size", "pretrain.py", lambda e: e.train(**{"parallel.tp": 2}),
         ("parallel", "world size is 1")),
    # -------------------------------------------------------------- data files
    Case("data", "truncated .bin", "pretrain.py", _truncated_bin, ("corpus.bin", "truncated", "data_prep.tokenize")),
    Case("data", ".idx with a wrong header", "pretrain.py", _idx_header(0, b"NOTANIDX\x00"),
         ("corpus.idx", "not a Megatron", "data_prep.tokenize")),
    Case("data", ".idx with wrong counts", "pretrain.py", _idx_header(18, struct.pack("<Q", 401)),
         ("corpus.idx", "expected", "data_prep.tokenize")),
    Case("data", ".idx with another dtype", "pretrain.py", _idx_header(17, bytes([4])),
         ("corpus", "data_prep.tokenize")),
    Case("data", ".idx with an unknown dtype code", "pretrain.py", _idx_header(17, bytes([99])),
         ("corpus.idx", "unknown dtype code 99")),
    Case("data", "missing .bin", "pretrain.py", _missing(".bin"), ("corpus.bin does not exist", "data_prep.tokenize")),
    Case("data", "missing .idx", "pretrain.py", _missing(".idx"), ("corpus.idx does not exist", "data_prep.tokenize")),
    Case("data", "empty dataset", "pretrain.py", _dataset_of([]),
         ("small.idx holds no documents", "data_prep.tokenize")),
    Case("data", "fewer tokens than one sample", "pretrain.py", _dataset_of([np.array([5, 6, 0])]),
         ("small holds 3 training tokens", "seq_len")),
    Case("data", "no data paths", "pretrain.py", lambda e: e.train(**{"data.paths": "[]"}), ("data.paths",)),
    Case("data", "token ids >= model.vocab_size", "pretrain.py", lambda e: e.train(**{"model.vocab_size": 50}),
         ("model.vocab_size=50", "--model.vocab_size=96")),
    Case("data", "validation data with ids >= model.vocab_size", "pretrain.py",
         lambda e: e.train(**{"data.valid_paths": f"[{_small_vocab_data(e)}]", "eval.every": 1}),
         ("validation data", "token id 120", "re-tokenize")),
    Case("tokenizer", "tokenizer smaller than the data's ids", "pretrain.py",
         lambda e: e.train(**{"data.tokenizer": vocab_json(e.tmp / "tok50.json", 50), "data.eod_id": None}),
         ("synthetic.bin holds token id", "tok50.json", "re-tokenize")),
    Case("tokenizer", "tokenizer other than the data's (PREFIX.done)", "pretrain.py", _tokenized_with,
         ("corpus.bin was tokenized with /data/tok96.json", "tok128.json", "corpus.done")),
    Case("tokenizer", "unreadable tokenizer", "pretrain.py",
         lambda e: e.train(**{"data.tokenizer": _write(e.tmp / "tok.json", "{not json")}),
         ("cannot read tokenizer", "tok.json", "data.tokenizer")),
    Case("tokenizer", "tokenizer without an EOD token", "pretrain.py",
         lambda e: e.train(**{"data.tokenizer": vocab_json(e.tmp / "noeod.json", 96, eod=False), "data.eod_id": None}),
         ("no end-of-document id", "data.eod_id")),
    Case("tokenizer", "eod_id outside the vocabulary", "pretrain.py", lambda e: e.train(**{"data.eod_id": 500}),
         ("data.eod_id=500",)),
    Case("tokenizer", "corrupt tokenizer for data_prep.tokenize", "data_prep.tokenize",
         _tokenize(lambda e: _write(e.tmp / "bad.json", "{\"model\": 3}")), ("bad.json",), untrusted="out/c.done"),
    Case("tokenizer", "missing tokenizer for data_prep.tokenize", "data_prep.tokenize",
         _tokenize(lambda e: e.tmp / "absent.json"), ("absent.json",), untrusted="out/c.done"),
    # -------------------------------------------------------------- checkpoints
    Case("checkpoint", "bit flip in a shard", "pretrain.py", _ckpt(lambda p: flip_bit(_shard(p))),
         ("__0_0.distcp: crc32 mismatch", "--checkpoint.resume=DIR")),
    Case("checkpoint", "bit flip in the DCP index", "pretrain.py", _ckpt(lambda p: flip_bit(p / ".metadata")),
         (".metadata: crc32 mismatch", "--checkpoint.resume=DIR")),
    Case("checkpoint", "missing shard", "pretrain.py", _ckpt(lambda p: _shard(p).unlink()),
         ("distcp: shard missing", "--checkpoint.resume=DIR")),
    Case("checkpoint", "truncated shard", "pretrain.py", _ckpt(lambda p: _truncate(_shard(p))),
         ("distcp: 100 bytes, expected", "--checkpoint.resume=DIR")),
    Case("checkpoint", "missing commit marker", "pretrain.py", _ckpt(lambda p: (p / "COMMITTED").unlink()),
         ("step-2", "no COMMITTED marker")),
    Case("checkpoint", "missing commit marker (convert)", "tools.convert",
         _convert_ckpt(lambda p: (p / "COMMITTED").unlink()), ("COMMITTED: missing", "did not finish"),
         untrusted="out.safetensors"),
    Case("checkpoint", "meta.json that is not JSON", "pretrain.py",
         _ckpt(lambda p: (p / "meta.json").write_text("{")), ("meta.json: not valid JSON",)),
    Case("checkpoint", "meta.json without the config", "pretrain.py",
         _ckpt(lambda p: edit_json(p / "meta.json", lambda m: m.pop("config"))), ("meta.json", "config")),
    Case("checkpoint", "manifest.json that is not JSON", "pretrain.py",
         _ckpt(lambda p: (p / "manifest.json").write_text("[")), ("manifest.json: not valid JSON",)),
    Case("checkpoint", "checkpoint of another model config", "pretrain.py",
         _ckpt(lambda p: None, **{"model.d_model": 64}), ("meta.json", "d_model: saved 32, now 64", "run_dir")),
    Case("checkpoint", "checkpoint of another architecture", "pretrain.py",
         _ckpt(lambda p: None, **{"model.mixer": "attention"}), ("another architecture", "mixer: saved")),
    Case("checkpoint", "checkpoint without a tensor the job needs", "pretrain.py", _ckpt(_drop_optimizer_entry),
         ("step-2: this job's training state cannot be loaded", "Missing key in checkpoint state_dict: optim.state.",
          "meta.json")),
    Case("checkpoint", "resume path that does not exist", "pretrain.py",
         lambda e: e.resume(e.tmp / "nowhere" / "step-9"), ("nowhere/step-9", "no COMMITTED marker")),
    Case("checkpoint", "bit flip in a shard (convert)", "tools.convert", _convert_ckpt(lambda p: flip_bit(_shard(p))),
         ("cannot be converted", "crc32 mismatch"), untrusted="out.safetensors"),
    Case("checkpoint", "reshard to a layout the model cannot take", "tools.convert",
         lambda e: ["reshard", str(e.trained[0]), str(e.tmp / "out" / "step-2"), "--tp", "3"],
         ("parallel.tp=3",), untrusted="out/step-2"),
    # -------------------------------------------------------------- export folders
    Case("export", "missing tensor", "tools.convert", _import(_drop_tensor), ("model.safetensors", "missing ["),
         untrusted="imported/step-2"),
    Case("export", "missing tensor (import with --base)", "tools.convert", _import(_drop_tensor, base=True),
         ("model.safetensors", "missing ["), untrusted="imported/step-2"),
    Case("export", "tensor of the wrong shape", "tools.convert", _import(_reshape_tensor),
         ("model.safetensors", "config wants"), untrusted="imported/step-2"),
    Case("export", "tensor of the wrong shape (import with --base)", "tools.convert",
         _import(_reshape_tensor, base=True),
         ("model.safetensors", "config wants"), untrusted="imported/step-2"),
    Case("export", "config.json missing", "tools.convert", _import(lambda f: (f / "config.json").unlink()),
         ("config.json: missing", "export-hf"), untrusted="imported/step-2"),
    Case("export", "config.json of another architecture", "tools.convert",
         _import(lambda f: edit_json(f / "config.json", lambda c: c.update(model_type="llama"))),
         ("config.json", "not another architecture"), untrusted="imported/step-2"),
    Case("export", "config.json of another model (import with --base)", "tools.convert",
         _import(_other_model, base=True),
         ("config.json does not match the model of", "rope_theta: saved 10000.0, now 500.0"),
         untrusted="imported/step-2"),
    Case("export", "truncated safetensors file", "tools.convert", _import(lambda f: _truncate(f / "model.safetensors")),
         ("model.safetensors: unreadable", "corrupt or truncated"), untrusted="imported/step-2"),
    Case("export", "shard listed in the index missing", "tools.convert", _import(_shards_with_missing),
         ("model-00001-of-00002.safetensors: shard missing",), untrusted="imported/step-2"),
    Case("export", "export with a corrupt tokenizer", "tools.convert", _export_with(_corrupt_tokenizer),
         ("tokenizer.json", "--tokenizer"), untrusted="exported"),
    Case("export", "export with a tokenizer larger than the model", "tools.convert", _export_with(_big_tokenizer),
         ("tokenizer.json", "vocab_size is 96", "export-hf CKPT OUT --tokenizer"), untrusted="exported"),
    Case("export", "export into a folder that exists", "tools.convert",
         lambda e: ["export-hf", str(e.trained[0]), str(copy_export(e.trained, e.tmp))], ("export", "already exists")),
]


def run(command: str, argv: list[str], capfd) -> tuple[object, str]:
    """The command's exit status and stderr; an exception that escapes is reported as such."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        status = MAINS[command](argv)
    except BaseException as e:  # noqa: BLE001 - what the user would see instead of a message
        status = f"raised {type(e).__name__}"
        print(traceback.format_exc(), file=sys.stderr)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    return status, capfd.readouterr().err


def trusted_leftovers(tmp: Path, untrusted: str | None) -> list[str]:
    """Outputs a later run would take as complete."""
    found = []
    run_dir = tmp / "run"
    if (run_dir / "COMPLETE").exists():
        found.append(f"{run_dir / 'COMPLETE'}")
    if untrusted:
        out = tmp / untrusted
        if out.is_file() or (out / "COMMITTED").exists() or (out / "config.json").exists():
            found.append(str(out))
    return found


@pytest.mark.parametrize("case", CASES, ids=[f"{c.category}-{c.name}" for c in CASES])
def test_bad_input_gives_one_clear_error(case, tmp_path, random_dataset, trained, bpe_tokenizer, capfd, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("HOPE_DEBUG", raising=False)
    env = Env(tmp_path, random_dataset, trained, bpe_tokenizer)
    argv = [str(a) for a in case.make(env)]
    capfd.readouterr()
    before = committed_steps(tmp_path / "run" / "checkpoints")
    status, err = run(case.command, argv, capfd)
    problems = []
    if status != 2:
        problems.append(f"exit status {status}, expected 2")
    if "Traceback" in err:
        problems.append("a traceback")
    if not LABEL.match(err.lstrip()):
        problems.append("no one-line message first")
    problems += [f"message lacks {f!r}" for f in case.expect if f not in err]
    if committed_steps(tmp_path / "run" / "checkpoints") != before:
        problems.append("a newly committed checkpoint")
    problems += [f"left {p}" for p in trusted_leftovers(tmp_path, case.untrusted)]
    TABLE.add(case.category, case.name, case.command, err.replace(str(tmp_path), "TMP"), not problems)
    assert not problems, f"{problems}\n--- stderr:\n{err[-4000:]}"


@pytest.mark.parametrize("policy", ["stop", "continue"])
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(random_dataset, trained, tmp_path, capfd, monkeypatch,
                                                               policy):
    """A checkpoint folder on a tmpfs with room for one and a half checkpoints: the save at step 2
    fits, the next one does not. `stop`: the interval save at step 4 ends the run. `continue`: it is
    logged and skipped, and the final save at step 6 ends the run (a final save is never skipped).
    Either way one message names the full filesystem and the intact checkpoint; the partial folder
    is gone; step 2 verifies and resumes."""
    monkeypatch.chdir(REPO)
    size = sum(f.stat().st_size for f in trained[0].iterdir())
    small = tmp_path / "small_fs"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5)}", "tmpfs", str(small)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()}); this test needs root")
    try:
        ckpts = small / "ckpts"
        last = 4 if policy == "stop" else 6
        extra = {"training.steps": last, "checkpoint.interval": 2, "checkpoint.dir": ckpts,
                 "checkpoint.on_save_error": policy}
        status, err = run("pretrain.py", tiny_overrides(*random_dataset, tmp_path / "run", **extra), capfd)
        problems = [] if status == 2 else [f"exit status {status}, expected 2"]
        expect = ["is full", str(ckpts), "step-2, is intact", f"{ckpts / f'step-{last}'} could not be written"]
        if policy == "continue":
            expect.append(f"training goes on): {ckpts / 'step-4'} could not be written")
            steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
            problems += [] if steps == list(range(6)) else [f"trained steps {steps}, expected 0-5"]
        problems += [f"message lacks {f!r}" for f in expect if f not in err]
        problems += ["a traceback"] if "Traceback" in err else []
        problems += [f"left {ckpts / f'step-{s}'}" for s in (4, 6) if (ckpts / f"step-{s}").exists()]
        problems += [f"step-2 damaged: {verify(ckpts / 'step-2')}"] if verify(ckpts / "step-2") else []
        resumed = make_trainer(random_dataset, tmp_path / "run", **extra)
        resumed.maybe_resume()
        problems += [f"resumed at step {resumed.step}, not 2"] if resumed.step != 2 else []
        case = {"stop": "disk full during a save", "continue": "disk full, checkpoint.on_save_error=continue"}[policy]
        TABLE.add("environment", case, "pretrain.py", err.replace(str(tmp_path), "TMP"), not problems)
        assert not problems, f"{problems}\n--- stderr:\n{err[-3000:]}"
    finally:
        subprocess.run(["umount", str(small)], check=True)


# ------------------------------------------------------------------ property-based configs and overrides
def _leaves(cls, prefix="") -> list[str]:
    """Every dotted key of the config (sections recursed, lists such as model.cms kept whole)."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


KEYS = _leaves(JobConfig)
YAMLISH = ["[", "{a: 1}", "[1, 2]", "null", "~", ".inf", "-.nan", "1e400", "!!binary AAA", "'", "\x00", "*x",
           "&a 3", "? x", "[{width: 3}]", "[{width: 0, period: 1}]", "{}", "-1", "0", "1.5", "true", "- a"]
VALUES = st.one_of(st.integers(-2**70, 2**70).map(str), st.floats().map(str), st.sampled_from(YAMLISH),
                   st.text(max_size=12))
PROPERTY_EXAMPLES = 150


def _check_override(key: str, argv: list[str], examples: list) -> None:
    examples.append(argv)
    try:
        parse_args(["--config", "configs/tiny.yaml", *argv])
    except ConfigError as e:
        assert key.rsplit(".", 1)[-1] in str(e), (argv, str(e))


def _run_property(prop, name: str, what: str, examples: list) -> None:
    """Run a hypothesis property and count it in the table, failed or not."""
    ok = False
    try:
        prop()
        ok = True
    finally:
        TABLE.add("config (property)", name, "parse_args", f"{len(examples)} generated examples: {what}", ok)


def test_any_override_parses_or_names_its_key(monkeypatch):
    """hypothesis: --KEY=VALUE for every config key and arbitrary values (YAML fragments, huge,
    non-finite, text) gives a JobConfig or a ConfigError naming the key, never anything else."""
    monkeypatch.chdir(REPO)
    examples: list = []

    @settings(max_examples=PROPERTY_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(key=st.sampled_from(KEYS), value=VALUES)
    def prop(key, value):
        _check_override(key, [f"--{key}={value}"], examples)

    _run_property(prop, "any value for any key", "parsed, or a ConfigError naming the key", examples)


def test_unknown_or_malformed_keys_are_named(monkeypatch):
    """hypothesis: dotted keys that are not in the config (typos, extra levels, empty parts)."""
    monkeypatch.chdir(REPO)
    examples: list = []
    part = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", max_size=8)

    @settings(max_examples=PROPERTY_EXAMPLES, deadline=None, derandomize=True, database=None)
    @given(parts=st.lists(part, min_size=1, max_size=4), value=VALUES)
    def prop(parts, value):
        key = ".".join(parts)
        examples.append(key)
        try:
            parse_args(["--config", "configs/tiny.yaml", f"--{key}={value}"])
        except ConfigError as e:
            prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
            named = f"--{key}=" in str(e) or any(repr(p) in str(e) or (p and p in str(e)) for p in prefixes)
            assert named, (key, str(e))

    _run_property(prop, "unknown or malformed keys", "parsed, or a ConfigError naming the key", examples)


def test_any_yaml_config_file_loads_or_names_the_file(tmp_path):
    """hypothesis: arbitrary YAML documents (and non-YAML text) as the config file."""
    examples: list = []
    leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8))
    tree = st.recursive(leaf, lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.sampled_from(KEYS + ["model", "training", "x"]), children,
                                                        max_size=3)), max_leaves=8)
    text = st.one_of(tree.map(lambda t: yaml.safe_dump(t)), st.text(max_size=40))
    file = tmp_path / "job.yaml"

    @settings(max_examples=PROPERTY_EXAMPLES, deadline=None, derandomize=True, database=None)
    @given(doc=text)
    def prop(doc):
        examples.append(doc)
        file.write_text(doc)
        try:
            parse_args(["--config", str(file)])
        except ConfigError as e:
            assert "job.yaml" in str(e) or any(k.split(".")[-1] in str(e) for k in KEYS), (doc, str(e))

    _run_property(prop, "any YAML document as the config file", "parsed, or a ConfigError naming the file or key",
                  examples)


# ------------------------------------------------------------------ how the error reaches the user
TORCHRUN = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=1"]


def _pretrain(random_dataset, run_dir: Path, launcher: list[str], debug: bool = False, inject_nan: bool = False,
              **extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HOPE_DEBUG"}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", **({"HOPE_DEBUG": "1"} if debug else {}),
               **({"HOPE_INJECT_NONFINITE_STEP": "0"} if inject_nan else {}))
    return subprocess.run([*launcher, "hope_dist/pretrain.py", *tiny_overrides(*random_dataset, run_dir, **extra)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_a_known_error_is_one_line_on_stderr_and_exit_2(random_dataset, tmp_path):
    out = _pretrain(random_dataset, tmp_path / "run", [sys.executable], **{"model.vocab_size": 50})
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == ("data error: model.vocab_size=50 is smaller than the data's vocabulary (96); "
                                  "set --model.vocab_size=96 or larger"), out.stderr


def test_hope_debug_brings_the_traceback_back(random_dataset, tmp_path):
    out = _pretrain(random_dataset, tmp_path / "run", [sys.executable], debug=True, **{"model.vocab_size": 50})
    assert out.returncode == 1 and "Traceback (most recent call last)" in out.stderr, out.stderr
    assert "hope_dist.errors.DataError: model.vocab_size=50" in out.stderr


@pytest.mark.parametrize("kind", ["known", "unexpected"])
def test_torchrun_root_cause_shows_the_error(random_dataset, tmp_path, kind):
    """torchrun's summary carries the worker's error file: a known error's message alone (no frame
    of hope_dist anywhere in the output), any other error's traceback; never `<N/A>`."""
    if kind == "known":
        out = _pretrain(random_dataset, tmp_path / "run", TORCHRUN, **{"model.vocab_size": 50})
    else:
        out = _pretrain(random_dataset, tmp_path / "run", TORCHRUN, inject_nan=True)
    assert out.returncode != 0 and "Root Cause (first observed failure)" in out.stderr, out.stderr[-3000:]
    root = out.stderr.split("Root Cause (first observed failure)")[1]
    assert "error_file: <N/A>" not in root and "error.json" in root, root
    if kind == "known":
        assert "traceback : data error: model.vocab_size=50 is smaller than the data's vocabulary (96)" in root, root
        assert 'hope_dist/trainer.py", line' not in out.stderr
    else:
        assert "FloatingPointError: non-finite loss (nan) at step 0" in root, root
        assert 'hope_dist/trainer.py", line' in root  # the traceback, for an error nobody anticipated
