"""What a failure tells its reader: the command that reruns it, and where the implementation raised.

**The rerun command runs as printed in a new shell**, from any directory: the shell has none of
this process's environment and its ``python`` may be another interpreter. So the interpreter is
named by its path unless ``python`` on ``PATH`` is this one, and ``PYTHONPATH`` names the
directory of the harness and of a plugin's module whenever a fresh interpreter would not find them
where this one did (a module imported from the current directory, from ``PYTHONPATH``, or from a
directory pytest put on ``sys.path``; or a checkout of the harness run from its root while another
copy is installed). A fresh interpreter is asked, once per process, where it finds them.

**An error the implementation raised** (not a mismatch the gate measured) is described in one line
followed by its traceback, from the property's call into the implementation down: the frames of
the gate's own loop and of Hypothesis above it say nothing about the kernel. ``split_detail``
takes the two apart again.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

# Frames of these files sit above the property's call into the implementation.
_GATE_LOOP_FILES = (str(Path(__file__).with_name("run_property.py")),)
_HYPOTHESIS_DIR = os.sep + "hypothesis" + os.sep
TRACEBACK_LINES = 120  # the end of a longer traceback (deep recursion) is kept


def rerun_command(given: str) -> str:
    """``python -m harness check --impl GIVEN`` as it runs in a new shell (see the module docstring)."""
    modules = ["harness"]
    if ":" in given:
        modules.append(given.partition(":")[0].split(".")[0])
    paths = _paths_a_new_shell_needs(tuple(modules))
    prefix = f"PYTHONPATH={shlex.quote(os.pathsep.join(paths))} " if paths else ""
    return f"{prefix}{_interpreter()} -m harness check --impl {shlex.quote(given)}"


def _interpreter() -> str:
    on_path = shutil.which("python")
    if on_path is not None and os.path.abspath(on_path) == os.path.abspath(sys.executable):
        return "python"
    return shlex.quote(sys.executable)


def _search_path_entry(spec) -> str | None:
    """The ``sys.path`` entry a top-level module's spec was found in."""
    if spec is None:
        return None
    if spec.submodule_search_locations:  # a package: its directory's parent
        return str(Path(list(spec.submodule_search_locations)[0]).parent)
    if spec.origin and os.path.isabs(spec.origin):
        return str(Path(spec.origin).parent)
    return None  # built in, frozen: found anywhere


@functools.cache
def _paths_a_new_shell_needs(modules: tuple[str, ...]) -> tuple[str, ...]:
    """The directories to put on ``PYTHONPATH`` so that a fresh interpreter imports ``modules``
    (top-level names) from where this one did."""
    here = {}
    for name in modules:
        try:
            here[name] = _search_path_entry(importlib.util.find_spec(name))
        except (ImportError, ValueError):
            here[name] = None
    fresh = _fresh_search_path_entries(tuple(here))
    needed = [entry for name, entry in here.items() if entry is not None and fresh.get(name) != entry]
    return tuple(dict.fromkeys(needed))


_FRESH_PROBE = """
import importlib.util, json, sys
found = {}
for name in sys.argv[1:]:
    spec = importlib.util.find_spec(name)
    found[name] = None if spec is None else [spec.origin, list(spec.submodule_search_locations or [])]
print(json.dumps(found))
"""


def _fresh_search_path_entries(modules: tuple[str, ...]) -> dict[str, str | None]:
    """Where an interpreter started in the filesystem's root, without ``PYTHONPATH``, finds each module."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    try:
        done = subprocess.run([sys.executable, "-c", _FRESH_PROBE, *modules], capture_output=True, text=True,
                              cwd=os.path.abspath(os.sep), env=env, timeout=60)
        found = json.loads(done.stdout)
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError):
        return {}  # unknown: every module gets its directory on PYTHONPATH, which is never wrong
    entries = {}
    for name, spec in found.items():
        if spec is None:
            entries[name] = None
            continue
        origin, locations = spec
        if locations:
            entries[name] = str(Path(locations[0]).parent)
        else:
            entries[name] = str(Path(origin).parent) if origin and os.path.isabs(origin) else None
    return entries


# --- an implementation's error ------------------------------------------------------------------


def traceback_text(exc: BaseException) -> str:
    """``exc``'s traceback from the first frame below the gate's loop (and Hypothesis) down."""
    formatted = traceback.TracebackException.from_exception(exc)
    frames = list(formatted.stack)
    above = [i for i, frame in enumerate(frames)
             if frame.filename in _GATE_LOOP_FILES or _HYPOTHESIS_DIR in frame.filename]
    if above:
        formatted.stack = traceback.StackSummary.from_list(frames[above[-1] + 1:])
    lines = "".join(formatted.format()).rstrip("\n").splitlines()
    if len(lines) > TRACEBACK_LINES:
        lines = [f"... ({len(lines) - TRACEBACK_LINES} lines above left out)", *lines[-TRACEBACK_LINES:]]
    return "\n".join(lines)


def split_detail(detail: str) -> tuple[str, str]:
    """(the one-line description, the traceback or process log after it, or "")."""
    summary, _, rest = detail.partition("\n")
    return summary, rest.strip("\n")
