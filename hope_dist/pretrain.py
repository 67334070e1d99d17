"""Entry point: `torchrun --nproc_per_node=N hope_dist/pretrain.py --config configs/tiny.yaml [--key.sub=value]`."""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by torchrun: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hope_dist.config import ConfigError, parse_args  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from hope_dist.trainer import Trainer

    Trainer(cfg).train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
