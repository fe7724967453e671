"""Known failures of built-in implementations (``harness/check/known.py``), recorded explicitly.

A known failure is expected to fail: its example case must still fail. When a new release fixes
it, the strict xfail turns into a failure here, and the entry is removed. A known limitation (an
error raised on purpose) is reported as unsupported, never as a pass or a failure.
"""

import pytest

from harness.check.case import parse_case
from harness.check.gate import PASS, UNSUPPORTED, Target, run_case
from harness.check.known import KNOWN
from harness.check.properties import PROPERTY_IDS, find_property
from harness.registry import builtin_names, resolve

FAILURES = [k for k in KNOWN if k.kind == "failure"]
LIMITATIONS = [k for k in KNOWN if k.kind == "limitation"]
COMPILED = {"torch-compile", "cce"}  # their first compile takes tens of seconds on a CPU


def _run(implementation: str, property_id: str, case: str):
    impl = resolve(implementation)
    if not impl.availability().available:
        pytest.skip(f"{implementation} is not available here: {impl.availability().detail}")
    return run_case(Target(implementation, impl), find_property(property_id), parse_case(case), "cpu")


@pytest.mark.parametrize("known", KNOWN, ids=lambda k: f"{k.implementation}-{k.kind}")
def test_every_entry_names_a_built_in_and_a_property(known):
    assert known.implementation in builtin_names()
    assert set(known.properties) <= set(PROPERTY_IDS)
    assert known.reason
    if known.kind == "failure":
        property_id, case = known.example.split(": ")
        assert property_id in PROPERTY_IDS and parse_case(case)


@pytest.mark.parametrize(
    "known",
    [pytest.param(k, marks=pytest.mark.xfail(strict=True, reason=k.reason)) for k in FAILURES],
    ids=lambda k: f"{k.implementation}-{k.example.split(':')[0]}",
)
def test_known_failure_is_fixed(known):
    property_id, case = known.example.split(": ")
    result = _run(known.implementation, property_id, case)
    assert result.status == PASS, f"{result.status}: {result.detail}"


@pytest.mark.parametrize(
    "known",
    [pytest.param(k, marks=[pytest.mark.slow] if k.implementation in COMPILED else []) for k in LIMITATIONS],
    ids=lambda k: f"{k.implementation}-{k.properties[0]}",
)
def test_known_limitation_is_reported_as_unsupported_with_its_error(known):
    result = _run(known.implementation, known.properties[0], "N=6,D=5,V=33,seed=10")
    assert result.status == UNSUPPORTED
    assert result.detail.startswith(known.reason) and "raised RuntimeError" in result.detail
