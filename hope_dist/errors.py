"""Known user errors: a config, data file, tokenizer, checkpoint or export folder that cannot be used.

Every one is raised with a message that names the file or key and the fix, so a command line
prints that message alone and exits 2 instead of showing a traceback; `HOPE_DEBUG=1` re-raises it
with its traceback. Under torchrun, hope_dist/pretrain.py also hands the message to torchrun's
root-cause summary. No imports here: data_prep and the config layer derive from these classes.
"""
from __future__ import annotations

import os
import sys

DEBUG_ENV = "HOPE_DEBUG"
EXIT_STATUS = 2


class UserError(Exception):
    """Base of the errors a user fixes from the message alone (no traceback needed)."""

    label = "error"


class DataError(UserError, ValueError):
    """Training data that does not fit the job: paths, weights, vocabulary, too few tokens."""

    label = "data error"


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def describe(e: UserError) -> str:
    """`label: message`, with the notes the trainer adds (rank, step) on one line each."""
    notes = "".join(f"\n{n}" for n in getattr(e, "__notes__", ()))
    return f"{e.label}: {e}{notes}"


def report(e: UserError) -> int:
    """Print a known error on stderr and return the exit status; under HOPE_DEBUG=1 re-raise it."""
    if debugging():
        raise e
    print(describe(e), file=sys.stderr, flush=True)
    return EXIT_STATUS
