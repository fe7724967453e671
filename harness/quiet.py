"""Quiet probes: what peer packages print while the harness imports them, kept instead of printed.

Probing whether an implementation runs here imports its package (Megatron-core, OLMo-core,
transformers), and some of them warn on import (no Transformer Engine, no Apex): noise that says
nothing about the harness, in the middle of ``list``'s table or the sweep's progress. ``captured``
keeps Python warnings, log records and writes to ``sys.stdout``/``sys.stderr`` in a ``Captured``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass, field


@dataclass
class Captured:
    """What the peer packages said while being imported and probed."""

    warnings: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        for line in text.splitlines():
            line = line.strip()
            if line and line not in self.warnings:
                self.warnings.append(line)


@contextlib.contextmanager
def captured(into: Captured):
    """Python warnings, log records and writes to sys.stdout/sys.stderr, kept in ``into`` instead."""
    stream = io.StringIO()
    previous_disable = logging.root.manager.disable
    with warnings.catch_warnings(record=True) as caught, \
            contextlib.redirect_stderr(stream), contextlib.redirect_stdout(stream):
        warnings.simplefilter("always")
        logging.disable(logging.WARNING)  # e.g. OLMo-core's "transformer_engine unavailable" record
        try:
            yield into
        finally:
            logging.disable(previous_disable)
    for warning in caught:
        into.add(f"{warning.category.__name__}: {warning.message}")
    into.add(stream.getvalue())
