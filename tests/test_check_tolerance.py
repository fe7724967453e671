"""The tolerance rule, pinned on hand-made tensors: per element, in units of each element's terms,
at most MULTIPLE times torch-eager's error (capped), one rounding of the output, and a
summation-order floor; in the norm, NORM_MULTIPLE times torch-eager's error. The properties'
tests show it on kernels."""

import math

import torch

from harness.check.tolerance import (
    CAP,
    MULTIPLE,
    NORM_MULTIPLE,
    SUM_ORDER,
    YARDSTICK,
    Error,
    allowance,
    logit_rounding_factor,
    mismatch,
    summation_floor,
    unit_roundoff,
)

F32, BF16 = torch.float32, torch.bfloat16
REFERENCE = torch.linspace(-1.0, 1.0, 101, dtype=torch.float64)
TERMS = torch.full_like(REFERENCE, 2.0)


def test_unit_roundoff_is_half_the_machine_epsilon():
    assert unit_roundoff(torch.float32) == 2.0**-24
    assert unit_roundoff(torch.bfloat16) == 2.0**-8
    assert unit_roundoff(torch.float16) == 2.0**-11


def test_the_summation_floor_grows_with_the_square_root_of_each_summation_length():
    assert summation_floor([1]) == SUM_ORDER * 2.0**-24
    assert math.isclose(summation_floor([10_000, 100]), SUM_ORDER * 2.0**-24 * 110)


def test_an_error_is_measured_in_units_of_each_elements_terms():
    actual = REFERENCE.clone()
    actual[3] += 1e-3
    error = Error.between(actual, REFERENCE, TERMS)
    assert math.isclose(error.relative, 1e-3 / 2.0) and math.isclose(error.norm, 1e-3)


def eager_off_by(relative: float) -> Error:
    """torch-eager's error when every element is off by ``relative`` of its terms, signs alternating."""
    signs = torch.tensor([(-1.0) ** i for i in range(REFERENCE.numel())], dtype=torch.float64)
    return Error.between(REFERENCE + relative * TERMS * signs, REFERENCE, TERMS)


def test_a_candidate_as_accurate_as_torch_eager_passes_and_one_beyond_multiple_times_fails():
    eager = eager_off_by(1e-3)
    allowed = allowance([eager], REFERENCE, TERMS, BF16, [F32], [1])
    within = REFERENCE + 0.9 * MULTIPLE * 1e-3 * 2.0
    assert mismatch("grad_weight", within, REFERENCE, allowed) is not None  # a drift over every element: the norm
    one = REFERENCE.clone()
    one[7] += 0.9 * MULTIPLE * 1e-3 * 2.0
    assert mismatch("grad_weight", one, REFERENCE, allowed) is None
    one[7] += 0.2 * MULTIPLE * 1e-3 * 2.0
    problem = mismatch("grad_weight", one, REFERENCE, allowed)
    assert problem.startswith("grad_weight: 1 of 101 elements") and "at (7,)" in problem


def test_a_small_element_gets_a_small_allowance_of_its_own():
    """The weight-gradient row of a class no token has as label: small value, small terms."""
    terms = TERMS.clone()
    terms[50] = 1e-6  # the reference is 0 there
    allowed = allowance([Error(1e-3, 1e-3)], REFERENCE, terms, BF16, [F32], [1])
    candidate = REFERENCE.clone()
    candidate[50] += 1e-6  # negligible next to the other elements, 100% of its own terms
    assert mismatch("grad_weight", candidate, REFERENCE, allowed) is not None


def test_the_cap_bounds_the_allowance_however_inaccurate_torch_eager_is():
    allowed = allowance([Error(1.0, 1.0)], REFERENCE, TERMS, BF16, [F32], [1])
    largest = (CAP * unit_roundoff(BF16) + summation_floor([1])) * 2.0 + unit_roundoff(F32) * 1.0
    assert float(allowed.bound.max()) <= largest * (1 + 1e-12)


def test_an_output_returned_in_a_low_precision_dtype_may_be_rounded_once():
    loss = torch.tensor(5.0, dtype=torch.float64)
    terms = torch.tensor(10.0, dtype=torch.float64)
    in_float32 = allowance([Error(0.0, 0.0)], loss, terms, BF16, [F32], [1])
    in_bfloat16 = allowance([Error(0.0, 0.0)], loss, terms, BF16, [BF16], [1])
    one_rounding = loss + 0.9 * unit_roundoff(BF16) * 5.0
    assert mismatch("loss", one_rounding, loss, in_float32) is not None
    assert mismatch("loss", one_rounding, loss, in_bfloat16) is None
    assert mismatch("loss", loss + 3 * unit_roundoff(BF16) * 5.0, loss, in_bfloat16) is not None


def test_a_drift_within_every_element_bound_fails_the_norm_check():
    eager = Error.between(REFERENCE + torch.eye(101, dtype=torch.float64)[7] * 2e-3, REFERENCE, TERMS)  # one element off
    allowed = allowance([eager], REFERENCE, TERMS, BF16, [F32], [1])
    candidate = REFERENCE + 0.9 * float(allowed.bound.min())
    problem = mismatch("grad_weight", candidate, REFERENCE, allowed)
    assert problem is not None and "norm of the error" in problem and f"{NORM_MULTIPLE:g} x" in problem


def test_torch_eager_is_held_to_its_own_error_model():
    allowed = allowance(None, REFERENCE, TERMS, BF16, [BF16], [1])
    rounding = unit_roundoff(BF16) * REFERENCE.abs()
    edge = (YARDSTICK * unit_roundoff(BF16) + summation_floor([1])) * TERMS + rounding
    assert torch.allclose(allowed.bound, edge + torch.finfo(BF16).smallest_normal * torch.finfo(BF16).eps / 2)
    assert mismatch("loss", REFERENCE + 1.1 * edge, REFERENCE, allowed) is not None


def test_one_rounding_of_huge_logits_widens_the_cap_and_the_yardstick_by_its_non_linear_cost():
    """A bfloat16 rounding of a logit of 1000 moves it by up to 2, and its probability by a factor
    of up to e^4: the linear term model's roundoffs, times (e^x - 1) / x, x = 2 u max|z|."""
    assert logit_rounding_factor(1, F32, 1e4) < 1.001  # float32: no widening
    assert logit_rounding_factor(1, BF16, 10.0) < 1.05  # ordinary logits: none to speak of
    x = 2 * unit_roundoff(BF16) * 1000.0
    assert math.isclose(logit_rounding_factor(1, BF16, 1000.0), math.expm1(x) / x)
    plain = allowance([Error(1.0, 1.0)], REFERENCE, TERMS, BF16, [F32], [1])
    huge = allowance([Error(1.0, 1.0)], REFERENCE, TERMS, BF16, [F32], [1], largest_logit=1000.0)
    assert float(huge.bound.max()) > 10 * float(plain.bound.max()) and "for logits up to 1e+03" in huge.explanation
    eager_plain = allowance(None, REFERENCE, TERMS, BF16, [BF16], [1])
    eager_huge = allowance(None, REFERENCE, TERMS, BF16, [BF16], [1], largest_logit=1000.0)
    assert float(eager_huge.bound.max()) > 10 * float(eager_plain.bound.max())


def test_a_gradient_near_zero_may_be_one_subnormal_step_off_after_its_two_roundings():
    """Found by the dev profile on chunked: a weight-gradient element of -1.54e-44 returned as -1.68e-44."""
    step = torch.finfo(F32).smallest_normal * torch.finfo(F32).eps  # the smallest float32 subnormal
    reference = torch.tensor([-11 * step], dtype=torch.float64)
    terms = torch.tensor([1e-50], dtype=torch.float64)
    gradient = allowance([Error(0.0, 0.0)], reference, terms, F32, [F32], [1], roundings=2)
    loss = allowance([Error(0.0, 0.0)], reference, terms, F32, [F32], [1], roundings=1)
    assert mismatch("grad_weight", reference - step, reference, gradient) is None
    assert mismatch("loss", reference - step, reference, loss) is not None


def test_an_exactly_zero_reference_with_no_terms_must_be_exactly_zero():
    """Every token ignored: the loss and gradients must be exactly zero, as torch-eager's are."""
    zero = torch.zeros(5, dtype=torch.float64)
    allowed = allowance([Error(0.0, 0.0)], zero, zero, F32, [F32], [1])
    assert mismatch("loss", zero, zero, allowed) is None
    assert mismatch("loss", zero + 1e-30, zero, allowed) is not None


def test_nan_is_only_accepted_where_the_reference_has_nan():
    reference = torch.tensor([1.0, math.nan], dtype=torch.float64)
    terms = torch.tensor([1.0, math.nan], dtype=torch.float64)
    allowed = allowance([Error(0.0, 0.0)], reference, terms, F32, [F32], [1])
    assert mismatch("loss", reference.clone(), reference, allowed) is None
    assert mismatch("loss", torch.tensor([math.nan, math.nan]), reference, allowed) is not None
    assert mismatch("loss", torch.tensor([1.0, 0.5]), reference, allowed) is not None


def test_equal_infinities_are_no_error_and_a_shape_mismatch_is_an_infinite_one():
    inf = torch.tensor([math.inf, 1.0])
    assert Error.between(inf, inf.clone(), torch.ones(2)) == Error(0.0, 0.0)
    assert not Error.between(torch.zeros(2), torch.zeros(3), torch.ones(2)).is_finite()


def test_inputs_computed_in_the_dtype_allow_the_rounding_every_implementation_inherits():
    """A tied model's hidden states are computed in bfloat16: torch-eager's error can cancel that
    rounding by luck on one token, so its yardstick does not go below one roundoff there."""
    terms, expected = torch.ones(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    lucky = [Error(relative=1e-4 * unit_roundoff(BF16), norm=1e-4 * unit_roundoff(BF16))]
    plain = allowance(lucky, expected, terms, BF16, [torch.float32], [1])
    tied = allowance(lucky, expected, terms, BF16, [torch.float32], [1], inherited=True)
    assert float(plain.bound[0]) < unit_roundoff(BF16) <= float(tied.bound[0])
    assert float(tied.bound[0]) < 2 * unit_roundoff(BF16)  # one roundoff, not a loose allowance
