"""The gate rejects subtle kernel bugs and passes the correct kernels they were made from.

``tests/subtle_bugs.py`` holds a correct fused, chunked loss (``fused_chunked``) and copies of it
with one bug each; ``tests/subtle_head_bugs.py`` a correct head (``correct_head``) and its bugs.
Every run of the gate checks each property's explicit examples first, so a bug is rejected by
every run (``CI=true python -m harness check --impl tests.subtle_bugs:NAME``) when:

- **reach**: its killer, the (property, case) of ``tests/killers.csv``, is among that property's
  explicit examples fitted to what the bug's plugin supports (a fact about the examples, checked
  without running anything), and
- **detect**: one evaluation of that property on that case fails (where the correct kernel, which
  passes every explicit example, passes).

``python -m tests.find_killers`` regenerates the table after the examples or properties change.
The correct kernels pass every property's explicit examples here, in this process (those of the
properties at size, 2^16 classes or 2048 tokens, in the full tier's whole ci gate only, which also
runs the check command end to end on a bug).
"""

import csv
import shlex

import pytest

from harness.case import parse_case
from harness.check.profiles import get_profile
from harness.check.properties import PROPERTIES, find_property
from harness.check.run_property import FAIL, PASS, run_property
from harness.cli import main
from tests import subtle_bugs, subtle_head_bugs
from tests.find_killers import (
    CORPORA,
    KNOWN_SURVIVORS,
    DEVICE,
    all_bugs,
    cost,
    evaluate,
    gate_examples,
    read_table,
    target_and_support,
)

KILLERS = read_table()
CORRECT_KERNELS = [f"{module}:{name}" for module, name in CORPORA.items()]


def killer_of(bug: str):
    if bug not in KILLERS:
        pytest.fail(f"no killer recorded for {bug}: run python -m tests.find_killers {bug}")
    return KILLERS[bug]


def test_the_corpora_hold_at_least_twenty_six_documented_bugs_each_its_own_plugin():
    assert len(set(all_bugs())) == len(all_bugs()) >= 26
    assert all(bug.__doc__ for bug in subtle_bugs.BUGS)
    assert all(subtle_head_bugs.BUGS.values())


def test_every_bug_has_a_killer_in_the_table():
    missing = sorted(set(all_bugs()) - set(KILLERS) - set(KNOWN_SURVIVORS))
    assert not missing, f"no killer recorded for {missing}: run python -m tests.find_killers"
    assert set(KILLERS) <= set(all_bugs()), "the table names bugs the corpora no longer have"


@pytest.mark.parametrize("bug", sorted(KNOWN_SURVIVORS))
def test_a_known_gap_of_the_gate_is_still_open(bug):
    """A bug the gate misses, with the example where it should fail and why it does not: when it
    fails there, the gap is closed and the bug belongs in the table (python -m tests.find_killers)."""
    property_id, case, why = KNOWN_SURVIVORS[bug]
    assert evaluate(bug, find_property(property_id), parse_case(case)) == PASS, f"closed: {why}"


def with_killers() -> list[str]:
    return [bug for bug in all_bugs() if bug not in KNOWN_SURVIVORS]


@pytest.mark.parametrize("bug", with_killers())
def test_the_gate_reaches_the_case_that_kills_each_bug(bug):
    killer = killer_of(bug)
    assert parse_case(killer.case) in gate_examples(bug, find_property(killer.property)), (
        f"{bug}'s killer is no longer among {killer.property}'s explicit examples: run python -m tests.find_killers")


QUICK_COST = 4 * 10**7  # a killer costlier than this (find_killers.cost) runs in the full tier


def detection_params():
    """Every bug; those whose killer is a large case (tens of thousands of tokens: a minute for the
    Python-loop kernel) marked slow."""
    for bug in with_killers():
        large = bug in KILLERS and cost(parse_case(KILLERS[bug].case)) > QUICK_COST
        yield pytest.param(bug, marks=[pytest.mark.slow] if large else [], id=bug)


@pytest.mark.parametrize("bug", detection_params())
def test_the_gate_detects_each_bug_on_that_case(bug):
    """The correct kernel passes the same case: it is among the explicit examples it passes (below,
    or in the full tier's whole gate for the properties at size)."""
    killer = killer_of(bug)
    status = evaluate(bug, find_property(killer.property), parse_case(killer.case))
    if status != FAIL and bug in KEYED_BY_ADDRESS:  # see below: any of the property's examples will do
        prop = find_property(killer.property)
        status = FAIL if any(evaluate(bug, prop, case) == FAIL for case in gate_examples(bug, prop)) else status
    assert status == FAIL, f"{bug} was not rejected by {killer.property} on {killer.case}: {status}"


# A cache keyed by a tensor's address hits or misses as the allocator reuses addresses, which
# depends on everything the process allocated before: such a bug shows on its killer in most runs,
# and on one of the property's examples (all of which the gate runs) in every run seen.
KEYED_BY_ADDRESS = {"tests.reach_bugs:weight_copy_cached_by_pointer"}


# Their examples have 2^16 classes or 2048 tokens: minutes in this process for the Python-loop fused
# kernel; the full tier's whole gate runs them on both correct kernels.
AT_SIZE = ("equivalence/large-vocab", "equivalence/model-sizes", "precision/at-scale")


@pytest.mark.parametrize("prop", [p for p in PROPERTIES if p.id not in AT_SIZE], ids=lambda p: p.id)
@pytest.mark.parametrize("kernel", CORRECT_KERNELS)
def test_a_correct_kernel_passes_every_explicit_example(kernel, prop):
    target, support = target_and_support(kernel)
    result = run_property(target, prop, support, get_profile("ci", max_examples=0), DEVICE)
    assert result.status != FAIL, f"{result.detail}\n{result.reproducer}"
    if gate_examples(kernel, prop):
        assert result.status == PASS and result.examples > 0, result.detail


# --- end to end: the check command itself, in child processes (full tier) -------------------------


def property_rows(out_dir) -> list[dict]:
    (run_dir,) = out_dir.iterdir()
    with open(run_dir / "properties.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_the_whole_ci_gate_passes_the_correct_kernels_and_rejects_a_bug_with_a_reproducer(capsys, tmp_path):
    bug = "tests.subtle_bugs:online_softmax_without_rescale"
    impls = [arg for name in (*CORRECT_KERNELS, bug) for arg in ("--impl", name)]
    status = main(["check", "--profile", "ci", "--no-behaviour", *impls, "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 1
    rows = property_rows(tmp_path)
    for kernel in CORRECT_KERNELS:
        statuses = {row["property"]: row["status"] for row in rows if row["implementation"] == kernel}
        assert set(statuses) == {prop.id for prop in PROPERTIES}
        assert set(statuses.values()) <= {"pass", "n/a"}, statuses
    failed = [row for row in rows if row["status"] == "fail"]
    assert failed and {row["implementation"] for row in failed} == {bug}
    reproducer = failed[0]["reproducer"]
    assert f"reproduce: {reproducer}" in out
    argv = shlex.split(reproducer)
    while "=" in argv[0]:  # PYTHONPATH=... so that a new shell finds the tests' modules
        argv.pop(0)
    assert argv[:4] == ["python", "-m", "harness", "check"]
    assert main(argv[3:]) == 1
    assert f"{bug}  {failed[0]['property']}  fail  " in capsys.readouterr().out
