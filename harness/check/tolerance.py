"""The tolerance rule of the correctness gate. For every element i of a compared tensor t in dtype d:

    |candidate_i - reference_i| <= min(MULTIPLE * e_t, CAP * u(d)) * s_i  +  r_t * u(out) * |reference_i|
                                   + SUM_ORDER * u(float32) * (sum of sqrt(k) over the summation lengths k of t) * s_i
    and the same over the whole tensor in the 2-norm, with NORM_MULTIPLE * ||torch-eager - reference|| for the first term.

``s_i`` is the size of the terms element i is computed from (``harness.check.evaluation.term_magnitudes``),
``e_t = max_i |torch-eager_i - reference_i| / s_i`` is torch-eager's own error on the same inputs in
those units, ``u(x)`` the unit roundoff of dtype x (half its machine epsilon) and ``out`` the
dtype the candidate returned t in, ``r_t`` the roundings to it allowed (1; 2 for a gradient).

Why each part:

- **Per element, in units of its own terms.** Rounding errors scale with the terms of a sum, not
  with its value or with the tensor's largest element. A token's cross-entropy ``logsumexp(z) -
  z_label`` is a small difference of large terms; the weight-gradient row of a class that is no
  token's label is small, and so are its terms, so it gets a small allowance of its own: a wrong
  gradient for one class is seen however small that class's row is.
- **torch-eager as the yardstick.** torch-eager (logits in the input dtype, upcast to float32,
  ``F.cross_entropy``; what Hugging Face models do) runs on the same inputs in the same dtype: its
  error is what the dtype costs on this very case. A candidate may be ``MULTIPLE`` times less
  accurate, element-wise, and ``NORM_MULTIPLE`` times in the norm (over tensors of at least
  ``NORM_MIN_ELEMENTS``), where torch-eager's error is an average over many elements and so is
  stable from case to case (a drift spread over every element, such as partial sums rounded to
  bfloat16, shows there; rounding every element once more than torch-eager does stays within
  it). A reduced loss is one number whose error torch-eager may get small by luck: its
  yardstick is at least the root-sum-square of torch-eager's per-token errors, the size that
  error has on average (``harness.check.properties.reduced_loss_yardstick``).
- **Inputs computed in the dtype.** A tied model's hidden states are computed in d (the reference
  computes them in float64), so every implementation inherits one roundoff of d of their terms.
  torch-eager's logit rounding can cancel that by luck on a single token, so there the first term
  is at least ``INHERITED * u(d)`` (``inherited=True``).
- **The hard cap** ``CAP * u(d)``: however inaccurate torch-eager happens to be on a case, no
  element may be off by more than a few roundoffs of the dtype in units of its terms. torch-eager
  itself must stay within ``YARDSTICK * u(d)`` (plus the summation-order floor): its error model is
  one rounding of each logit, of each logit gradient and of the output, so a yardstick beyond that
  is broken (checked on every case where torch-eager is the candidate).
- **One rounding of the output**, ``u(out) * |reference_i|`` (plus half the output dtype's
  smallest subnormal, for values that round to zero): returning a float32 result in bfloat16 is
  a legitimate choice and costs exactly that; an output returned in float32 gets no such
  allowance, so partial sums rounded to the input dtype on the way are not excused. A gradient
  gets two (``output_roundings``): a backward may store the local gradient in the output dtype
  (a fused kernel does so in its forward) and round again when it multiplies by the upstream
  gradient or a mean's 1/N, which is the chain rule's own order; so does a loss divided by
  ``loss_div_factor`` once computed. Each rounding has its half subnormal: two roundings of a
  gradient near zero may cost one whole subnormal step.
- **The summation order**, ``SUM_ORDER * u(float32) * sqrt(k)`` per sum of length k the tensor
  depends on (D for the logits, V for the softmax, V again for the hidden-state gradient, N for a
  reduced loss and the weight and bias gradients): every implementation accumulates in at least
  float32, and summing k float32 terms in another order moves the result by about sqrt(k)
  roundoffs of the terms (random-walk rounding; the worst case, k roundoffs, is the bound of
  Higham, "Accuracy and Stability of Numerical Algorithms", 2002, ch. 4, but no real blocked or
  pairwise sum comes near it).

Identities (a scaled loss, a second backward, ``no_grad``, a split or permuted batch) compare two
results of the candidate that should agree: each side may be off the reference by the rule, so the
sides may differ by the sum of both allowances.

The constants were measured on the project's CPU machine, see ``tests/test_check_tolerance.py``
and the README's gate section for the margins: every built-in implementation stays within the
rule on every case the ci profile draws, and every plugin of ``tests/subtle_bugs.py`` breaks it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from harness.spec import underflow, unit_roundoff

MULTIPLE = 4.0  # element-wise: times torch-eager's worst error in units of the terms
NORM_MULTIPLE = 3.0  # norm-wise: times torch-eager's error norm
NORM_MIN_ELEMENTS = 16  # a norm over fewer elements is no average: the element-wise check alone
CAP = 8.0  # roundoffs of the dtype, in units of the terms, whatever torch-eager's error
YARDSTICK = 3.0  # roundoffs of the dtype torch-eager itself may be off, in units of the terms
INHERITED = 1.0  # roundoffs of the dtype every implementation inherits from inputs computed in it
SUM_ORDER = 4.0  # float32 roundoffs per sqrt(summation length), in units of the terms

ACCUMULATION_DTYPE = torch.float32


def logit_rounding_factor(roundings: int, dtype: torch.dtype, largest_logit: float) -> float:
    """How many roundings of their terms ``roundings`` roundings of every logit in ``dtype`` cost a result.

    The term model is linear: a relative error e of a logit moves its probability by about e times
    the logit. That holds while the product is small; with logits of hundreds in bfloat16 a rounding
    moves one by units, and its probability by a factor. k roundings move each logit z_j by at most
    k u |z_j| and the logsumexp by at most k u max|z|, so a probability by a factor within exp(+-x),
    x = 2 k u max|z|: the linear k roundings, times (e^x - 1) / x (1 + x/2 + ... for a small x, so
    about 1 for ordinary logits and for float32)."""
    x = 2 * roundings * unit_roundoff(dtype) * largest_logit
    return roundings * (math.expm1(x) / x if x > 1e-12 else 1.0)


def summation_floor(lengths: Sequence[int]) -> float:
    """``SUM_ORDER * u(float32) * sum(sqrt(k))``: reordering float32 sums, in units of the terms."""
    return SUM_ORDER * unit_roundoff(ACCUMULATION_DTYPE) * sum(math.sqrt(max(k, 1)) for k in lengths)


def _difference(actual: torch.Tensor, expected: torch.Tensor, largest: float = math.inf) -> torch.Tensor:
    """|actual - expected| in float64; 0 where both are the same NaN or infinity, or where one is an
    infinity and the other beyond ``largest`` with the same sign (an overflow of the output
    dtype); inf where only one is NaN or infinite."""
    actual, expected = actual.double(), expected.double()
    same = (actual == expected) | (actual.isnan() & expected.isnan())
    for inf, other in ((actual, expected), (expected, actual)):
        same |= inf.isinf() & (other.abs() > largest) & (inf.sign() == other.sign())
    diff = (actual - expected).abs()
    diff = torch.where(same, torch.zeros_like(diff), diff)
    return torch.where(diff.isnan(), torch.full_like(diff, math.inf), diff)


@dataclass(frozen=True)
class Error:
    """How far one result is from the reference: ``relative`` is the largest element-wise error in
    units of each element's terms; ``norm`` the 2-norm of the error."""

    relative: float
    norm: float

    @staticmethod
    def between(actual: torch.Tensor, expected: torch.Tensor, terms: torch.Tensor) -> Error:
        if actual.shape != expected.shape:
            return Error(math.inf, math.inf)
        if actual.numel() == 0:
            return Error(0.0, 0.0)
        diff = _difference(actual, expected)
        if not bool(diff.isfinite().all()):
            return Error(math.inf, math.inf)
        terms = terms.double().reshape(diff.shape).nan_to_num(nan=0.0)
        scaled = torch.where(terms > 0, diff / terms.clamp_min(1e-300), torch.where(diff > 0, math.inf, 0.0))
        return Error(float(scaled.max()), float(diff.norm()))

    def is_finite(self) -> bool:
        return math.isfinite(self.relative) and math.isfinite(self.norm)


@dataclass(frozen=True)
class Allowance:
    """The largest error allowed on one tensor: per element (``bound``, a tensor) and in the norm.

    ``largest``: the largest finite value of the output dtype. An exact value beyond it cannot be
    returned in that dtype, so an infinity of the same sign there is the output's rounding.
    """

    bound: torch.Tensor
    norm: float
    explanation: str
    largest: float = math.inf


def output_roundings(tensor: str, divided: bool) -> int:
    """How many times a result may be rounded to its output dtype: once; twice for a gradient
    (stored, then scaled by the upstream gradient) and for a loss or z-loss ``divided`` by
    loss_div_factor after it was computed."""
    return 2 if tensor.startswith("grad_") or (divided and tensor in ("loss", "z_loss")) else 1


def allowance(
    yardstick: Sequence[Error] | None,
    expected: torch.Tensor,
    terms: torch.Tensor,
    dtype: torch.dtype,
    out_dtypes: Sequence[torch.dtype],
    lengths: Sequence[int],
    roundings: int = 1,
    inherited: bool = False,
    largest_logit: float = 0.0,
) -> Allowance:
    """The rule for one tensor, summed over the sides of an identity (one side: a plain comparison).

    ``yardstick`` holds torch-eager's error on each side; ``None`` judges torch-eager itself, which
    gets ``YARDSTICK`` roundoffs of the dtype instead. ``out_dtypes``: the candidate's output dtype
    on each side; ``roundings``: how many times the output may be rounded to it; ``inherited``: the
    inputs were computed in ``dtype`` (a tied model's hidden states), see the module docstring.
    ``largest_logit``: the case's largest logit magnitude. torch-eager's error model, on which
    ``YARDSTICK`` and ``CAP`` count roundoffs, is one rounding of every logit, whose cost is
    linear in the terms only while u max|z| is small: both are widened by ``logit_rounding_factor``.
    """
    expected = expected.double()
    terms = terms.double().reshape(expected.shape).abs().nan_to_num(nan=0.0)  # NaN reference: exact NaN due
    size = expected.abs().nan_to_num(nan=0.0, posinf=0.0)
    u = unit_roundoff(dtype)
    widening = logit_rounding_factor(1, dtype, largest_logit)
    floor = summation_floor(lengths)
    bound = torch.zeros_like(terms)
    norm = 0.0
    parts = []
    for side, out_dtype in enumerate(out_dtypes):
        rounding = roundings * unit_roundoff(out_dtype) if out_dtype.is_floating_point else 0.0
        tiny = roundings * underflow(out_dtype) if out_dtype.is_floating_point else 0.0  # per rounding
        widened = f" x {widening:.3g} for logits up to {largest_logit:.3g}" if widening > 1.01 else ""
        if yardstick is None:
            relative = YARDSTICK * widening * u
            norm_part = relative * float(terms.norm())
            parts.append(f"torch-eager's own bound {YARDSTICK:g} u{widened}")
        else:
            eager = yardstick[side]
            relative = min(MULTIPLE * eager.relative, CAP * widening * u)
            norm_part = min(NORM_MULTIPLE * eager.norm, CAP * widening * u * float(terms.norm()))
            parts.append(f"min({MULTIPLE:g} x torch-eager's {eager.relative / u:.3g} u, {CAP:g} u{widened})")
            if inherited and relative < INHERITED * u:
                relative, norm_part = INHERITED * u, max(norm_part, INHERITED * u * float(terms.norm()))
                parts[-1] = f"{INHERITED:g} u inherited from inputs computed in the dtype"
        bound = bound + (relative + floor) * terms + rounding * size + tiny
        norm += norm_part + floor * float(terms.norm()) + rounding * float(size.norm()) + tiny * size.numel() ** 0.5
    explanation = " + ".join(parts) + f" of the terms, + output rounding + summation floor {floor / u:.2g} u"
    largest = min((torch.finfo(d).max for d in out_dtypes if d.is_floating_point), default=math.inf)
    return Allowance(bound, norm, explanation, largest)


def _index(flat_position: int, shape: torch.Size) -> tuple[int, ...]:
    index = []
    for size in reversed(shape):
        index.append(flat_position % size)
        flat_position //= size
    return tuple(reversed(index))


def mismatch(name: str, actual: torch.Tensor, expected: torch.Tensor, allowed: Allowance) -> str | None:
    """None when ``actual`` is within ``allowed`` of ``expected``; otherwise one line saying how not."""
    if actual.shape != expected.shape:
        return f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    if actual.numel() == 0:
        return None
    diff = _difference(actual, expected, allowed.largest)
    over = diff > allowed.bound
    if bool(over.any()):
        excess = torch.where(over, diff / allowed.bound.clamp_min(1e-300), torch.zeros_like(diff))
        worst = int(excess.flatten().argmax())
        where = _index(worst, diff.shape)
        got, want = float(actual.double().flatten()[worst]), float(expected.double().flatten()[worst])
        bound = float(allowed.bound.flatten()[worst])
        at = f" at {where}" if where else ""
        return (
            f"{name}: {int(over.sum())} of {diff.numel()} elements beyond the allowed error; worst{at}: "
            f"{got:.7g} vs reference {want:.7g} (error {abs(got - want):.3g}, allowed {bound:.3g}) "
            f"[allowed: {allowed.explanation}]"
        )
    norm = float(diff.norm())
    if diff.numel() >= NORM_MIN_ELEMENTS and norm > allowed.norm:
        expected_norm = float(expected.double().nan_to_num().norm())
        relative = norm / expected_norm if expected_norm else math.inf
        return (
            f"{name}: every element is within its bound, but the norm of the error {norm:.3g} "
            f"(relative {relative:.3g}) exceeds the allowed {allowed.norm:.3g} [norm-wise: "
            f"{NORM_MULTIPLE:g} x torch-eager's error norm + output rounding + summation floor]"
        )
    return None
