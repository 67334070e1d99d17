"""Sharded checkpoints with torch.distributed.checkpoint, committed by a marker written last.

Layout: CKPT_DIR/step-N/ holds DCP's shards and metadata; CKPT_DIR/step-N/COMMITTED is written
by rank 0 after every rank finished writing. A folder without the marker is never loaded (a
crash mid-save leaves the previous checkpoint intact) and is removed by the next save.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from hope_dist.config import CheckpointConfig

MARKER = "COMMITTED"
_STEP = re.compile(r"^step-(\d+)$")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def committed_steps(ckpt_dir: Path) -> list[int]:
    """Steps of the complete checkpoints in `ckpt_dir`, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    steps = []
    for child in ckpt_dir.iterdir():
        m = _STEP.match(child.name)
        if m and (child / MARKER).is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, run_dir: Path):
        self.cfg = cfg
        self.dir = Path(cfg.dir) if cfg.dir else run_dir / "checkpoints"

    def path(self, step: int) -> Path:
        return self.dir / f"step-{step}"

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Write `state` (a DCP state dict) for `step`; commit; prune old ones."""
        path = self.path(step)
        if _rank() == 0:
            if path.exists():
                shutil.rmtree(path)
            path.mkdir(parents=True)
        _barrier()
        dcp.save(state, checkpoint_id=str(path))
        _barrier()
        if _rank() == 0:
            (path / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
            (path / MARKER).write_text(str(step))
            self._prune(keep=step)
        _barrier()
        return path

    def _prune(self, keep: int) -> None:
        steps = committed_steps(self.dir)
        for old in steps[:-self.cfg.keep_last]:
            if old != keep:
                shutil.rmtree(self.path(old), ignore_errors=True)
        for child in self.dir.iterdir():
            if _STEP.match(child.name) and not (child / MARKER).is_file():
                shutil.rmtree(child, ignore_errors=True)  # half-written by a crashed save

    def resume_path(self) -> Path | None:
        """The checkpoint `checkpoint.resume` asks for: newest complete (auto), none, or a folder."""
        mode = self.cfg.resume
        if mode == "never":
            return None
        if mode == "auto":
            steps = committed_steps(self.dir)
            return self.path(steps[-1]) if steps else None
        path = Path(mode)
        if not (path / MARKER).is_file():
            raise FileNotFoundError(
                f"checkpoint.resume={mode!r} is not a complete checkpoint (no {MARKER} marker in it); "
                f"complete ones in {self.dir}: {committed_steps(self.dir) or 'none'}")
        return path

    @staticmethod
    def load(path: Path, state: dict[str, Any]) -> None:
        dcp.load(state, checkpoint_id=str(path))
