"""The tolerance policy of the correctness gate: derived from torch-eager's own error, not guessed.

The rule, for every compared tensor (loss, z-loss, each gradient) of a case in dtype ``d``:

    error(candidate) <= MULTIPLE * error(torch-eager) + floor
    floor = (FLOOR_ULPS * u(d) + K * u(float32)) * scale

where ``error`` is measured against the float64 reference *twice*:

- element-wise, as the largest absolute difference (``scale``: the largest absolute value), so
  a single wrong element (one dropped vocabulary column, one token) is seen;
- as a norm, ``||candidate - reference||`` (``scale``: the norm), i.e. the relative norm error,
  so a small drift spread over every element is seen too.

``torch-eager`` (materialised logits upcast to float32, then ``F.cross_entropy``; what Hugging
Face models do) runs on the same inputs in the same dtype, so its error is what the dtype itself
costs on this very case; a candidate may be ``MULTIPLE`` times less accurate than that.

The floor covers what one yardstick run cannot:

- ``FLOOR_ULPS * u(d)``, with ``u(d)`` the unit roundoff of the dtype (half its machine epsilon:
  2^-24 for float32, 2^-8 for bfloat16, 2^-11 for float16): an output rounded to the input
  dtype once more than torch-eager does (a loss returned in bfloat16), or torch-eager being
  exact by luck on a tiny case;
- ``K * u(float32)``: summing in another order than torch-eager's BLAS. Every implementation
  accumulates in at least float32, and reordering a sum of K float32 terms changes it by at most
  about K roundoffs of the size of its terms (the classical bound gamma_K, Higham, "Accuracy and
  Stability of Numerical Algorithms", 2002, ch. 4). K is ``N + D + V``, the total length of the
  sums an output depends on (D for the logits, V for the softmax and the hidden-state gradient,
  N for the reduction and the weight gradient). On this machine, PyTorch's
  ``linear_cross_entropy`` returns a float32 hidden-state gradient for V = 65536 with 13 times
  torch-eager's error (6000 roundoffs, within gamma_K): another order, not a bug.

``scale`` is the size of the terms each result is computed from, not of the result: a token's
loss ``logsumexp(z) - z_label`` and a confident token's logit gradient ``p - onehot`` are small
differences of large terms, and rounding errors scale with the terms
(``harness.check.outcome.term_magnitudes``). So an implementation that rounds its loss to
bfloat16 a few times (PyTorch's ``linear_cross_entropy`` adds each batch chunk's loss into a
bfloat16 accumulator: 2.75 bfloat16 steps off on a loss of 4.8 on this machine) stays within
the rule. A reference that is exactly zero (every token ignored,
reduction sum) leaves no floor: the candidate must be exactly zero too.

Identities (a scaled loss, a second backward, ``no_grad``, a split or permuted batch) compare
two results of the candidate that should agree. Each side may be off the reference by the rule
above, so the sides may differ by the sum of both allowances: ``MULTIPLE`` times torch-eager's
deviation on each side, plus two floors.

torch-eager cannot be measured against itself; its results must stay within
``YARDSTICK_FLOORS`` floors of the reference. That also guards the yardstick: were it far off,
every other tolerance would be meaningless. On this 2-core CPU machine its worst errors over 300
random cases (N < 80, D < 40, V < 700, logits up to about 70) were about 60 float32 roundoffs
and 17 bfloat16 or float16 roundoffs, element-wise relative to the scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MULTIPLE = 4.0
FLOOR_ULPS = 4.0
YARDSTICK_FLOORS = 16.0

ACCUMULATION_DTYPE = torch.float32


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the machine epsilon: the largest relative error of rounding one value to ``dtype``."""
    return torch.finfo(dtype).eps / 2


def relative_floor(dtype: torch.dtype, reduction_length: int) -> float:
    """``FLOOR_ULPS * u(dtype) + K * u(float32)``: the floor relative to the scale."""
    return FLOOR_ULPS * unit_roundoff(dtype) + reduction_length * unit_roundoff(ACCUMULATION_DTYPE)


@dataclass(frozen=True)
class Deviation:
    """How far one tensor is from another: largest absolute difference, and norm of the difference."""

    max_abs: float
    norm: float

    @staticmethod
    def between(actual: torch.Tensor, expected: torch.Tensor) -> Deviation:
        if actual.shape != expected.shape:
            return Deviation(math.inf, math.inf)
        if actual.numel() == 0:
            return Deviation(0.0, 0.0)
        actual, expected = actual.double(), expected.double()
        same = (actual == expected) | (actual.isnan() & expected.isnan())  # equal infinities included
        diff = torch.where(same, torch.zeros_like(actual), actual - expected)
        if not bool(diff.isfinite().all()):
            return Deviation(math.inf, math.inf)
        return Deviation(float(diff.abs().max()), float(diff.norm()))

    def __add__(self, other: Deviation) -> Deviation:
        return Deviation(self.max_abs + other.max_abs, self.norm + other.norm)

    def is_finite(self) -> bool:
        return math.isfinite(self.max_abs) and math.isfinite(self.norm)


@dataclass(frozen=True)
class Allowance:
    """The largest deviation a candidate may have on one tensor, and how it was derived."""

    max_abs: float
    norm: float
    explanation: str  # how max_abs was derived
    norm_explanation: str  # how norm was derived


def _scales(expected: torch.Tensor, magnitude: torch.Tensor | None) -> tuple[float, float]:
    """The scale of the floor: the reference's size, or the size of the terms it was computed from."""
    size = expected.double().abs()
    if magnitude is not None:
        size = torch.maximum(size, magnitude.double().abs().reshape(size.shape))
    finite = size[size.isfinite()]
    if not finite.numel():
        return 0.0, 0.0
    return float(finite.max()), float(finite.norm())


def allowance(
    yardstick: Deviation,
    expected: torch.Tensor,
    dtype: torch.dtype,
    reduction_length: int,
    *,
    sides: int = 1,
    magnitude: torch.Tensor | None = None,
) -> Allowance:
    """``MULTIPLE`` x torch-eager's deviation (summed over the sides) + one floor per side."""
    scale_abs, scale_norm = _scales(expected, magnitude)
    floor = sides * relative_floor(dtype, reduction_length)
    floor_abs, floor_norm = floor * scale_abs, floor * scale_norm
    return Allowance(
        MULTIPLE * yardstick.max_abs + floor_abs,
        MULTIPLE * yardstick.norm + floor_norm,
        f"{MULTIPLE:g} x torch-eager's {yardstick.max_abs:.3g} + floor {floor_abs:.3g}",
        f"{MULTIPLE:g} x torch-eager's {yardstick.norm:.3g} + floor {floor_norm:.3g}",
    )


def yardstick_allowance(
    expected: torch.Tensor,
    dtype: torch.dtype,
    reduction_length: int,
    *,
    sides: int = 1,
    magnitude: torch.Tensor | None = None,
) -> Allowance:
    """What torch-eager itself may deviate: ``YARDSTICK_FLOORS`` floors (per side of an identity)."""
    scale_abs, scale_norm = _scales(expected, magnitude)
    bound = sides * YARDSTICK_FLOORS * relative_floor(dtype, reduction_length)
    explanation = f"torch-eager is the yardstick: {sides * YARDSTICK_FLOORS:g} floors"
    return Allowance(bound * scale_abs, bound * scale_norm, explanation, explanation)


def mismatch(name: str, actual: torch.Tensor, expected: torch.Tensor, allowed: Allowance) -> str | None:
    """None when ``actual`` is within ``allowed`` of ``expected``; otherwise one line saying how not.

    The element-wise check is ``torch.testing.assert_close`` with ``atol`` from the allowance
    (NaN only where NaN is expected); the norm check follows it.
    """
    try:
        torch.testing.assert_close(
            actual.double(), expected.double(), rtol=0.0, atol=allowed.max_abs, equal_nan=True, check_dtype=False
        )
    except AssertionError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        useless = ("Tensor-likes are not", "Scalars are not", "Greatest relative", "Relative difference")
        useful = [line.rstrip(".") for line in lines if not line.startswith(useless)]
        return f"{name}: {'; '.join(useful)} [allowed: {allowed.explanation}]"
    norm = Deviation.between(actual, expected).norm
    if norm > allowed.norm:
        expected_norm = float(expected.double().norm())
        relative = norm / expected_norm if expected_norm else math.inf
        return (
            f"{name}: every element is within its bound, but the norm of the error {norm:.3g} "
            f"(relative {relative:.3g}) exceeds the allowed {allowed.norm:.3g} [{allowed.norm_explanation}]"
        )
    return None
