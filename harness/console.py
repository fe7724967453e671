"""The console the commands print to: as wide as the terminal, or wide enough for a log."""

from __future__ import annotations

import os
import sys

from rich.console import Console

# Where the output is not a terminal (a CI log, a file, a pipe) no one's screen wraps it: tables are
# laid out this wide unless ``COLUMNS`` says otherwise.
LOG_WIDTH = 160


def terminal_console(*, stderr: bool = False) -> Console:
    """A rich console that fits the terminal it prints to (or ``COLUMNS``, or ``LOG_WIDTH`` in a log)."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty() or os.environ.get("COLUMNS"):
        return Console(stderr=stderr)
    return Console(stderr=stderr, width=LOG_WIDTH)
