"""Resolve a job's config on the batch node before any GPU waits: `python launch/resolve_job.py WORLD ARGS...`.

ARGS are pretrain.py's (--config, overrides). Prints shell assignments for launch/common.sh:
RUN_DIR (the resolved run directory) and FILL (an override that fills data parallelism when the
config's layout leaves the world unfilled, else empty). A bad config fails here, in the first
second of the job, with the config's own error message, and exits 2.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
    from hope_dist.config import ConfigError, parse_args
    from hope_dist.parallel.mesh import check_world_size
except ImportError as e:  # the wrong python: no traceback, say which one and what to do
    sys.exit(f"launch: {sys.executable} cannot import hope_dist's dependencies ({e}): set HOPE_VENV to the "
             f"virtualenv hope_dist is installed in, or run bash scripts/setup.sh")


def resolve(world: int, argv: list[str]) -> dict[str, str]:
    cfg = parse_args(argv)
    p = cfg.parallel
    fill = ""
    model_parallel = p.pp * p.tp * p.dp_replicate
    if p.pp * p.dp_replicate * p.dp_shard * p.tp != world and p.dp_shard == 1 and world % model_parallel == 0:
        fill = f"--parallel.dp_shard={world // model_parallel}"  # the config leaves data parallelism open
        cfg = parse_args(argv + [fill])
    check_world_size(cfg.parallel, world)
    return {"RUN_DIR": str(Path(cfg.run_dir).resolve()), "FILL": fill}


def main() -> int:
    if len(sys.argv) < 2 or not sys.argv[1].isdigit():
        print("usage: resolve_job.py WORLD_SIZE [pretrain.py args...]", file=sys.stderr)
        return 2
    try:
        values = resolve(int(sys.argv[1]), sys.argv[2:])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    for key, value in values.items():
        print(f"{key}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
