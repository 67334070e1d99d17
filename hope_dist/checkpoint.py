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
background thread; at most one save is in flight. What the state holds, and who owns each entry:
hope_dist/checkpoint_manager.py.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.staging import AsyncStager

from hope_dist.config import CheckpointConfig, ModelConfig
from hope_dist.deadline import group_construction
from hope_dist.errors import UserError
from hope_dist.torch_compat import CompanionMismatch, copy_state_dict, create_cpu_state_dict, skip_sync_after_stage

MARKER = "COMMITTED"
META = "meta.json"
MANIFEST = "manifest.json"
FORMAT = "hope_dist.checkpoint/1"
ARCHITECTURE = "HopeModel"
# Model config keys that choose an implementation, not the function: free to differ on resume.
IMPL_KEYS = ("kernel",)
DEEPSPEED_MODEL = "mp_rank_00_model_states.pt"  # DeepSpeed's module weights (whole under ZeRO 1/2), by rank 0
_STEP = re.compile(r"^step-(\d+)$")
log = logging.getLogger(__name__)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the fix."""

    label = "checkpoint error"


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


def file_crc32(file: Path, block: int = 1 << 24) -> dict[str, Any]:
    """Size and crc32 of one file (zlib's crc32 runs at memory speed; shards are fresh in cache)."""
    crc = 0
    with open(file, "rb") as f:
        while data := f.read(block):
            crc = zlib.crc32(data, crc)
    return {"bytes": file.stat().st_size, "crc32": f"{crc:08x}"}


def file_digests(files: list[Path]) -> dict[str, dict]:
    """The manifest's entries of `files`: name -> size and crc32."""
    return {f.name: file_crc32(f) for f in files}


def verify(path: Path, checksums: bool = True, files: list[str] | None = None) -> list[str]:
    """Problems with checkpoint `path`, each naming its file; [] when it is complete and intact.
    Checks the marker, meta.json, that every file of the manifest is there with its size and
    (with `checksums`) its crc32, and that the manifest covers every shard DCP's index names.
    `files`: check only these names of the manifest (a rank's share)."""
    path = Path(path)
    if not path.is_dir():
        return [f"{path}: no such checkpoint folder"]
    problems = []
    deepspeed = (path / DEEPSPEED_MODEL).is_file()  # parallel.engine=deepspeed's own files: no DCP index
    for name in (MARKER, META, MANIFEST) + (() if deepspeed else (".metadata",)):
        if not (path / name).is_file():
            problems.append(f"{path / name}: missing" + (" (the save did not finish)" if name == MARKER else ""))
    if problems:
        return problems
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except ValueError as e:
        return [f"{path / MANIFEST}: not valid JSON ({e})"]
    if not isinstance(manifest, dict):
        return [f"{path / MANIFEST}: not a mapping of file names to sizes and checksums"]
    for name, want in sorted(manifest.items()):
        if files is not None and name not in files:
            continue
        f = path / name
        if not f.is_file():
            problems.append(f"{f}: shard missing")
        elif f.stat().st_size != want["bytes"]:
            problems.append(f"{f}: {f.stat().st_size} bytes, expected {want['bytes']} (truncated or replaced)")
        elif checksums and file_crc32(f)["crc32"] != want["crc32"]:
            problems.append(f"{f}: crc32 mismatch (corrupt shard)")
    if deepspeed or any(p.startswith(f"{path / '.metadata'}:") for p in problems):
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
    try:
        names = sorted(json.loads((path / MANIFEST).read_text()))
    except (OSError, ValueError, TypeError):  # missing or unreadable: verify() names the problem
        names = None
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
    if not isinstance(meta, dict):
        raise CheckpointError(f"{file}: holds a JSON {type(meta).__name__}, not hope_dist's metadata object")
    if meta.get("format") != FORMAT or meta.get("architecture") != ARCHITECTURE:
        raise CheckpointError(
            f"{file}: format {meta.get('format')!r}, architecture {meta.get('architecture')!r}; this "
            f"build reads {FORMAT!r} checkpoints of {ARCHITECTURE!r} (a checkpoint from another model?)")
    missing = [k for k in ("step", "layout") if k not in meta]
    if not isinstance(meta.get("config"), dict) or not isinstance(meta["config"].get("model"), dict):
        missing.append("config.model")
    if missing:
        raise CheckpointError(
            f"{file}: no {', '.join(missing)} entry (the file was edited or written by something else); "
            f"resume from another step-N folder (--checkpoint.resume=DIR)")
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
    commit_folder(path, int(meta["step"]), meta, file_digests(_dcp_files(path)))
    return path


def commit_folder(path: Path, step: int, meta: dict[str, Any], digests: dict[str, dict],
           before_marker: Callable[[Path, int], None] | None = None) -> None:
    """Rank 0, after every shard is on disk: meta, manifest, then the marker (atomically).
    `before_marker`: a fault hook (hope_dist.faults) called right before the marker."""
    meta = {"format": FORMAT, "architecture": ARCHITECTURE, **meta}
    (path / META).write_text(json.dumps(meta, indent=1, default=str))
    (path / MANIFEST).write_text(json.dumps(digests, indent=1, sort_keys=True))
    if before_marker is not None:
        before_marker(path, step)
    tmp = path / (MARKER + ".tmp")
    tmp.write_text(f"{step}\n")
    os.replace(tmp, path / MARKER)


# ------------------------------------------------------------------ a full disk
def state_bytes(state: Any) -> int:
    """Bytes of the tensors this rank writes for a DCP state dict (a DTensor: its local shard)."""
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size()
    return 0


def _errnos(err: BaseException) -> set[int]:
    """Every errno in an exception, its causes and (DCP) the failures of every rank."""
    found, todo = set(), [err]
    while todo:
        e = todo.pop()
        if isinstance(getattr(e, "errno", None), int):
            found.add(e.errno)
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
        if isinstance(e, CheckpointException):
            todo += [exc for exc, _ in e.failures.values()]
    return found


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# ------------------------------------------------------------------ the trainer's checkpointer
@skip_sync_after_stage
class ReusedBufferStager(AsyncStager):
    """Async staging into CPU buffers kept from one save to the next. DCP's default stager
    allocates fresh buffers for every save and page-faults them in, which on a CPU host costs
    about as long as writing the file; reused buffers cost one memory copy of the state (the
    first save allocates them; they hold one CPU copy of this rank's state for the whole run).
    Safe because at most one save is in flight: Checkpointer.save waits for the previous write
    before it stages again. Uses torch's private state-dict copy helpers (DTensor-aware), through
    hope_dist/torch_compat.py."""

    def __init__(self) -> None:
        self._buffers: dict[str, Any] | None = None

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        if self._buffers is not None:
            try:
                return copy_state_dict(state_dict, self._buffers)
            except CompanionMismatch:  # the state's structure changed: allocate anew
                pass
        self._buffers = create_cpu_state_dict(state_dict)
        return copy_state_dict(state_dict, self._buffers)

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        self._buffers = None


class Checkpointer:
    """The step-N folders of a run: save (sync or async), commit, prune, find the one to resume."""

    def __init__(self, cfg: CheckpointConfig, run_dir: Path, timeout_s: float | None = None,
                 before_commit: Callable[[Path, int], None] | None = None):
        self.cfg = cfg
        self.before_commit = before_commit  # a fault hook (hope_dist.faults): rank 0, before each marker
        self.dir = Path(cfg.dir) if cfg.dir else Path(run_dir) / "checkpoints"
        self.last_step: int | None = None  # the step of the newest save started by this process
        self._pending: Future | None = None
        self._skippable = False  # the newest save may fail for a full disk (checkpoint.on_save_error)
        self._bytes = 0  # this rank's share of the newest save, to recognise a full disk
        self._executor: ThreadPoolExecutor | None = None
        self._stager = ReusedBufferStager() if cfg.async_save else None
        # async saves run DCP's collectives off the training thread: give them their own group, with the
        # job's collective timeout (new_group's default is 30 minutes: a peer that died while this
        # group forms would otherwise hang the restarted job that long)
        timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
        self._pg = None
        if cfg.async_save and dist.is_initialized():
            with group_construction(timeout_s, "the async-save gloo group's construction"):
                self._pg = dist.new_group(backend="gloo", timeout=timeout)

    def path(self, step: int) -> Path:
        return self.dir / f"step-{step}"

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any], skippable: bool = False) -> Path:
        """Write `state` (a DCP state dict) for `step`, commit, prune. With checkpoint.async_save
        this returns once the state is staged in memory; the write and commit finish behind.
        `skippable` (interval saves): under checkpoint.on_save_error=continue a full disk is
        logged and training goes on; the final and preemption saves always raise."""
        self.wait()
        path = self.path(step)
        if _rank() == 0:
            if path.exists():
                shutil.rmtree(path)
            path.mkdir(parents=True)
        _barrier()
        self.last_step = step
        self._skippable = skippable
        self._bytes = state_bytes(state)
        if self.cfg.async_save:
            staged = dcp.async_save(state, checkpoint_id=str(path), process_group=self._pg,
                                    async_stager=self._stager, no_dist=not dist.is_initialized())
            self._executor = self._executor or ThreadPoolExecutor(1, thread_name_prefix="ckpt-commit")
            self._pending = self._executor.submit(self._finish_async, staged, path, step, meta)
            return path
        try:
            self._write(path, step, state, meta)
        except (Exception, CheckpointException) as e:
            if not self._skip_or_raise_if_disk_full(path, e):
                raise
        return path

    def _write(self, path: Path, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
        dcp.save(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
        _barrier()
        files = _dcp_files(path)
        digests = file_digests(files[_rank()::_world()])
        if dist.is_initialized():
            parts: list[dict] = [{} for _ in range(_world())]
            dist.all_gather_object(parts, digests)
            digests = {k: v for part in parts for k, v in part.items()}
        failure = None
        if _rank() == 0:
            try:
                self.commit(path, step, meta, digests)
            except OSError as e:
                failure = (e.errno, f"rank 0 could not commit {path}: {e}")
        if dist.is_initialized():  # every rank leaves with rank 0's outcome, so all stop or go on
            box = [failure]
            dist.broadcast_object_list(box, src=0)
            failure = box[0]
        if failure:
            raise OSError(*failure)

    def _finish_async(self, staged: Future, path: Path, step: int, meta: dict[str, Any]) -> None:
        staged.result()  # on rank 0 this returns after DCP wrote .metadata, i.e. after every rank
        if _rank() == 0:
            self.commit(path, step, meta, file_digests(_dcp_files(path)))

    def commit(self, path: Path, step: int, meta: dict[str, Any], digests: dict[str, dict]) -> None:
        """Rank 0, once every rank's files of `path` are on disk: commit_folder, then prune."""
        commit_folder(path, step, meta, digests, self.before_commit)
        self.prune()

    def wait(self) -> None:
        """Block until the in-flight async save (if any) is committed; re-raise its error."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            try:
                pending.result()
            except (Exception, CheckpointException) as e:
                if not self._skip_or_raise_if_disk_full(self.path(self.last_step), e):
                    raise

    def _skip_or_raise_if_disk_full(self, path: Path, err: BaseException) -> bool:
        """A full filesystem reaches DCP as an opaque write error ("unexpected pos 704 vs 598"): when
        it is one (ENOSPC/EDQUOT, or less room left than this rank's share), remove the partial
        folder, which would never be loaded anyway, and say what happened, where, and what is intact:
        as an error, or (an interval save under on_save_error=continue) logged, returning True.
        False: not a full disk; the caller re-raises `err`."""
        usage = shutil.disk_usage(self.dir)
        if usage.free >= self._bytes and not _errnos(err) & {errno.ENOSPC, errno.EDQUOT}:
            return False
        if _rank() == 0:
            shutil.rmtree(path, ignore_errors=True)
        steps = committed_steps(self.dir)
        intact = (f"the newest complete checkpoint, {self.path(steps[-1])}, is intact and resumable"
                  if steps else "there is no complete checkpoint yet")
        detail = next((line for line in str(err).splitlines()[::-1] if line.strip()), type(err).__name__)
        full = CheckpointError(
            f"{path} could not be written: the filesystem holding {self.dir} is full ({_mib(usage.free)} free of "
            f"{_mib(usage.total)}; this rank's tensors alone take {_mib(self._bytes)}). The partial folder was "
            f"removed and {intact}: free space, move checkpoint.dir to a larger filesystem or lower "
            f"checkpoint.keep_last, then resume with --resume [{detail.strip()}]")
        if self._skippable and self.cfg.on_save_error == "continue":
            self.last_step = None  # nothing saved: a stop at this step must save again (and may raise)
            if _rank() == 0:
                log.warning("checkpoint error (checkpoint.on_save_error=continue, training goes on): %s", full)
            return True
        raise full from err

    def prune(self) -> None:
        """Keep the newest checkpoint.keep_last committed folders; remove uncommitted ones."""
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
                    log.warning("checkpoint: removed %s (no %s marker: a save that did not finish)", child, MARKER)
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
        """DCP load; a state the checkpoint does not hold (another optimizer, another version of the
        training state) is an error naming the key, not DCP's traceback of every rank."""
        try:
            dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
        except CheckpointException as e:
            reasons = "; ".join(sorted({str(exc).strip() for exc, _ in e.failures.values()}))
            raise CheckpointError(
                f"{path}: this job's training state cannot be loaded from it ({reasons}): it was written with "
                f"other settings (optimizer, model) or another version of hope_dist; resume with the settings in "
                f"{Path(path) / META}, or start a new run_dir") from e
