"""Show what a checkpoint holds and verify that every shard is present and intact.

    python -m tools.inspect_ckpt RUN/checkpoints/step-N [--tensors] [--config] [--no-checksums]
    python -m tools.inspect_ckpt RUN/checkpoints          (lists the steps, inspects the newest)

Prints step, tokens, layout, git commit, the model config (the whole resolved config with
--config), tensor counts and sizes by part (every tensor with --tensors), then the verification:
marker, meta.json, manifest, every shard DCP's index names, sizes and crc32 checksums.
Exit status 0 when the checkpoint is complete and intact, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from hope_dist.checkpoint import CheckpointError, committed_steps, read_meta, stored_keys, tensor_keys, verify


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return ""


def describe(path: Path, tensors: bool = False, config: bool = False, checksums: bool = True) -> tuple[str, bool]:
    """The report for one step-N folder and whether it verified."""
    lines = [f"checkpoint {path}"]
    problems = verify(path, checksums=checksums)
    try:
        meta = read_meta(path)
    except CheckpointError as e:
        return "\n".join(lines + [f"  {e}"]), False
    lines.append(f"  step {meta['step']}, tokens {meta.get('tokens_seen', 0):,}, layout {meta.get('layout')}, "
                 f"world size {meta.get('world_size')}, git {meta.get('git_commit', 'unknown')}")
    for extra in ("resharded_from", "imported_from"):
        if extra in meta:
            lines.append(f"  {extra.replace('_', ' ')}: {meta[extra]}")
    cfg = meta["config"] if config else {"model": meta["config"]["model"]}
    lines.append("  config: " + json.dumps(cfg, indent=None, default=str))
    if (path / ".metadata").is_file():
        metas = tensor_keys(path)
        parts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        for key, m in metas.items():
            numel = 1
            for s in m.size:
                numel *= s
            part = parts[key.split(".")[0]]
            part[0] += 1
            part[1] += numel
            part[2] += numel * m.properties.dtype.itemsize
        objects = len(stored_keys(path)) - len(metas)
        lines.append("  contents: " + ", ".join(
            f"{name} {n} tensors / {numel:,} values / {_human(size)}"
            for name, (n, numel, size) in sorted(parts.items()))
            + f"; {objects} other objects")
        if tensors:
            for key, m in sorted(metas.items()):
                lines.append(f"    {key:<64} {str(tuple(m.size)):<22} {str(m.properties.dtype).replace('torch.', '')}")
    files = sorted(p for p in path.iterdir() if p.is_file())
    lines.append(f"  files: {len(files)}, {_human(sum(f.stat().st_size for f in files))} on disk")
    if problems:
        lines += ["  VERIFY FAILED:"] + [f"    {p}" for p in problems]
    else:
        lines.append("  verify: OK (committed; every shard present" + (", checksums match)" if checksums else ")"))
    return "\n".join(lines), not problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.inspect_ckpt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="a step-N folder, or a checkpoints folder (inspects the newest)")
    parser.add_argument("--tensors", action="store_true", help="list every tensor")
    parser.add_argument("--config", action="store_true", help="print the whole resolved config")
    parser.add_argument("--no-checksums", action="store_true", help="check presence and sizes only")
    args = parser.parse_args(argv)
    path = Path(args.path)
    if not path.is_dir():
        print(f"error: {path} is not a folder", file=sys.stderr)
        return 1
    if not (path / ".metadata").exists() and not (path / "meta.json").exists():
        steps = committed_steps(path)
        others = sorted(p.name for p in path.iterdir() if p.name.startswith("step-") and p.name not in
                        {f"step-{s}" for s in steps})
        print(f"{path}: committed steps {steps or 'none'}" + (f"; incomplete: {others}" if others else ""))
        if not steps:
            return 1
        path = path / f"step-{steps[-1]}"
    report, ok = describe(path, args.tensors, args.config, not args.no_checksums)
    print(report)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
