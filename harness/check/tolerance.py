"""The tolerance rule of the correctness gate: a rounding budget with a floor.

For every element i of a compared tensor t, computed from inputs in dtype d and returned in dtype out:

    |candidate_i - reference_i| <= (BUDGET * u(d) + floor(t)) * s_i + r_t * (u(out) |reference_i| + tiny(out))

and, over a tensor of at least NORM_MIN_ELEMENTS elements, in the 2-norm:

    ||candidate - reference|| <= NORM_MULTIPLE * ||torch-eager - reference|| + floor(t) ||s|| + r_t * (u(out) ||reference|| + ...)

``u(x)`` is the unit roundoff of dtype x (half its machine epsilon), ``s_i`` the size of the terms
element i is computed from (``harness.check.evaluation.term_magnitudes``), ``r_t`` the roundings of
the output allowed (1; 2 for a gradient), ``floor(t)`` the float32 summation-order floor.

Where each part comes from:

- **The budget, BUDGET = 4 roundings of the input dtype, in units of the terms.** It is the error
  model legitimate implementations share: each logit rounded to the input dtype at most twice (the
  matmul's output, then once more after adding the bias in that dtype: Liger adds its bias after
  the rounded matmul, a kernel may add it in the input dtype) and each logit gradient at most twice
  (stored in the input dtype during the forward, as fused kernels do, then scaled by the upstream
  gradient), everything else accumulated in float32 in any order. torch-eager rounds each logit and
  each logit gradient once, so it sits inside the budget with room for one rounding placed
  elsewhere: that is the floor a correct kernel never falls below, whatever torch-eager's own error
  on a case (a single token can make it almost exact by luck). torch-eager itself is judged by the
  same budget: it is the check of the model.
- **Per element, in units of its own terms.** Rounding errors scale with the terms a result is
  computed from, not with its value or with the tensor's largest element, so the weight-gradient
  row of a class no token has gets a small allowance of its own. A logit's own size is its value
  (a rounding in the input dtype is a fraction of it); its dot product's terms count at the cost
  of a float32 sum, which is how every legitimate kernel accumulates it (``evaluation.
  accumulation_share``). The terms are widened per token
  where a rounding of a logit is no longer a small relative change of its probability (large
  logits in a half dtype, ``logit_rounding_factor``), from that token's own logits only. Sums over
  tokens (a reduced loss, the gradients of the head's parameters) add independent per-token
  roundings, which grow as the square root of their count, not linearly: their terms are the
  smaller of the linear sum and ``SPREAD`` times the root-sum-square (Hoeffding's bound on a sum of
  independent bounded errors, at SPREAD standard deviations), so that a per-chunk partial sum kept
  in the input dtype shows in a reduced loss of thousands of tokens.
- **Norm-wise, against torch-eager.** A drift spread over every element (partial sums over the
  hidden dimension or over chunks kept in the input dtype) stays inside each element's budget; over
  a whole tensor it is many times torch-eager's error, which is an average over many elements and
  so stable from case to case. A candidate may be NORM_MULTIPLE times less accurate than torch-eager
  in the norm (a second rounding of every logit costs about sqrt(2) times), and never less than one
  element's whole budget: a single element off by its budget is no drift.
- **One rounding of the output**, ``u(out) |reference_i|`` (plus half the output dtype's smallest
  subnormal, for values that round to zero): returning a float32 result in bfloat16 is legitimate
  and costs exactly that. A gradient gets two (stored, then scaled by the upstream gradient or a
  mean's 1/N), and so does a loss divided by ``loss_div_factor`` once computed.
- **The summation order**, ``SUM_ORDER * u(float32) * sqrt(k)`` per sum of length k the tensor
  depends on: summing k float32 terms in another order moves the result by about sqrt(k) roundoffs
  of the terms (random-walk rounding; Higham, "Accuracy and Stability of Numerical Algorithms",
  2002, ch. 4, gives k as the worst case, which no real blocked or pairwise sum comes near).

Identities (a scaled loss, a second backward, ``no_grad``, a split or permuted batch) compare two
results of the candidate that should agree: each side may be off the reference by the rule, so the
sides may differ by the sum of both allowances. A known loss of precision of a peer is a row of
data (``harness.known.KnownImprecision``): its ``max_ratio`` multiplies the budget and the
norm-wise multiple for that comparison, nothing else.

The constants were checked against the corpora in ``tests/``: every correct variant there (each
placing its roundings elsewhere than torch-eager) stays inside the rule, every bug breaks it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from harness.spec import dtype_name, underflow, unit_roundoff

BUDGET = 4.0  # roundings of the input dtype, in units of the terms: 2 of each logit + 2 of each logit gradient
LOGIT_ROUNDINGS = 2  # of the budget, the roundings of each logit (widened for large logits)
SPREAD = 6.0  # standard deviations of a sum of independent per-token roundings
NORM_MULTIPLE = 3.0  # norm-wise: times torch-eager's error norm
NORM_MIN_ELEMENTS = 64  # a norm over fewer elements is no stable average: the element-wise check alone
SUM_ORDER = 4.0  # float32 roundoffs per sqrt(summation length), in units of the terms

ACCUMULATION_DTYPE = torch.float32


def logit_rounding_factor(roundings: int, dtype: torch.dtype, largest_logit: float | torch.Tensor):
    """How many roundings of their terms ``roundings`` roundings of every logit in ``dtype`` cost a result.

    The term model is linear: a relative error e of a logit moves its probability by about e times
    the logit. That holds while the product is small; with logits of hundreds in bfloat16 a rounding
    moves one by units, and its probability by a factor. k roundings move each logit z_j by at most
    k u |z_j| and the logsumexp by at most k u max|z|, so a probability by a factor within exp(+-x),
    x = 2 k u max|z|: the linear k roundings, times (e^x - 1) / x (1 + x/2 + ... for a small x, so
    about 1 for ordinary logits and for float32). ``largest_logit`` may be a tensor (one per token)."""
    x = 2 * roundings * unit_roundoff(dtype) * largest_logit
    if isinstance(x, torch.Tensor):
        return roundings * torch.where(x > 1e-12, torch.expm1(x) / x.clamp_min(1e-12), torch.ones_like(x))
    return roundings * (math.expm1(x) / x if x > 1e-12 else 1.0)


def summation_floor(lengths: Sequence[int]) -> float:
    """``SUM_ORDER * u(float32) * sum(sqrt(k))``: reordering float32 sums, in units of the terms."""
    return SUM_ORDER * unit_roundoff(ACCUMULATION_DTYPE) * sum(math.sqrt(max(k, 1)) for k in lengths)


def summed_over_tokens(linear: torch.Tensor, root_sum_square: torch.Tensor) -> torch.Tensor:
    """The terms of a sum of independent per-token contributions: the linear sum of their terms, or
    SPREAD times their root-sum-square where that is smaller (a long sum)."""
    return torch.minimum(linear, SPREAD * root_sum_square)


def _difference(actual: torch.Tensor, expected: torch.Tensor, largest: float = math.inf,
                slack: torch.Tensor | float = 0.0) -> torch.Tensor:
    """|actual - expected| in float64; 0 where both are the same NaN or infinity, or where one is an
    infinity and the other, moved by up to ``slack`` (the allowed error), beyond ``largest`` with the
    same sign (an overflow of the output dtype); inf where only one is NaN or infinite."""
    actual, expected = actual.double(), expected.double()
    if bool(actual.isfinite().all()) and bool(expected.isfinite().all()):  # the common case, in one pass
        return (actual - expected).abs()
    same = (actual == expected) | (actual.isnan() & expected.isnan())
    for inf, other in ((actual, expected), (expected, actual)):
        same |= inf.isinf() & (other.abs() + slack > largest) & (inf.sign() == other.sign())
    diff = (actual - expected).abs()
    diff = torch.where(same, torch.zeros_like(diff), diff)
    return torch.where(diff.isnan(), torch.full_like(diff, math.inf), diff)


def error_norm(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The 2-norm of ``actual - expected``: infinite where the shapes differ or one side alone is not finite."""
    if actual.shape != expected.shape:
        return math.inf
    return float(_difference(actual, expected).norm()) if actual.numel() else 0.0


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
    """The largest error allowed on one tensor: per element (``bound``, a tensor) and in the norm
    (``norm``; infinite where no norm-wise comparison applies).

    ``budget`` is the budget's share of ``bound`` (the rest is output rounding and summation order);
    ``explanation`` says in words what went into it. ``largest``: the largest magnitude the result
    can have without overflowing the output dtype (its largest finite value, less where the result
    is a value in that dtype divided afterwards); a value within ``bound`` of one beyond it may
    round to an infinity of the same sign, which is then the output's rounding.
    """

    bound: torch.Tensor
    norm: float
    explanation: str
    budget: torch.Tensor | None = None
    largest: float = math.inf

    def used(self, actual: torch.Tensor, expected: torch.Tensor) -> float:
        """The share of the allowance an error uses: the largest of its elements' and its norm's (1 = all)."""
        if actual.shape != expected.shape:
            return math.inf
        if actual.numel() == 0:
            return 0.0
        diff = _difference(actual, expected, self.largest, self.bound)
        element = diff / self.bound.clamp_min(1e-300)
        element = torch.where((diff == 0) & (self.bound == 0), torch.zeros_like(element), element)
        worst = float(element.max())
        if diff.numel() >= NORM_MIN_ELEMENTS and math.isfinite(self.norm) and self.norm > 0:
            worst = max(worst, float(diff.norm()) / self.norm)
        return worst


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
    ratio: float = 1.0,
    held_in: torch.dtype | None = None,
) -> Allowance:
    """The rule for one tensor, summed over the sides of an identity (one side: a plain comparison).

    ``yardstick`` holds torch-eager's error on each side, for the norm-wise comparison; None when
    there is none (torch-eager judged itself, or its result is not finite). ``out_dtypes``: the
    candidate's output dtype on each side; ``roundings``: how many times the output may be rounded
    to it; ``held_in``: a dtype it may be rounded to once more on its way out (a per-token loss
    kept in the input dtype before it is reduced); ``ratio``: a known imprecision's multiple of the
    budget (1 otherwise).
    """
    expected = expected.double()
    terms = terms.double().reshape(expected.shape).abs().nan_to_num(nan=0.0)  # NaN reference: exact NaN due
    size = expected.abs().nan_to_num(nan=0.0, posinf=0.0)
    u = unit_roundoff(dtype)
    floor = summation_floor(lengths)
    budget = ratio * BUDGET * u * terms
    bound = torch.zeros_like(terms)
    norm = 0.0
    out_parts = []
    for side, out_dtype in enumerate(out_dtypes):
        kept = [out_dtype] * roundings + ([held_in] if held_in is not None else [])
        rounding = sum(unit_roundoff(d) for d in kept if d.is_floating_point)
        tiny = sum(underflow(d) for d in kept if d.is_floating_point)  # per rounding
        bound = bound + budget + floor * terms + rounding * size + tiny
        if yardstick is not None:  # never below one element's whole budget: the norm judges a drift
            drift = max(ratio * NORM_MULTIPLE * yardstick[side].norm, float(budget.max()) if budget.numel() else 0.0)
            norm += drift + floor * float(terms.norm()) + rounding * float(size.norm()) + tiny * size.numel() ** 0.5
        out_parts.append(f"{roundings} rounding{'s' * (roundings > 1)} of its {dtype_name(out_dtype)} output")
        if held_in is not None:
            out_parts.append(f"1 of it kept in {dtype_name(held_in)}")
    sides = len(out_dtypes)
    scaled = f"{ratio:g} x " if ratio != 1 else ""
    explanation = (f"{scaled}{BUDGET:g} roundings of {dtype_name(dtype)} (u = {u:.3g}) of the terms it is computed "
                   f"from, + {', + '.join(dict.fromkeys(out_parts))}, + float32 summation order ({floor / u:.2g} u)")
    if sides > 1:
        explanation = f"each side: {explanation}"
    if yardstick is None:
        norm = math.inf
    held = [*out_dtypes, *([held_in] if held_in is not None else [])]
    largest = min((torch.finfo(d).max for d in held if d.is_floating_point), default=math.inf)
    return Allowance(bound, norm, explanation, budget * sides, largest)


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
    diff = _difference(actual, expected, allowed.largest, allowed.bound)
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
            f"{got:.7g} vs reference {want:.7g} (error {abs(got - want):.3g}, allowed {bound:.3g}: "
            f"{allowed.explanation})"
        )
    norm = float(diff.norm())
    if diff.numel() >= NORM_MIN_ELEMENTS and norm > allowed.norm:
        expected_norm = float(expected.double().nan_to_num().norm())
        relative = norm / expected_norm if expected_norm else math.inf
        return (
            f"{name}: every element is within its bound, but the error over the whole tensor (2-norm "
            f"{norm:.3g}, relative {relative:.3g}) exceeds the allowed {allowed.norm:.3g}: {NORM_MULTIPLE:g} x "
            f"torch-eager's own error on the same inputs, + output rounding and summation order "
            f"(a drift over every element, such as partial sums kept in a low precision)"
        )
    return None
