"""The tolerance rule, pinned on hand-made tensors: per element, in units of each element's terms, a
fixed budget of roundings of the input dtype (whatever torch-eager's own luck), one rounding of the
output and a summation-order floor; in the norm, NORM_MULTIPLE times torch-eager's error. The
properties' tests and the corpora in tests/ show it on kernels."""

import math

import torch

from harness.check.tolerance import (
    BUDGET,
    NORM_MIN_ELEMENTS,
    NORM_MULTIPLE,
    SPREAD,
    SUM_ORDER,
    Error,
    allowance,
    logit_rounding_factor,
    mismatch,
    summation_floor,
    summed_over_tokens,
    unit_roundoff,
)

F32, BF16 = torch.float32, torch.bfloat16
REFERENCE = torch.linspace(-1.0, 1.0, 101, dtype=torch.float64)
TERMS = torch.full_like(REFERENCE, 2.0)
U = unit_roundoff(BF16)


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


def test_each_element_may_be_off_by_the_budget_of_its_terms_whatever_torch_eagers_luck():
    """torch-eager exact by luck (one token, say) does not lower the bar: a kernel rounding its logits
    elsewhere stays inside the budget."""
    lucky = Error(0.0, 0.0)
    allowed = allowance([lucky], REFERENCE, TERMS, BF16, [F32], [1])
    floor = summation_floor([1])
    one = REFERENCE.clone()
    one[7] += 0.99 * (BUDGET * U + floor) * 2.0
    assert mismatch("grad_weight", one, REFERENCE, allowed) is None
    one[7] += 0.02 * BUDGET * U * 2.0
    problem = mismatch("grad_weight", one, REFERENCE, allowed)
    assert problem.startswith("grad_weight: 1 of 101 elements") and "at (7,)" in problem
    assert f"{BUDGET:g} roundings of bfloat16" in problem  # the allowance in words, with its numbers


def test_a_small_element_gets_a_small_allowance_of_its_own():
    """The weight-gradient row of a class no token has as label: small value, small terms."""
    terms = TERMS.clone()
    terms[50] = 1e-6  # the reference is 0 there
    allowed = allowance([Error(1e-3, 1e-3)], REFERENCE, terms, BF16, [F32], [1])
    candidate = REFERENCE.clone()
    candidate[50] += 1e-6  # negligible next to the other elements, 100% of its own terms
    assert mismatch("grad_weight", candidate, REFERENCE, allowed) is not None


def test_an_output_returned_in_a_low_precision_dtype_may_be_rounded_once():
    loss = torch.tensor(5.0, dtype=torch.float64)
    terms = torch.tensor(1e-6, dtype=torch.float64)  # tiny terms: the output rounding is what is allowed
    in_float32 = allowance([Error(0.0, 0.0)], loss, terms, BF16, [F32], [1])
    in_bfloat16 = allowance([Error(0.0, 0.0)], loss, terms, BF16, [BF16], [1])
    one_rounding = loss + 0.9 * U * 5.0
    assert mismatch("loss", one_rounding, loss, in_float32) is not None
    assert mismatch("loss", one_rounding, loss, in_bfloat16) is None
    assert mismatch("loss", loss + 3 * U * 5.0, loss, in_bfloat16) is not None


def test_a_drift_within_every_element_bound_fails_the_norm_check():
    eager = Error.between(REFERENCE + torch.eye(101, dtype=torch.float64)[7] * 2e-3, REFERENCE, TERMS)  # one element off
    allowed = allowance([eager], REFERENCE, TERMS, BF16, [F32], [1])
    candidate = REFERENCE + 0.9 * float(allowed.bound.min())
    problem = mismatch("grad_weight", candidate, REFERENCE, allowed)
    assert problem is not None and "over the whole tensor" in problem and f"{NORM_MULTIPLE:g} x" in problem


def test_a_norm_over_a_few_elements_is_no_average_and_is_not_judged():
    few = REFERENCE[: NORM_MIN_ELEMENTS - 1]
    allowed = allowance([Error(0.0, 0.0)], few, TERMS[: few.numel()], BF16, [F32], [1])
    assert math.isinf(allowed.norm) or mismatch("grad_bias", few + 0.5 * allowed.bound, few, allowed) is None
    assert mismatch("grad_bias", few + 0.5 * allowed.bound, few, allowed) is None


def test_without_torch_eager_there_is_no_norm_wise_comparison():
    """torch-eager judged by the budget itself, or a case where its result is not available."""
    allowed = allowance(None, REFERENCE, TERMS, BF16, [BF16], [1])
    assert math.isinf(allowed.norm)
    assert mismatch("loss", REFERENCE + 0.9 * allowed.bound, REFERENCE, allowed) is None


def test_a_known_imprecision_multiplies_the_budget_and_the_norm_multiple_only():
    eager = Error(1e-3, 1e-3)
    plain = allowance([eager], REFERENCE, TERMS, BF16, [F32], [1])
    widened = allowance([eager], REFERENCE, TERMS, BF16, [F32], [1], ratio=3.0)
    floor = summation_floor([1]) * TERMS + unit_roundoff(F32) * REFERENCE.abs() + (plain.bound - plain.budget
                                                                                  - summation_floor([1]) * TERMS
                                                                                  - unit_roundoff(F32) * REFERENCE.abs())
    assert torch.allclose(widened.bound - floor, 3.0 * (plain.bound - floor))
    assert widened.norm > plain.norm and "3 x 4 roundings" in widened.explanation


def test_sums_over_many_tokens_grow_as_the_square_root_of_their_count():
    """Independent per-token roundings add up as a random walk: a reduced loss of 10 000 tokens gets
    SPREAD times the root-sum-square of their terms, far below the linear sum."""
    per_token = torch.ones(10_000, dtype=torch.float64)
    terms = summed_over_tokens(per_token.sum(), per_token.square().sum().sqrt())
    assert math.isclose(float(terms), SPREAD * 100.0)
    few = torch.ones(4, dtype=torch.float64)
    assert float(summed_over_tokens(few.sum(), few.square().sum().sqrt())) == 4.0  # a short sum: linear


def test_one_rounding_of_huge_logits_costs_more_than_linearly():
    """A bfloat16 rounding of a logit of 1000 moves it by up to 2, and its probability by a factor
    of up to e^4: the linear term model's roundoffs, times (e^x - 1) / x, x = 2 u max|z|."""
    assert logit_rounding_factor(1, F32, 1e4) < 1.001  # float32: no widening
    assert logit_rounding_factor(1, BF16, 10.0) < 1.05  # ordinary logits: none to speak of
    x = 2 * U * 1000.0
    assert math.isclose(logit_rounding_factor(1, BF16, 1000.0), math.expm1(x) / x)
    per_token = logit_rounding_factor(2, BF16, torch.tensor([1.0, 1000.0], dtype=torch.float64))
    assert per_token[0] < 2.1 and per_token[1] > 100  # each token's own logits, not the case's largest


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


def test_the_share_of_the_allowance_used_is_the_worst_of_elements_and_norm():
    allowed = allowance([Error(0.0, 1e-9)], REFERENCE, TERMS, BF16, [F32], [1])
    half = REFERENCE.clone()
    half[3] += 0.5 * float(allowed.bound[3])
    assert math.isclose(allowed.used(half, REFERENCE), max(0.5, float((half - REFERENCE).norm()) / allowed.norm))
    assert allowed.used(REFERENCE, REFERENCE) == 0.0


def test_an_infinity_is_the_rounding_of_a_value_beyond_the_output_range_and_nothing_else():
    f16_max = torch.finfo(torch.float16).max
    inf = torch.tensor([math.inf], dtype=torch.float16)
    beyond = torch.tensor([70000.0], dtype=torch.float64)
    allowed = allowance([Error(0.0, 0.0)], beyond, beyond, torch.float16, [torch.float16], [1])
    assert mismatch("loss", inf, beyond, allowed) is None
    assert mismatch("loss", -inf, beyond, allowed) is not None  # the wrong sign
    # at the edge, a value that its allowed error may carry past the range may round to an infinity
    edge = torch.tensor([f16_max - 0.5 * float(allowed.bound[0])], dtype=torch.float64)
    assert mismatch("loss", inf, edge, allowance([Error(0.0, 0.0)], edge, edge, torch.float16,
                                                    [torch.float16], [1])) is None
    inside = torch.tensor([1000.0], dtype=torch.float64)
    assert mismatch("loss", inf, inside, allowance([Error(0.0, 0.0)], inside, inside, torch.float16,
                                                    [torch.float16], [1])) is not None


def test_a_loss_kept_in_the_input_dtype_on_its_way_out_costs_one_rounding_of_that_dtype():
    loss = torch.tensor([5.0], dtype=torch.float64)
    terms = torch.tensor([1.0], dtype=torch.float64)
    plain = allowance([Error(0.0, 0.0)], loss, terms, BF16, [F32], [1])
    kept = allowance([Error(0.0, 0.0)], loss, terms, BF16, [F32], [1], held_in=BF16)
    assert math.isclose(float(kept.bound[0] - plain.bound[0]), U * 5.0)
    assert "kept in bfloat16" in kept.explanation
    off_by_a_bf16_rounding = loss + 0.9 * U * 5.0
    assert mismatch("loss", off_by_a_bf16_rounding, loss, plain) is not None
    assert mismatch("loss", off_by_a_bf16_rounding, loss, kept) is None
