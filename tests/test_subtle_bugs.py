"""The gate rejects subtle kernel bugs and passes the correct kernel they were made from.

``tests/subtle_bugs.py`` holds a correct fused, chunked loss (``fused_chunked``) and copies of it
with one bug each. They are checked as a user checks a plugin, through ``python -m harness
check`` with the CI profile. The bugs are rejected by the explicit examples alone (``--max-examples
0``), which every run of the gate checks first, so the full CI-profile run (``CI=true python -m
harness check --impl tests.subtle_bugs:NAME``) rejects them too; the correct kernel passes that
full run, drawn cases included.
"""

import csv

import pytest

from harness.cli import main
from tests import subtle_bugs, subtle_head_bugs

BUG_NAMES = [bug.__name__ for bug in subtle_bugs.BUGS]


def property_statuses(out_dir) -> dict[str, dict[str, str]]:
    """{implementation: {property: status}} of the one run written under ``out_dir``."""
    (run_dir,) = out_dir.iterdir()
    statuses: dict[str, dict[str, str]] = {}
    with open(run_dir / "properties.csv", newline="") as f:
        for row in csv.DictReader(f):
            statuses.setdefault(row["implementation"], {})[row["property"]] = row["status"]
    return statuses


def explicit_example_statuses(out_dir, plugins: list[str]) -> dict[str, dict[str, str]]:
    """The statuses of the plugins on the CI profile's explicit examples (the gate fails: bugs)."""
    impls = [arg for plugin in plugins for arg in ("--impl", plugin)]
    status = main(["check", "--profile", "ci", "--max-examples", "0", "--no-behaviour", *impls, "--out", str(out_dir)])
    assert status == 1
    return property_statuses(out_dir)


def full_gate_statuses(out_dir, plugin: str) -> dict[str, str]:
    """The statuses of one plugin on the whole CI-profile gate, which it must pass."""
    status = main(["check", "--profile", "ci", "--no-behaviour", "--impl", plugin, "--out", str(out_dir)])
    statuses = property_statuses(out_dir)[plugin]
    assert status == 0, statuses
    return statuses


@pytest.fixture(scope="module")
def bug_statuses(tmp_path_factory):
    return explicit_example_statuses(tmp_path_factory.mktemp("subtle-bugs"),
                                     [f"tests.subtle_bugs:{name}" for name in BUG_NAMES])


def test_there_are_at_least_twenty_bugs_each_its_own_plugin():
    assert len(set(BUG_NAMES)) == len(BUG_NAMES) >= 20
    assert all(bug.__doc__ for bug in subtle_bugs.BUGS)


@pytest.mark.parametrize("bug", BUG_NAMES)
def test_the_ci_gate_rejects_a_subtle_bug(bug_statuses, bug):
    statuses = bug_statuses[f"tests.subtle_bugs:{bug}"]
    assert "fail" in statuses.values(), f"{bug} ({getattr(subtle_bugs, bug).__doc__}) passed: {statuses}"


def test_the_correct_fused_kernel_passes_the_full_ci_gate(tmp_path):
    statuses = full_gate_statuses(tmp_path, "tests.subtle_bugs:fused_chunked")
    assert set(statuses.values()) <= {"pass", "n/a"}


# --- a whole head's bugs (tests/subtle_head_bugs.py) -------------------------------------------------

HEAD_BUGS = list(subtle_head_bugs.BUGS)


@pytest.fixture(scope="module")
def head_bug_statuses(tmp_path_factory):
    return explicit_example_statuses(tmp_path_factory.mktemp("subtle-head-bugs"),
                                     [f"tests.subtle_head_bugs:{name}" for name in HEAD_BUGS])


@pytest.mark.parametrize("bug", HEAD_BUGS)
def test_the_ci_gate_rejects_a_subtle_bug_of_a_head(head_bug_statuses, bug):
    statuses = head_bug_statuses[f"tests.subtle_head_bugs:{bug}"]
    assert "fail" in statuses.values(), f"{bug} ({subtle_head_bugs.BUGS[bug]}) passed: {statuses}"


def test_the_correct_head_passes_the_full_ci_gate(tmp_path):
    statuses = full_gate_statuses(tmp_path, "tests.subtle_head_bugs:correct_head")
    assert set(statuses.values()) <= {"pass", "n/a"}
