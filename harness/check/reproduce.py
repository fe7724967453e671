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

**A failure that depends on earlier calls** (a kernel that keeps state from call to call: a
buffer cached per shape, a workspace not zeroed) does not recur when its case runs alone. So a
failure is rerun alone in a fresh process before it is reported (``confirm``); when it does not
fail there, longer and longer runs of the cases before it are replayed (doubling, up to
``MAX_STEPS``), and the reproducer becomes the shortest sequence that fails, with a note. ``--case``
takes such a sequence: repeated, each optionally prefixed with its property (``PROPERTY@CASE``).
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
from dataclasses import dataclass
from pathlib import Path

from harness.case import Case, parse_case

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


# --- failures that depend on earlier calls ---------------------------------------------------------

MAX_STEPS = 64  # the longest sequence replayed
REPLAY_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Step:
    """One case, run under one property."""

    property_id: str
    case: Case

    def spelled(self, property_id: str) -> str:
        """The ``--case`` argument: the case, prefixed with its property when it is not ``property_id``."""
        return str(self.case) if self.property_id == property_id else f"{self.property_id}@{self.case}"


def parse_step(text: str, property_id: str | None) -> Step:
    """A ``--case`` argument: ``CASE`` (under ``property_id``) or ``PROPERTY@CASE``."""
    prefix, at, rest = text.partition("@")
    if at and "=" not in prefix:
        return Step(prefix, parse_case(rest))
    return Step(property_id or "", parse_case(text))


def command(given: str, property_id: str, steps: list[Step]) -> str:
    """The command line that reruns ``steps`` (the last one judged) on the implementation ``given``,
    as it runs in a new shell."""
    cases = " ".join(f"--case {shlex.quote(step.spelled(property_id))}" for step in steps)
    return f"{rerun_command(given)} --property {property_id} {cases}"


def recurs(given: str, property_id: str, steps: list[Step]) -> bool:
    """Whether the last of ``steps`` fails when the sequence runs alone in a fresh process."""
    argv = [sys.executable, "-m", "harness", "check", "--impl", given, "--property", property_id]
    for step in steps:
        argv += ["--case", step.spelled(property_id)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)}
    try:
        finished = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=REPLAY_TIMEOUT_S,
                                  check=False)
    except subprocess.TimeoutExpired:
        return True  # a hang where it hung before: it recurs
    if finished.returncode == 2:  # the command refused its input: the implementation cannot be named there
        said = [line for line in finished.stderr.splitlines() if line.strip()]
        raise CannotRerun(said[-1] if said else "the command exited 2")
    return finished.returncode == 1


class CannotRerun(Exception):
    """A fresh process cannot run the implementation by its name (a lambda, a function defined in a
    test or a notebook): the failure cannot be replayed there."""


@dataclass(frozen=True)
class Confirmed:
    """What the reproducer of a failure is, and what its reruns showed."""

    steps: list[Step]
    note: str  # "" when the failing case fails alone


def confirm(given: str, property_id: str, failing: Case, history: list[Step]) -> Confirmed:
    """The shortest replay that fails in a fresh process (see the module docstring). ``history``
    holds the cases that ran in this process before the failing one, oldest first."""
    last = Step(property_id, failing)
    try:
        if recurs(given, property_id, [last]):
            return Confirmed([last], "")
    except CannotRerun as refused:
        return Confirmed([last], f"not replayed in a fresh process, which cannot import it ({refused})")
    count = 1
    while count < min(len(history), MAX_STEPS):
        count = min(2 * count, len(history), MAX_STEPS)
        steps = [*history[-count:], last]
        if recurs(given, property_id, steps):
            return Confirmed(steps, f"it fails only after the {count} case(s) before it in the same process: the "
                                    "implementation keeps state from call to call")
    return Confirmed([last], f"it did not fail again in a fresh process, alone or after the {min(len(history), MAX_STEPS)} "
                             "cases before it: it depends on state beyond those calls, or is not deterministic")
