"""The checks of several implementations in one gate run share the reference and the yardstick of a
case (harness.check.shared): computed once, loaded by the others, the same numbers either way."""

from __future__ import annotations

import pytest
import torch

from harness.case import parse_case
from harness.check.evaluation import run_reference
from harness.check.shared import SharedResults

CASE = parse_case("N=5,D=8,V=33,dtype=bfloat16,reduction=sum,bias=1,ignored=some,seed=3")


def test_a_result_saved_by_one_check_is_loaded_by_the_next_without_computing_it(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return run_reference(CASE)

    first = SharedResults(tmp_path).get("reference", CASE, "cpu", compute)
    again = SharedResults(tmp_path).get("reference", CASE, "cpu", compute)  # as another process would
    assert len(calls) == 1
    assert torch.equal(first.loss, again.loss) and torch.equal(first.grads["weight"], again.grads["weight"])
    assert torch.equal(first.magnitudes["grad_weight"], again.magnitudes["grad_weight"])
    assert not list(tmp_path.glob("*.partial")), "written under a temporary name, then renamed"


@pytest.mark.parametrize("other", [("yardstick", CASE, "cpu"), ("reference", CASE.replace(seed=4), "cpu"),
                                   ("reference", CASE, "cuda")])
def test_another_kind_case_or_device_is_not_taken_for_it(tmp_path, other):
    shared = SharedResults(tmp_path)
    shared.get("reference", CASE, "cpu", lambda: "reference of the case")
    assert shared.get(*other, lambda: "computed") == "computed"


def test_without_a_folder_everything_is_computed_in_place():
    calls = []
    for _ in range(2):
        SharedResults().get("reference", CASE, "cpu", lambda: calls.append(1))
    assert len(calls) == 2
