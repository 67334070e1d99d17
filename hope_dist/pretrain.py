"""Entry point: `torchrun --nproc_per_node=N hope_dist/pretrain.py --config configs/tiny.yaml [--key.sub=value]`.
`pretrain.py --help` lists every config key with its type, default and meaning.

A known error (config, data, tokenizer, checkpoint: hope_dist.errors.UserError) prints its one-line
message and exits 2, with no traceback unless HOPE_DEBUG=1. Under torchrun the same message, or
any other exception's traceback, goes to torchrun's error file, so its root-cause summary shows
it instead of `error_file: <N/A>`.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script by torchrun: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch.distributed.elastic.multiprocessing.errors import ErrorHandler, record  # noqa: E402

from hope_dist.config import parse_args  # noqa: E402
from hope_dist.console import setup_console_logging  # noqa: E402
from hope_dist.errors import UserError, debugging, describe, report  # noqa: E402
from hope_dist.faults import FaultHooks  # noqa: E402


class MessageErrorFile(ErrorHandler):
    """torchrun's error file (TORCHELASTIC_ERROR_FILE) with a known error's message in place of a
    traceback; other exceptions keep torch's record (their traceback)."""

    def record_exception(self, e: BaseException) -> None:
        file = self._get_error_file_path()
        if not isinstance(e, UserError) or debugging() or not file:
            return super().record_exception(e)
        text = describe(e)
        with open(file, "w") as f:  # torch's schema; the summary prints extraInfo.py_callstack
            json.dump({"message": {"message": text, "extraInfo": {
                "py_callstack": text, "timestamp": str(int(time.time()))}}}, f)


def _train(argv: list[str]) -> int:
    cfg = parse_args(argv)
    import torch

    from hope_dist.trainer import Trainer

    # Fast weights decay toward 0 (alpha^T); carried ones put hope_2m's CPU backward into denormal floats,
    # 2.5x slower on x86 (README, Training). Process-wide state: set for the run only, here.
    torch.set_flush_denormal(True)
    try:
        Trainer(cfg, faults=FaultHooks.from_env()).train()  # fault tests set them in the environment
    finally:
        torch.set_flush_denormal(False)
    return 0


def main(argv: list[str] | None = None) -> int:
    setup_console_logging()
    try:
        return record(_train, error_handler=MessageErrorFile())(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        return report(e)


if __name__ == "__main__":
    sys.exit(main())
