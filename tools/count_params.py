"""Print a config's parameter count by part, built on the meta device (no memory used).

    python -m tools.count_params configs/hope_760m.yaml configs/hope_1b3.yaml [--model.d_model=...]

The last column is each total relative to the first config's (equal-size comparisons: within 1%).
"""
from __future__ import annotations

import argparse

import torch

from hope_dist.config import load_config
from hope_dist.model import HopeModel, count_parameters


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", help="YAML configs")
    args, overrides = parser.parse_known_args(argv)
    print(f"{'config':<32} {'total':>15} {'embedding':>13} {'mixer':>13} {'cms':>13} {'norms+head':>13} "
          f"{'vs first':>9}")
    first = None
    for path in args.configs:
        cfg = load_config(path, overrides)
        with torch.device("meta"):
            model = HopeModel(cfg.model)
        c = count_parameters(model)
        first = first or c["total"]
        print(f"{path:<32} {c['total']:>15,} {c['embedding']:>13,} {c['mixer']:>13,} {c['cms']:>13,} "
              f"{c['norms_and_head']:>13,} {(c['total'] / first - 1) * 100:>+8.3f}%")


if __name__ == "__main__":
    main()
