"""Console output of the entry points: library modules log (`logging.getLogger(__name__)`), and an
entry point calls `setup_console_logging()` so their messages reach the console as plain lines.

Messages go to stderr, the message text alone, INFO and up. The data modules' INFO lines (a
dataset summary from every rank) stay off the console, as before they were logged.
"""
from __future__ import annotations

import logging
import sys


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a message comes (pytest's capture and torchrun swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_console_logging(level: int = logging.INFO) -> None:
    """Show the `hope_dist` loggers' messages on stderr, once per process (idempotent)."""
    root = logging.getLogger("hope_dist")
    if not any(isinstance(h, _Stderr) for h in root.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.propagate = False  # an application's root handlers would print every line twice
    root.setLevel(level)
    logging.getLogger("hope_dist.data").setLevel(max(level, logging.WARNING))
