"""Run a list of work items in a child process that reports one JSON line per finished item.

The check runs each implementation's properties, and its behaviour-matrix edge cases, in child
processes: a kernel that crashes the process (or, on a GPU, poisons its CUDA context) takes
only its own item with it. When the child dies or an item times out, that item is reported as
a crash or a timeout and the remaining items run in a fresh child.

A child is ``python -m MODULE ARGS... ITEM...``; it prints ``{"item": ITEM, ...}`` for each item
as it finishes, nothing else on stdout. It may also say what it is doing: ``{"started": ITEM}``
before an item and ``{"started": ITEM, "case": CASE}`` before each case of it, so that a crash or
a timeout names the case that caused it.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Outcome:
    """One item's report: the child's record, or why there is none ("crash" or "timeout")."""

    item: str
    record: dict | None
    failure: str = ""  # "crash" or "timeout" when record is None
    detail: str = ""
    last_case: str = ""  # the case the child said it was running when it crashed or timed out


def child_environment(threads: int | None = None) -> dict[str, str]:
    """The parent's import path, so a plugin importable here (``tests.broken_impls``) is there too."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")]).strip(os.pathsep)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _forward_lines(stream, lines: queue.Queue) -> None:
    """Move the child's output lines to a queue (None at the end), so the parent can wait with a timeout."""
    for line in stream:
        lines.put(line)
    lines.put(None)


def run_items(
    module: str, args: list[str], items: list[str], *, timeout_s: float | None, threads: int | None = None
) -> Iterator[Outcome]:
    """Yield an ``Outcome`` per item, in the order they finish, restarting the child after a failure."""
    remaining = list(items)
    while remaining:
        with tempfile.TemporaryFile(mode="w+") as stderr:
            child = subprocess.Popen(
                [sys.executable, "-m", module, *args, *remaining],
                stdout=subprocess.PIPE, stderr=stderr, text=True, env=child_environment(threads),
            )
            lines: queue.Queue = queue.Queue()
            threading.Thread(target=_forward_lines, args=(child.stdout, lines), daemon=True).start()
            current, last_case = remaining[0], ""
            while remaining:
                try:
                    line = lines.get(timeout=timeout_s)
                except queue.Empty:
                    child.kill()
                    child.wait()
                    remaining.remove(current)
                    yield Outcome(current, None, "timeout", f"no result within {timeout_s:.0f} s", last_case)
                    break
                if line is None:  # the child exited before finishing every item
                    code = child.wait()
                    stderr.seek(0)
                    last = (stderr.read().strip().splitlines() or [""])[-1][:300]
                    remaining.remove(current)
                    detail = f"the process exited with status {code} during it: {last}"
                    yield Outcome(current, None, "crash", detail, last_case)
                    break
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # not ours: something printed to the report channel
                    continue
                if "started" in record:
                    current, last_case = record["started"], record.get("case", "")
                    continue
                remaining.remove(record["item"])
                if remaining:
                    current = remaining[0]
                yield Outcome(record["item"], record)
            child.wait()


class ReportChannel:
    """The child's side: records go to the original stdout; anything else printed goes to stderr."""

    def __init__(self) -> None:
        sys.stdout.flush()
        self._out = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)  # C-level and Python prints from kernels and compilers no longer reach the parent
        sys.stdout = sys.stderr

    def send(self, record: dict) -> None:
        self._out.write(json.dumps(record) + "\n")
        self._out.flush()
