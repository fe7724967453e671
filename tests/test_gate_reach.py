"""How the gate calls an implementation: inputs as users pass them, per-token losses of a reduced
case, call patterns, and reproducers of failures that depend on earlier calls.

The corpora (``tests/reach_bugs.py``, ``tests/subtle_bugs.py``) pin each bug to the case that kills
it; these tests show the mechanisms on a few of them, in-process.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.case import parse_case
from harness.check.properties import find_property
from harness.check.reproduce import Step, parse_step
from harness.check.run_property import FAIL, PASS, Target, run_case, run_property
from harness.check.profiles import get_profile
from harness.check.support_probe import discover_support
from harness.registry import resolve
from tests import reach_bugs


def judge(plugin: str, property_id: str, case: str):
    target = Target(plugin, resolve(plugin))
    return run_case(target, find_property(property_id), parse_case(case), "cpu")


def test_a_plugin_gets_batched_inputs_as_given_and_its_output_shape_is_checked():
    """A (B*T,) per-token loss for (B, T) labels is a failure that names both shapes."""
    case = "B=2,T=5,D=8,V=17,dtype=float32,reduction=none,seed=0"
    assert judge("tests.reach_bugs:chunked_kernel", "equivalence/float32", case).status == PASS
    result = judge("tests.reach_bugs:none_loss_flat", "equivalence/float32", case)
    assert result.status == FAIL and "shape (10,)" in result.detail and "(2, 5)" in result.detail


def test_a_reduced_case_is_also_judged_token_by_token():
    """One token dropped in a block of 4096 moves a bfloat16 mean of 8192 tokens by 1/4096 of a
    token's loss, hidden in the mean's allowance; per token it is the whole loss of that token.
    (A frozen backbone: the dropped token's zero hidden-state gradient would show first.)"""
    case = "N=8192,D=8,V=17,dtype=bfloat16,reduction=mean,grads=weight,seed=3"
    result = judge("tests.reach_bugs:last_token_of_4096_block_dropped", "equivalence/float32", case)
    assert result.status == FAIL and "loss per token" in result.detail


@pytest.mark.parametrize("layout", ["sliced", "transposed"])
def test_views_models_pass_reach_a_kernel_that_assumes_row_major_rows(layout):
    case = f"B=2,T=7,D=8,V=17,dtype=float32,reduction=sum,layout={layout},seed=1"
    assert judge("tests.reach_bugs:chunked_kernel", "equivalence/float32", case).status == PASS
    assert judge("tests.reach_bugs:rows_read_at_n_times_d", "equivalence/float32", case).status == FAIL


def test_an_expanded_upstream_gradient_reaches_a_kernel_that_reads_it_as_contiguous():
    case = "B=2,T=7,D=8,V=17,dtype=float32,reduction=none,upstream=expanded,seed=1"
    assert judge("tests.reach_bugs:upstream_read_row_major", "equivalence/float32", case).status == FAIL


def test_two_forwards_before_their_backwards_reach_a_per_shape_gradient_buffer():
    reach_bugs.forget_cached_state()
    case = "N=65,D=33,V=257,dtype=float32,reduction=mean,seed=5"
    result = judge("tests.reach_bugs:gradient_buffer_per_shape", "autograd/interleaved", case)
    assert result.status == FAIL and "forwards, then their backwards" in result.detail
    assert judge("tests.reach_bugs:chunked_kernel", "autograd/interleaved", case).status == PASS


def test_an_optimizer_step_in_place_reaches_a_weight_copy_cached_by_pointer():
    """The copy is keyed by address, and whether another tensor reuses that address (a stale copy
    on both sides of the identity) depends on the allocator: among the property's examples, all of
    which the gate runs, one fails."""
    failures = []
    for case in ("N=65,D=33,V=257,dtype=float32,reduction=mean,seed=5",
                 "B=2,T=33,D=65,V=129,dtype=float32,reduction=mean,bias=1,ignored=some,seed=370",
                 "N=70,D=64,V=131,dtype=float16,reduction=sum,bias=1,label_smoothing=0.1,ignored=some,seed=372"):
        reach_bugs.forget_cached_state()
        result = judge("tests.reach_bugs:weight_copy_cached_by_pointer", "autograd/training-steps", case)
        failures += [result.detail] if result.status == FAIL else []
    assert failures and all("optimizer step" in detail for detail in failures)


def test_a_sequence_of_cases_parses_with_and_without_a_property():
    first = parse_step("autograd/interleaved@N=3,D=2,V=5,seed=0", "equivalence/float32")
    plain = parse_step("N=3,D=2,V=5,seed=0", "equivalence/float32")
    assert first == Step("autograd/interleaved", parse_case("N=3,D=2,V=5,seed=0"))
    assert plain.property_id == "equivalence/float32"


@pytest.mark.slow
def test_a_failure_that_needs_earlier_calls_prints_the_sequence_that_reproduces_it():
    """A weight-gradient workspace cached per shape and never zeroed again: the first case of a shape
    is right, a later one of the same shape wrong. Rerun alone, that case passes; the reproducer
    replays the cases before it, and runs as printed."""
    reach_bugs.forget_cached_state()
    plugin = "tests.reach_bugs:weight_grad_workspace_not_zeroed"
    target = Target(plugin, resolve(plugin))
    result = run_property(target, find_property("equivalence/float32"), discover_support(target.impl, "cpu"),
                          get_profile("ci", 0), "cpu", history=[])
    assert result.status == FAIL
    assert "fails only after" in result.detail and result.reproducer.count("--case") >= 2
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    rerun = subprocess.run(["bash", "-c", result.reproducer], env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 1, rerun.stdout[-2000:]
