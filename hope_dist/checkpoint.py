"""Sharded checkpoints with torch.distributed.checkpoint (DCP), committed by a marker written last.

Layout of CKPT_DIR/step-N/:
  .metadata, __R_I.distcp   DCP's index and shards (tensors keyed by FQN with their full shapes,
                            so any (dp, tp, pp) layout can load them)
  meta.json                 step, tokens, layout, resolved config, git commit, lr (FORMAT below)
  manifest.json             bytes and crc32 of every DCP file
  COMMITTED                 written last by rank 0, after every rank's shards are on disk

A folder without COMMITTED is never loaded; the next save or resume removes it. keep-last-k
prunes only committed folders older than the newest k, so the newest complete one survives.
An async save copies the state into reused CPU buffers, returns, and writes and commits from a
background thread; at most one save is in flight.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._state_dict_utils import CompanionMismatch, _copy_state_dict, _create_cpu_state_dict
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.staging import AsyncStager

from hope_dist.config import CheckpointConfig, ModelConfig

MARKER = "COMMITTED"
META = "meta.json"
MANIFEST = "manifest.json"
FORMAT = "hope_dist.checkpoint/1"
ARCHITECTURE = "HopeModel"
# Test hook: a save of this step stalls forever right before its marker (the SIGKILL test).
STALL_ENV = "HOPE_DIST_CKPT_STALL_BEFORE_COMMIT"
# Model config keys that choose an implementation, not the function: free to differ on resume.
IMPL_KEYS = ("kernel",)
_STEP = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def committed_steps(ckpt_dir: Path) -> list[int]:
    """Steps of the complete checkpoints in `ckpt_dir`, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    steps = []
    for child in ckpt_dir.iterdir():
        m = _STEP.match(child.name)
        if m and (child / MARKER).is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def remove_uncommitted(ckpt_dir: Path) -> list[Path]:
    """Delete step-N folders without a marker (left by a crashed save); returns them."""
    removed = []
    if Path(ckpt_dir).is_dir():
        for child in Path(ckpt_dir).iterdir():
            if _STEP.match(child.name) and not (child / MARKER).is_file():
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


# ------------------------------------------------------------------ files and their digests
def _dcp_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix == ".distcp" or p.name == ".metadata")


def file_digest(file: Path, block: int = 1 << 24) -> dict[str, Any]:
    """Size and crc32 of one file (zlib's crc32 runs at memory speed; shards are fresh in cache)."""
    crc = 0
    with open(file, "rb") as f:
        while chunk := f.read(block):
            crc = zlib.crc32(chunk, crc)
    return {"bytes": file.stat().st_size, "crc32": f"{crc:08x}"}


def _digests(path: Path, files: list[Path]) -> dict[str, dict]:
    return {f.name: file_digest(f) for f in files}


def verify(path: Path, checksums: bool = True, files: list[str] | None = None) -> list[str]:
    """Problems with checkpoint `path`, each naming its file; [] when it is complete and intact.
    Checks the marker, meta.json, that every file of the manifest is there with its size and
    (with `checksums`) its crc32, and that the manifest covers every shard DCP's index names.
    `files`: check only these names of the manifest (a rank's share)."""
    path = Path(path)
    if not path.is_dir():
        return [f"{path}: no such checkpoint folder"]
    problems = []
    for name in (MARKER, META, MANIFEST, ".metadata"):
        if not (path / name).is_file():
            problems.append(f"{path / name}: missing" + (" (the save did not finish)" if name == MARKER else ""))
    if problems:
        return problems
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except ValueError as e:
        return [f"{path / MANIFEST}: not valid JSON ({e})"]
    for name, want in sorted(manifest.items()):
        if files is not None and name not in files:
            continue
        f = path / name
        if not f.is_file():
            problems.append(f"{f}: shard missing")
        elif f.stat().st_size != want["bytes"]:
            problems.append(f"{f}: {f.stat().st_size} bytes, expected {want['bytes']} (truncated or replaced)")
        elif checksums and file_digest(f)["crc32"] != want["crc32"]:
            problems.append(f"{f}: crc32 mismatch (corrupt shard)")
    if any(p.startswith(f"{path / '.metadata'}:") for p in problems):
        return problems
    try:
        storage = FileSystemReader(str(path)).read_metadata().storage_data
    except Exception as e:  # whatever unpickling a damaged index raises
        return problems + [f"{path / '.metadata'}: unreadable DCP index ({type(e).__name__}: {e})"]
    for name in sorted({info.relative_path for info in storage.values()}):
        if name not in manifest:
            problems.append(f"{path / name}: referenced by .metadata but not in {MANIFEST}")
    return problems


def verify_distributed(path: Path) -> None:
    """Every rank checks its share of the files; all ranks raise the same error if any fails."""
    names = sorted(json.loads((path / MANIFEST).read_text())) if (path / MANIFEST).is_file() else None
    mine = names[_rank()::_world()] if names is not None else None
    problems = verify(path, files=mine)
    if dist.is_initialized():
        gathered: list[list[str]] = [[] for _ in range(_world())]
        dist.all_gather_object(gathered, problems)
        problems = sorted({p for ps in gathered for p in ps})
    if problems:
        raise CheckpointError(f"checkpoint {path} is damaged:\n  " + "\n  ".join(problems) +
                              "\nresume from another step-N folder (--checkpoint.resume=DIR) or delete this one")


# ------------------------------------------------------------------ meta and config checks
def read_meta(path: Path) -> dict[str, Any]:
    """meta.json of a hope_dist checkpoint, with an error naming the file if it is not one."""
    path = Path(path)
    file = path / META
    if not file.is_file():
        what = "a DCP checkpoint without hope_dist metadata" if (path / ".metadata").is_file() else "not a checkpoint"
        raise CheckpointError(f"{file}: missing; {path} is {what} (expected a step-N folder written by hope_dist)")
    try:
        meta = json.loads(file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT or meta.get("architecture") != ARCHITECTURE:
        raise CheckpointError(
            f"{file}: format {meta.get('format')!r}, architecture {meta.get('architecture')!r}; this "
            f"build reads {FORMAT!r} checkpoints of {ARCHITECTURE!r} (a checkpoint from another model?)")
    return meta


def model_config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: saved X, now Y' for every model config key that changes the function."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in keys
            if k not in IMPL_KEYS and saved.get(k) != current.get(k)]


def check_model_config(path: Path, meta: dict[str, Any], model_cfg: ModelConfig) -> None:
    diff = model_config_diff(meta["config"]["model"], dataclasses.asdict(model_cfg))
    if diff:
        what = ("another architecture" if any(d.startswith("mixer:") for d in diff)
                else "a different model configuration")
        raise CheckpointError(
            f"{Path(path) / META}: the checkpoint holds {what} than this job:\n  " + "\n  ".join(diff) +
            f"\nrun with the checkpoint's model config (see {Path(path) / META}) or use a new run_dir")


def clock_for_dp_rank(saved: list[dict[str, Any]], dp_rank: int) -> dict[str, Any]:
    """The CMS clock state of data-parallel rank `dp_rank` under a new dp size, from the states
    of every saved dp rank (with the same dp size a rank simply loads its own, bit for bit).

    Across dp sizes: a tick all-reduces (sums) the
    ranks' window accumulators, so only their total matters: new rank 0 takes the total of all
    saved ranks (summed in rank order), the others zeros. The next tick then sees the same sum,
    up to float32 rounding of the reordered additions. window_tokens counts global tokens and is
    the same on every rank."""
    acc = {}
    for name, first in saved[0]["acc"].items():
        if dp_rank == 0:
            total = first.clone()
            for other in saved[1:]:
                total += other["acc"][name]
            acc[name] = total
        else:
            acc[name] = torch.zeros_like(first)
    return {"acc": acc, "window_tokens": dict(saved[0]["window_tokens"])}


# ------------------------------------------------------------------ offline access (one process)
def tensor_keys(path: Path) -> dict[str, TensorStorageMetadata]:
    """Flattened DCP key -> full-tensor metadata (shape, dtype), from .metadata alone."""
    md = FileSystemReader(str(path)).read_metadata()
    return {k: m for k, m in md.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}


def stored_keys(path: Path) -> set[str]:
    return set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def read_flat(path: Path, prefix: str = "") -> dict[str, Any]:
    """Load every entry whose flattened key starts with `prefix` as a full tensor or object, in
    this process, without a process group (DCP reassembles the shards)."""
    md = FileSystemReader(str(path)).read_metadata()
    flat: dict[str, Any] = {}
    for key, m in md.state_dict_metadata.items():
        if key.startswith(prefix):
            flat[key] = (torch.empty(m.size, dtype=m.properties.dtype)
                         if isinstance(m, TensorStorageMetadata) else None)
    dcp.load(flat, storage_reader=FileSystemReader(str(path)), no_dist=True)
    return flat


def read_model(path: Path) -> dict[str, torch.Tensor]:
    """The model's full tensors, keyed as in HopeModel.state_dict()."""
    return {k[len("model."):]: v for k, v in read_flat(path, "model.").items()}


def write_offline(path: Path, flat: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Save a flat state (keys as DCP flattens them) from one process and commit it (tools)."""
    path = Path(path)
    if path.exists():
        raise CheckpointError(f"{path} already exists; choose a new output folder")
    path.mkdir(parents=True)
    dcp.save(flat, checkpoint_id=str(path), no_dist=True)
    _commit(path, int(meta["step"]), meta, _digests(path, _dcp_files(path)))
    return path


def _commit(path: Path, step: int, meta: dict[str, Any], digests: dict[str, dict]) -> None:
    """Rank 0, after every shard is on disk: meta, manifest, then the marker (atomically)."""
    meta = {"format": FORMAT, "architecture": ARCHITECTURE, **meta}
    (path / META).write_text(json.dumps(meta, indent=1, default=str))
    (path / MANIFEST).write_text(json.dumps(digests, indent=1, sort_keys=True))
    if os.environ.get(STALL_ENV) == str(step):
        print(f"checkpoint: stalling before committing {path} ({STALL_ENV})", flush=True)
        time.sleep(3600)
    tmp = path / (MARKER + ".tmp")
    tmp.write_text(f"{step}\n")
    os.replace(tmp, path / MARKER)


# ------------------------------------------------------------------ the trainer's checkpointer
class ReusedBufferStager(AsyncStager):
    """Async staging into CPU buffers kept from one save to the next. DCP's default stager
    allocates fresh buffers for every save and page-faults them in, which on a CPU host costs
    about as long as writing the file; reused buffers cost one memory copy of the state (the
    first save allocates them; they hold one CPU copy of this rank's state for the whole run).
    Safe because at most one save is in flight: Checkpointer.save waits for the previous write
    before it stages again. Uses torch's private state-dict copy helpers (DTensor-aware)."""

    _synchronize_after_execute = False

    def __init__(self) -> None:
        self._buffers: dict[str, Any] | None = None

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        if self._buffers is not None:
            try:
                return _copy_state_dict(state_dict, self._buffers, non_blocking=False)
            except CompanionMismatch:  # the state's structure changed: allocate anew
                pass
        self._buffers = _create_cpu_state_dict(state_dict)
        return _copy_state_dict(state_dict, self._buffers, non_blocking=False)

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        self._buffers = None


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, run_dir: Path):
        self.cfg = cfg
        self.dir = Path(cfg.dir) if cfg.dir else Path(run_dir) / "checkpoints"
        self.last_step: int | None = None  # the step of the newest save started by this process
        self._pending: Future | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stager = ReusedBufferStager() if cfg.async_save else None
        # async saves run DCP's collectives off the training thread: give them their own group
        self._pg = dist.new_group(backend="gloo") if cfg.async_save and dist.is_initialized() else None

    def path(self, step: int) -> Path:
        return self.dir / f"step-{step}"

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Write `state` (a DCP state dict) for `step`, commit, prune. With checkpoint.async_save
        this returns once the state is staged in memory; the write and commit finish behind."""
        self.wait()
        path = self.path(step)
        if _rank() == 0:
            if path.exists():
                shutil.rmtree(path)
            path.mkdir(parents=True)
        _barrier()
        self.last_step = step
        if self.cfg.async_save:
            staged = dcp.async_save(state, checkpoint_id=str(path), process_group=self._pg,
                                    async_stager=self._stager, no_dist=not dist.is_initialized())
            self._executor = self._executor or ThreadPoolExecutor(1, thread_name_prefix="ckpt-commit")
            self._pending = self._executor.submit(self._finish_async, staged, path, step, meta)
            return path
        dcp.save(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
        _barrier()
        files = _dcp_files(path)
        digests = _digests(path, files[_rank()::_world()])
        if dist.is_initialized():
            parts: list[dict] = [{} for _ in range(_world())]
            dist.all_gather_object(parts, digests)
            digests = {k: v for part in parts for k, v in part.items()}
        if _rank() == 0:
            _commit(path, step, meta, digests)
            self._prune()
        _barrier()
        return path

    def _finish_async(self, staged: Future, path: Path, step: int, meta: dict[str, Any]) -> None:
        staged.result()  # on rank 0 this returns after DCP wrote .metadata, i.e. after every rank
        if _rank() == 0:
            _commit(path, step, meta, _digests(path, _dcp_files(path)))
            self._prune()

    def wait(self) -> None:
        """Block until the in-flight async save (if any) is committed; re-raise its error."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _prune(self) -> None:
        steps = committed_steps(self.dir)
        for old in steps[:-self.cfg.keep_last]:
            shutil.rmtree(self.path(old), ignore_errors=True)
        remove_uncommitted(self.dir)

    def resume_path(self) -> Path | None:
        """The checkpoint `checkpoint.resume` asks for: newest complete (auto), none, or a folder."""
        mode = self.cfg.resume
        if mode == "never":
            return None
        if mode == "auto":
            steps = committed_steps(self.dir)
            if _rank() == 0:
                for child in remove_uncommitted(self.dir):
                    print(f"checkpoint: removed {child} (no {MARKER} marker: a save that did not finish)",
                          file=sys.stderr, flush=True)
            _barrier()
            return self.path(steps[-1]) if steps else None
        path = Path(mode)
        if not (path / MARKER).is_file():
            raise CheckpointError(
                f"checkpoint.resume={mode!r} is not a complete checkpoint (no {MARKER} marker in it); "
                f"complete ones in {self.dir}: {committed_steps(self.dir) or 'none'}")
        return path

    @staticmethod
    def load(path: Path, state: dict[str, Any]) -> None:
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
