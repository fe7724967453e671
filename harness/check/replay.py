"""Reproducers that reproduce: a failure is rerun alone in a fresh process before it is reported.

A kernel that keeps state from call to call (a cached buffer keyed by shape, a workspace not zeroed)
can fail on a case only because of the cases before it, and then the one-case reproducer passes.
``confirm`` reruns the failing case in a fresh ``python -m harness check --case`` process; when it
does not fail there, it replays longer and longer runs of the cases before it (doubling, up to
``MAX_STEPS``), and the reproducer becomes the shortest sequence that fails, with a note saying the
failure depends on earlier calls. ``--case`` takes that sequence: repeated, each optionally
prefixed with the property it ran under (``PROPERTY@CASE``).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass

from harness.case import Case, parse_case

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


def command(given: str, property_id: str, steps: list[Step], profile: str = "ci") -> str:
    """The command line that reruns ``steps`` (the last one judged) on the implementation ``given``."""
    cases = " ".join(f"--case {shlex.quote(step.spelled(property_id))}" for step in steps)
    return f"python -m harness check --impl {shlex.quote(given)} --property {property_id} {cases}"


def recurs(given: str, property_id: str, steps: list[Step]) -> bool:
    """Whether the last of ``steps`` fails when the sequence runs alone in a fresh process."""
    argv = [sys.executable, "-m", "harness", "check", "--impl", given, "--property", property_id]
    for step in steps:
        argv += ["--case", step.spelled(property_id)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)}
    try:
        finished = subprocess.run(argv, env=env, capture_output=True, timeout=REPLAY_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return True  # a hang where it hung before: it recurs
    return finished.returncode == 1


@dataclass(frozen=True)
class Confirmed:
    """What the reproducer of a failure is, and what its reruns showed."""

    steps: list[Step]
    note: str  # "" when the failing case fails alone


def confirm(given: str, property_id: str, failing: Case, history: list[Step]) -> Confirmed:
    """The shortest replay that fails in a fresh process (see the module docstring). ``history``
    holds the cases that ran in this process before the failing one, oldest first."""
    last = Step(property_id, failing)
    if recurs(given, property_id, [last]):
        return Confirmed([last], "")
    count = 1
    while count < min(len(history), MAX_STEPS):
        count = min(2 * count, len(history), MAX_STEPS)
        steps = [*history[-count:], last]
        if recurs(given, property_id, steps):
            return Confirmed(steps, f"it fails only after the {count} case(s) before it in the same process: the "
                                    "implementation keeps state from call to call")
    return Confirmed([last], f"it did not fail again in a fresh process, alone or after the {min(len(history), MAX_STEPS)} "
                             "cases before it: it depends on state beyond those calls, or is not deterministic")
