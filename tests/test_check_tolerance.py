"""The tolerance rule: a candidate may be MULTIPLE times less accurate than torch-eager, plus a floor.

These tests pin the rule itself on hand-made tensors; the properties' tests show it on kernels.
"""

import math

import torch

from harness.check.tolerance import (
    FLOOR_ULPS,
    MULTIPLE,
    Deviation,
    allowance,
    mismatch,
    relative_floor,
    unit_roundoff,
)

REFERENCE = torch.linspace(-1.0, 1.0, 101, dtype=torch.float64)


def test_unit_roundoff_is_half_the_machine_epsilon():
    assert unit_roundoff(torch.float32) == 2.0**-24
    assert unit_roundoff(torch.bfloat16) == 2.0**-8
    assert unit_roundoff(torch.float16) == 2.0**-11


def test_the_floor_is_a_few_roundoffs_of_the_dtype_plus_k_float32_roundoffs_for_the_summation_order():
    assert relative_floor(torch.float32, 0) == FLOOR_ULPS * 2.0**-24
    assert relative_floor(torch.float32, 10_000) == (FLOOR_ULPS + 10_000) * 2.0**-24
    assert relative_floor(torch.bfloat16, 1) == FLOOR_ULPS * 2.0**-8 + 2.0**-24


def test_a_candidate_as_accurate_as_torch_eager_passes():
    eager = REFERENCE + 1e-3
    allowed = allowance(Deviation.between(eager, REFERENCE), REFERENCE, torch.bfloat16, 100)
    assert mismatch("loss", REFERENCE - 1e-3, REFERENCE, allowed) is None


def test_a_candidate_more_than_multiple_times_worse_than_torch_eager_fails():
    eager = REFERENCE + 1e-3
    allowed = allowance(Deviation.between(eager, REFERENCE), REFERENCE, torch.float32, 1)
    problem = mismatch("grad_weight", REFERENCE + (MULTIPLE + 1) * 1e-3, REFERENCE, allowed)
    assert problem is not None and problem.startswith("grad_weight:")
    assert "Greatest absolute difference" in problem


def test_one_outlier_fails_the_element_wise_check():
    allowed = allowance(Deviation(1e-6, 1e-5), REFERENCE, torch.float32, 1)
    candidate = REFERENCE.clone()
    candidate[37] += 1e-3
    problem = mismatch("grad_hidden", candidate, REFERENCE, allowed)
    assert "Mismatched elements: 1 / 101" in problem and "index (37,)" in problem


def test_a_drift_within_every_element_bound_fails_the_norm_check():
    """Each element moves by just under its bound; together they exceed the norm allowance."""
    yardstick = Deviation(max_abs=1e-4, norm=1e-4)  # torch-eager: one element off by 1e-4
    allowed = allowance(yardstick, REFERENCE, torch.float32, 1)
    candidate = REFERENCE + 0.9 * allowed.max_abs
    problem = mismatch("grad_weight", candidate, REFERENCE, allowed)
    assert problem is not None and "norm of the error" in problem


def test_a_small_loss_made_of_large_terms_gets_the_floor_of_its_terms():
    """logsumexp(z) - z_label = 0.002 with logits near 30: rounding errors scale with 30."""
    loss = torch.tensor(0.002, dtype=torch.float64)
    plain = allowance(Deviation(0.0, 0.0), loss, torch.float32, 10)
    of_terms = allowance(Deviation(0.0, 0.0), loss, torch.float32, 10, magnitude=torch.tensor(60.0))
    assert of_terms.max_abs == plain.max_abs * 60 / 0.002


def test_an_exactly_zero_reference_leaves_no_floor():
    """Every token ignored: the loss and gradients must be exactly zero, as torch-eager's are."""
    zero = torch.zeros(5, dtype=torch.float64)
    allowed = allowance(Deviation.between(zero, zero), zero, torch.bfloat16, 1000)
    assert allowed.max_abs == 0.0
    assert mismatch("loss", zero + 1e-30, zero, allowed) is not None
    assert mismatch("loss", zero, zero, allowed) is None


def test_nan_is_only_accepted_where_the_reference_has_nan():
    reference = torch.tensor([1.0, math.nan], dtype=torch.float64)
    allowed = allowance(Deviation(0.0, 0.0), reference, torch.float32, 1)
    assert mismatch("loss", reference.clone(), reference, allowed) is None
    assert mismatch("loss", torch.tensor([math.nan, math.nan]), reference, allowed) is not None


def test_deviation_of_equal_infinities_is_zero_and_of_a_shape_mismatch_is_infinite():
    inf = torch.tensor([math.inf, 1.0])
    assert Deviation.between(inf, inf.clone()) == Deviation(0.0, 0.0)
    assert not Deviation.between(torch.zeros(2), torch.zeros(3)).is_finite()
