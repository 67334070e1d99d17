"""A hard deadline for process-group construction.

gloo's connect honours its timeout when a peer is missing, but after torchrun restarts a worker
group on a loaded host both ranks were seen blocked in `ProcessGroupGloo(...)` ->
`tcp::Pair::waitUntilConnected` for many minutes with a 60 s timeout (py-spy, docs/reliability.md).
A job that hangs there never reaches torchrun's restart logic; one that exits does. So the
construction runs under a watchdog that ends the process with a message naming what hung.
"""
from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_CODE = 75  # EX_TEMPFAIL: a retry (torchrun --max-restarts) may succeed


@contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Run the body; if it has not finished after `seconds`, print why and `os._exit(EXIT_CODE)`
    (a blocked C++ call cannot be interrupted from Python; exiting lets torchrun restart the group)."""
    done = threading.Event()

    def watch() -> None:
        if not done.wait(seconds):
            rank = os.environ.get("RANK", "0")
            print(f"rank {rank}: {what} did not finish in {seconds:.0f} s (parallel.timeout_s bounds it); "
                  f"exiting with {EXIT_CODE} so torchrun --max-restarts can restart the workers",
                  file=sys.stderr, flush=True)
            os._exit(EXIT_CODE)

    threading.Thread(target=watch, name="hope-deadline", daemon=True).start()
    try:
        yield
    finally:
        done.set()


def group_construction(timeout_s: float | None, what: str):
    """The deadline for building a process group whose collectives time out after `timeout_s`
    (None: torch's 30-minute default): gloo's own connect timeout gets its chance first."""
    return deadline(2 * (timeout_s or 1800) + 30, what)
