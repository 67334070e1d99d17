"""A DeepSpeed checkpoint is read without running code its pickles carry (hope_dist/parallel/deepspeed_checkpoint.py):
a file whose object would write a file when unpickled is refused with one line naming the file and the global,
and the payload never runs. Needs no DeepSpeed install, as tools.convert does not."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from hope_dist.checkpoint import DEEPSPEED_MODEL, CheckpointError, commit_folder, file_digests
from hope_dist.config import ModelConfig
from hope_dist.parallel.deepspeed_checkpoint import check_folder, load_tensors, read_model
from tools import convert


class Payload:
    """Unpickling this calls shutil.copyfile(this file, marker): code a checkpoint from elsewhere could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return shutil.copyfile, (__file__, str(self.marker))


def deepspeed_folder(path: Path, module: dict, extra=None) -> Path:
    """A committed step folder as parallel.engine=deepspeed writes it (model file, meta, manifest, marker)."""
    path.mkdir(parents=True)
    torch.save({"module": module, "extra": extra}, path / DEEPSPEED_MODEL)
    meta = {"step": 1, "layout": {"dp": 1, "tp": 1, "pp": 1}, "engine": "deepspeed",
            "config": {"model": dataclasses.asdict(ModelConfig())}}
    commit_folder(path, 1, meta, file_digests([path / DEEPSPEED_MODEL]))
    return path


def test_plain_tensors_load(tmp_path):
    weights = {"embed.weight": torch.randn(3, 2)}
    folder = deepspeed_folder(tmp_path / "step-1", weights, extra={"skipped_steps": 0, "shape": torch.Size([3, 2])})
    assert torch.equal(read_model(folder)["embed.weight"], weights["embed.weight"])
    check_folder(folder)


def test_a_pickled_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    folder = deepspeed_folder(tmp_path / "step-1", {"w": torch.ones(2)}, extra=Payload(marker))
    file = folder / DEEPSPEED_MODEL
    for read in (read_model, check_folder, lambda f: load_tensors(f / DEEPSPEED_MODEL)):
        with pytest.raises(CheckpointError) as err:
            read(folder)
        message = str(err.value)
        assert "\n" not in message
        assert message.startswith(f"{file}: refused to unpickle shutil.copyfile, which could run code"), message
    assert not marker.exists()
    torch.load(file, weights_only=False)  # the same file unpickled the unsafe way does run it
    assert marker.exists()


def test_convert_refuses_it_with_one_line(tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    folder = deepspeed_folder(tmp_path / "step-1", {"w": torch.ones(2)}, extra=Payload(marker))
    assert convert.main(["consolidate", str(folder), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"checkpoint error: {folder / DEEPSPEED_MODEL}: refused to unpickle shutil.copyfile")
    assert "\n" not in err and not marker.exists()


def test_not_a_torch_file_is_named(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match=f"{bad}: not a readable torch checkpoint"):
        load_tensors(bad)
