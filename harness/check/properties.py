"""The properties the gate checks, each a function of (implementation, case) that raises on failure.

- Equivalence: loss, reported z-loss and the gradients of hidden states and of every parameter of
  the head (weight, bias, norm, class scale) match the float64 reference within the tolerance of ``harness.check.tolerance``.
- The autograd contract: gradients reach exactly the inputs that require grad; a scaled loss
  scales every gradient; a second backward with ``retain_graph=True`` accumulates exactly twice
  the gradient; ``torch.no_grad()`` gives the same loss; inputs are not modified; a tied head
  weight receives the sum of both paths' gradients.
- Invariances: with ``sum`` a batch's loss is the sum over any split of its tokens; permuting
  tokens permutes ``none`` losses (and the hidden-state gradients); the result does not depend
  on the chunk size.

Identities (the autograd contract and the invariances) compare two results of the candidate;
each may be off the float64 reference by the equivalence tolerance, so the two sides may differ
by the sum of both allowances (see ``harness.check.tolerance``). Each property is a function
``check(implementation, case, context)``; ``PROPERTIES`` lists them with the cases Hypothesis
draws for each, and ``explicit_examples`` the cases every run checks first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from harness.adapter import Implementation
from harness.baseline import TorchEager
from harness.case import GRADIENT_INPUTS, Case, Inputs, make_inputs
from harness.check.evaluation import (
    CheckFailure,
    Outcome,
    evaluate,
    implementation_loss,
    logit_terms,
    reference_loss_function,
    run_implementation,
    run_reference,
    term_magnitudes,
    upstream_for,
)
from harness.check.shared import SharedResults
from harness.check.tolerance import Allowance, Error, allowance, error_norm, mismatch, output_roundings
from harness.errors import HarnessError, UnsupportedCase
from harness.known import KnownFailure, KnownImprecision, KnownIssue, Mismatch
from harness.semantics import head_logits, keep_positions

YARDSTICK = TorchEager()

# The gradient-accumulation factor of the scaling and retain_graph properties: 3/8 is exact in
# every dtype, and not a power of two, so an implementation that ignores it, or applies it
# twice, cannot pass by luck.
LOSS_SCALE = 0.375


class CaseRejected(Exception):
    """The case cannot judge the candidate (torch-eager itself is not finite on it)."""


@dataclass(frozen=True)
class ErrorRecord:
    """A candidate's error on one tensor of one case: its norm, torch-eager's on the same inputs, and
    the share of the gate's allowance it used (1 = all of it)."""

    tensor: str
    dtype: str
    error: float
    eager_error: float
    case: Case
    budget_ratio: float = 0.0

    @property
    def ratio(self) -> float:
        """The candidate's error as a multiple of torch-eager's (1 when both are exact)."""
        if self.eager_error > 0:
            return self.error / self.eager_error
        return 1.0 if self.error == 0 else float("inf")


@dataclass
class CheckContext:
    """What a check needs besides implementation and case, and what it observed.

    ``known`` holds the implementation's known issues (``harness.known``): a mismatch a structural
    known failure matches, or one within a known imprecision's bound, is appended to ``observed``
    instead of failing; ``errors`` collects the candidate's error on every compared tensor.
    ``shared`` holds what the checks of other implementations in the run computed for a case (the
    reference, the yardstick).
    """

    device: str = "cpu"
    property_id: str = ""
    shared: SharedResults = SharedResults()
    known: tuple[KnownIssue, ...] = ()
    observed: list[tuple[KnownIssue, Mismatch]] = field(default_factory=list)
    errors: list[ErrorRecord] = field(default_factory=list)

    @property
    def known_failures(self) -> tuple[KnownFailure, ...]:
        return tuple(k for k in self.known if isinstance(k, KnownFailure))

    def imprecision(self, case: Case, tensor: str) -> KnownImprecision | None:
        """The one known imprecision that applies to this comparison, if any."""
        return next((k for k in self.known if isinstance(k, KnownImprecision)
                     and k.applies(self.property_id, case, tensor)), None)

    def fail_if(self, problems: list[Mismatch], context: str = "") -> None:
        """Raise for the problems no known failure explains: the first in full, the others by name."""
        unexplained = []
        for problem in problems:
            known = next((k for k in self.known_failures if k.matches is not None and k.matches(problem)), None)
            if known is None:
                unexplained.append(problem)
            else:
                self.observed.append((known, problem))
        if unexplained:
            first = unexplained[0].message
            others = [p.tensor for p in unexplained[1:]]
            text = f"{context}: {first}" if context else first
            raise CheckFailure(text + (f" (also differ: {', '.join(others)})" if others else ""))


def is_yardstick(impl: Implementation) -> bool:
    return impl.name == YARDSTICK.name


def summation_lengths(case: Case, tensor: str) -> tuple[int, ...]:
    """The lengths of the sums a compared tensor depends on (the tolerance's summation floor).

    D for the logits and V for the softmax, always; N where the tokens are summed (a reduced loss,
    the gradients of the head's parameters); V once more for the gradient of the projection's input,
    and D once more through a norm; D and N once more for a tied weight's embedding path.
    """
    dim, vocab, tokens = case.dim, case.vocab, case.num_tokens
    if tensor in ("loss", "z_loss"):
        return (dim, vocab) if case.reduction == "none" else (dim, vocab, tokens)
    if tensor == "grad_hidden":
        return (dim, vocab, vocab, dim) if case.option("norm") else (dim, vocab, vocab)
    if tensor in ("grad_norm_weight", "grad_norm_bias"):
        return (dim, vocab, vocab, tokens)
    if tensor == "logits":
        return (dim,)
    if tensor == "grad_weight" and case.tied:
        return (dim, vocab, tokens, dim, tokens)
    return (dim, vocab, tokens)


def allowed_error(
    name: str, expected: torch.Tensor, terms: torch.Tensor, case: Case, eager_errors: list[Error] | None,
    out_dtypes: list[torch.dtype], ratio: float = 1.0, accumulated: int = 0,
) -> Allowance:
    """The tolerance rule for tensor ``name`` of ``case`` (``eager_errors``: torch-eager's error on
    each side, None when there is no norm-wise comparison; ``accumulated``: backwards added into
    ``.grad`` after the first, each one more rounding of the output)."""
    divisor = case.option("loss_div_factor")
    roundings = output_roundings(name, divisor != 1) + accumulated
    # A loss may be kept in the input dtype on its way out (a kernel's per-token loss buffer, as
    # log_softmax of bfloat16 logits returns), then reduced and returned in any dtype: one rounding more.
    is_loss = name in ("loss", "z_loss")
    held_in = case.torch_dtype if is_loss else None
    allowed = allowance(eager_errors, expected, terms, case.torch_dtype, out_dtypes, summation_lengths(case, name),
                        roundings, ratio, held_in)
    if is_loss and divisor > 1:
        # The loss may be formed in its dtype before it is divided (as the harness divides a plain
        # plugin's): an undivided value beyond the dtype's range is an infinity however it is divided.
        allowed = replace(allowed, largest=allowed.largest / divisor)
    return allowed


def judge(name: str, actual: torch.Tensor, expected: torch.Tensor, terms: torch.Tensor, case: Case,
          ctx: CheckContext, eager_errors: list[Error] | None, out_dtypes: list[torch.dtype],
          identity: bool = False, loss_scale: float = 1.0, allowed: Allowance | None = None,
          accumulated: int = 0) -> Mismatch | None:
    """Compare one tensor under the rule (widened by a known imprecision that applies, which is then
    observed); the mismatch when it is out of bounds, else None. ``name`` may carry a batch,
    ``loss/1``: the rule is that of its kind of tensor; ``allowed``: the rule's allowance, when the
    caller has it already."""
    kind = name.partition("/")[0]
    if allowed is None:
        allowed = allowed_error(kind, expected, terms, case, eager_errors, out_dtypes, accumulated=accumulated)
    problem = mismatch(name, actual, expected, allowed)
    if problem is None:
        return None
    evidence = dict(actual=actual, expected=expected, allowed=allowed, terms=terms, loss_scale=loss_scale,
                    identity=identity)
    known = ctx.imprecision(case, kind)
    if known is not None:
        widened = allowed_error(kind, expected, terms, case, eager_errors, out_dtypes, ratio=known.max_ratio,
                                accumulated=accumulated)
        if mismatch(name, actual, expected, widened) is None:
            ctx.observed.append((known, Mismatch(ctx.property_id, case, name, problem, **evidence)))
            return None
        problem += f" [beyond the known imprecision of {known.max_ratio:g} x the budget: {known.reason}]"
    return Mismatch(ctx.property_id, case, name, problem, **evidence)


def compare_to_reference(
    got: Outcome, ref: Outcome, yard: Outcome | None, case: Case, ctx: CheckContext
) -> list[Mismatch]:
    """What of ``got`` is out of bounds of the reference; ``yard`` is torch-eager's outcome on the
    same inputs (None when the candidate is torch-eager itself: no norm-wise comparison)."""
    problems = []
    dtype = case.torch_dtype
    got_tensors, yard_tensors = got.tensors(), (yard.tensors() if yard is not None else {})
    for name, expected in ref.tensors().items():
        actual = got_tensors.get(name)
        if expected is None:
            if actual is not None and name.startswith("grad_"):
                message = f"{name}: a gradient arrived although the input does not require grad"
                problems.append(Mismatch(ctx.property_id, case, name, message, actual))
            continue
        if actual is None:
            if name != "z_loss":  # an implementation need not report the z-loss separately
                message = f"{name}: no gradient arrived although the input requires grad"
                problems.append(Mismatch(ctx.property_id, case, name, message, None, expected))
            continue
        terms = ref.magnitudes[name]
        out_dtypes = [got.dtypes.get(name, dtype)]
        eager_errors = None
        if yard is not None:
            eager = Error.between(yard_tensors[name], expected, terms)
            if not eager.is_finite():
                raise CaseRejected(f"torch-eager's {name} is not finite on this case")
            eager_errors = [eager]
        allowed = allowed_error(name, expected, terms, case, eager_errors, out_dtypes)
        used = allowed.used(actual, expected)
        own_norm = error_norm(actual, expected)
        eager_norm = eager_errors[0].norm if eager_errors else own_norm
        ctx.errors.append(ErrorRecord(name, case.dtype, own_norm, eager_norm, case, used))
        problem = judge(name, actual, expected, terms, case, ctx, eager_errors, out_dtypes, allowed=allowed)
        if problem is not None:
            problems.append(problem)
    return problems


Sides = dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]


def compare_identity(
    impl: Implementation,
    sides: Callable[[Implementation], Sides],
    reference: dict[str, torch.Tensor],
    case: Case,
    ctx: CheckContext,
    magnitudes: dict[str, torch.Tensor],
    *,
    loss_scale: float = 1.0,
    accumulated: dict[str, int] | None = None,
) -> list[Mismatch]:
    """What differs between the two sides of an identity by more than allowed.

    ``sides(impl)`` computes both sides per tensor; ``reference`` is the float64 value both
    approximate and ``magnitudes`` the size of its terms. Each side may be off the reference by the
    tolerance rule, with torch-eager's error on that side for the norm-wise part, so the sides may
    differ by the sum of both allowances. Outputs are allowed roundings to the case's dtype per side.
    """
    got = sides(impl)
    yard = None if is_yardstick(impl) else sides(YARDSTICK)
    dtype = case.torch_dtype
    problems = []
    for name, (lhs, rhs) in got.items():
        if lhs is None and rhs is None:
            continue
        if lhs is None or rhs is None:
            message = f"{name}: present on one side of the identity only"
            problems.append(Mismatch(ctx.property_id, case, name, message, lhs, rhs, loss_scale=loss_scale,
                                     identity=True))
            continue
        expected, terms = reference[name], magnitudes[name]
        errors = None
        if yard is not None:
            errors = [Error.between(side, expected, terms) for side in yard[name]]
            if not all(e.is_finite() for e in errors):
                raise CaseRejected(f"torch-eager's {name} is not finite on this case")
        problem = judge(name, lhs, rhs, terms, case, ctx, errors, [dtype, dtype], identity=True,
                        loss_scale=loss_scale, accumulated=(accumulated or {}).get(name, 0))
        if problem is not None:
            problems.append(problem)
    return problems


# --- equivalence -------------------------------------------------------------------------------


def check_equivalence(impl: Implementation, case: Case, ctx: CheckContext) -> None:
    got = run_implementation(impl, case, device=ctx.device)
    yard = None
    if not (is_yardstick(impl) and case.chunk is None):
        unchunked = case.replace(chunk=None)
        yard = ctx.shared.get("yardstick", unchunked, ctx.device,
                              lambda: run_implementation(YARDSTICK, unchunked, device=ctx.device))
    ref = ctx.shared.get("reference", case, "cpu", lambda: run_reference(case))
    problems = compare_to_reference(got, ref, yard, case, ctx)
    if not problems and case.reduction != "none" and yard is not None:
        problems = compare_per_token(impl, case, ctx)
    ctx.fail_if(problems)


def compare_per_token(impl: Implementation, case: Case, ctx: CheckContext) -> list[Mismatch]:
    """A reduced loss is one number, and one bad token in 65536 hides in a mean: the case with
    reduction none, forward only, judged token by token (skipped where the implementation has no
    per-token loss). Its own inputs (``make_inputs`` draws an upstream gradient for reduction
    none), so that the case a mismatch names is the case that was run."""
    per_token_case = case.replace(reduction="none")

    def per_token(which: Implementation) -> torch.Tensor:
        inputs = make_inputs(per_token_case.replace(chunk=None) if which is YARDSTICK else per_token_case,
                             device=ctx.device)
        if case.chunk is not None and which is not YARDSTICK:
            which = which.with_chunk_size(case.chunk)
        with torch.no_grad():
            return which.loss(inputs.hidden, inputs.weight, inputs.labels, inputs.spec, bias=inputs.bias).loss

    try:
        got = per_token(impl)
    except UnsupportedCase:
        return []
    expected, terms = ctx.shared.get("per-token reference", per_token_case, "cpu",
                                     lambda: _per_token_reference(per_token_case))
    if tuple(got.shape) != tuple(expected.shape):
        message = (f"loss per token (this case with reduction=none): shape {tuple(got.shape)}, expected "
                   f"{tuple(expected.shape)}")
        return [Mismatch(ctx.property_id, per_token_case, "loss", message)]
    eager_loss = ctx.shared.get("per-token yardstick", per_token_case.replace(chunk=None), ctx.device,
                                lambda: per_token(YARDSTICK).detach().cpu())
    eager = Error.between(eager_loss, expected, terms)
    if not eager.is_finite():
        return []
    problem = judge("loss", got.detach().cpu(), expected, terms, per_token_case, ctx, [eager], [got.dtype])
    if problem is None:
        return []
    message = f"loss per token (this case with reduction=none): {problem.message}"
    return [replace(problem, message=message)]


def _per_token_reference(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 loss per token of a case with reduction none, and its terms."""
    inputs = make_inputs(case, reference=True)
    with torch.no_grad():
        return reference_loss_function(inputs).loss, term_magnitudes(inputs, case.torch_dtype)["loss"]


def check_chunk_size(impl: Implementation, case: Case, ctx: CheckContext) -> None:
    """Equivalence with the implementation's chunk size set to the case's ``chunk``."""
    if case.chunk is None:
        raise HarnessError("the chunk-size property needs a case with chunk=...")
    check_equivalence(impl, case, ctx)


# --- the autograd contract -----------------------------------------------------------------------


def _grad_tensors(outcome: Outcome, factor: float = 1.0) -> dict[str, torch.Tensor | None]:
    return {f"grad_{name}": None if g is None else g * factor for name, g in outcome.grads.items()}


def check_grad_scaling(impl: Implementation, case: Case, ctx: CheckContext) -> None:
    """Backward of ``LOSS_SCALE * loss`` gives ``LOSS_SCALE`` times the gradients of ``loss``."""

    def sides(which: Implementation) -> Sides:
        plain = _grad_tensors(run_implementation(which, case, device=ctx.device), LOSS_SCALE)
        scaled = _grad_tensors(run_implementation(which, case, device=ctx.device, loss_scale=LOSS_SCALE))
        return {name: (scaled[name], plain[name]) for name in plain}

    ref = run_reference(case, loss_scale=LOSS_SCALE)
    ctx.fail_if(compare_identity(impl, sides, _grad_tensors(ref), case, ctx, ref.magnitudes),
                f"backward of {LOSS_SCALE} x loss vs {LOSS_SCALE} x gradients")


def check_retain_graph(impl: Implementation, case: Case, ctx: CheckContext) -> None:
    """Two backwards of one graph (``retain_graph=True``) accumulate exactly twice one backward."""

    def sides(which: Implementation) -> Sides:
        once = _grad_tensors(run_implementation(which, case, device=ctx.device, loss_scale=LOSS_SCALE), 2.0)
        twice = _grad_tensors(
            run_implementation(which, case, device=ctx.device, loss_scale=LOSS_SCALE, backward_calls=2)
        )
        return {name: (twice[name], once[name]) for name in once}

    ref = run_reference(case, loss_scale=LOSS_SCALE, backward_calls=2)
    ctx.fail_if(compare_identity(impl, sides, _grad_tensors(ref), case, ctx, ref.magnitudes, loss_scale=LOSS_SCALE),
                f"two backwards of {LOSS_SCALE} x loss vs twice one backward")


def check_no_grad(impl: Implementation, case: Case, ctx: CheckContext) -> None:
    """A forward under ``torch.no_grad()`` runs and returns the loss (and z-loss) of a normal forward."""

    def sides(which: Implementation) -> Sides:
        normal = run_implementation(which, case, device=ctx.device, backward_calls=0)
        without = run_implementation(which, case, device=ctx.device, grad_enabled=False)
        return {"loss": (without.loss, normal.loss), "z_loss": (without.z_loss, normal.z_loss)}

    ref = run_reference(case, backward_calls=0)
    reference = {"loss": ref.loss, "z_loss": ref.z_loss}
    ctx.fail_if(compare_identity(impl, sides, reference, case, ctx, ref.magnitudes),
                "under torch.no_grad() vs normal forward")


def check_inputs_unchanged(impl: Implementation, case: Case, ctx: CheckContext) -> None:
    """Forward and backward leave every input bit-for-bit as it was."""
    inputs = make_inputs(case, device=ctx.device)
    watched = {name: getattr(inputs, name) for name in GRADIENT_INPUTS}
    watched.update(labels=inputs.labels, class_weight=inputs.spec.class_weight)
    before = {name: t.detach().clone() for name, t in watched.items() if t is not None}
    evaluate(implementation_loss(impl), inputs)
    problems = []
    for name, old in before.items():
        new = watched[name].detach()
        if not torch.equal(new, old):
            changed = (new != old).nonzero()
            where = tuple(changed[0].tolist()) if len(changed) else ()
            message = f"{name} was modified in place ({len(changed)} of {old.numel()} elements, first at {where})"
            problems.append(Mismatch(ctx.property_id, case, name, message))
    ctx.fail_if(problems)


def _untied_copy(inputs: Inputs) -> Inputs:
    """The same tied model's inputs, with the head weight replaced by a separate copy of itself."""
    head = torch.nn.Parameter(inputs.weight.detach().clone())
    inputs.gradient_inputs["weight"] = head
    inputs.weight = head
    return inputs


def check_tied_weights(impl: Implementation, case: Case, ctx: CheckContext) -> None:
    """A head weight tied to the embedding gets the embedding path's plus the head path's gradient."""
    tied_case = case.replace(tied=True)

    def sides(which: Implementation) -> Sides:
        tied = run_implementation(which, tied_case, device=ctx.device)
        untied_inputs = _untied_copy(make_inputs(tied_case, device=ctx.device))
        embedding = untied_inputs.model.embedding.weight
        evaluate(implementation_loss(which), untied_inputs)
        both_paths = embedding.grad.double().cpu() + untied_inputs.weight.grad.double().cpu()
        return {"grad_weight": (tied.grads["weight"], both_paths)}

    ref = run_reference(tied_case)
    ctx.fail_if(compare_identity(impl, sides, {"grad_weight": ref.grads["weight"]}, tied_case, ctx, ref.magnitudes),
                "tied weight's gradient vs embedding-path + head-path gradients")


# --- call patterns ----------------------------------------------------------------------------------

# Head tensors the batches of one training step share (the hidden states, labels and upstream
# gradients are each batch's own).
SHARED = ("weight", "bias", "norm_weight", "norm_bias", "class_scale")
# The optimizer step between two steps: halving is exact in every dtype, so the reference's float64
# head and the candidate's stay the same values.
STEP_FACTOR = 0.5


def batches(case: Case, count: int, *, device: str = "cpu", reference: bool = False) -> list[Inputs]:
    """``count`` batches of the case's shapes that share one head (the case's own): the first is the
    case's inputs, the others take their hidden states, labels and upstream gradient from other seeds."""
    first = make_inputs(case, device=device, reference=reference)
    result = [first]
    for k in range(1, count):
        other = make_inputs(case.replace(seed=case.seed + 7919 * k), device=device, reference=reference)
        gradient_inputs = {name: first.gradient_inputs[name] if name in SHARED else tensor
                           for name, tensor in other.gradient_inputs.items()}
        result.append(replace(first, hidden=other.hidden, labels=other.labels, upstream=other.upstream,
                              gradient_inputs=gradient_inputs))
    return result


def optimizer_step(batch: Inputs) -> None:
    """What an optimizer does to the head between two steps: its trained tensors changed in place,
    their gradients cleared (``zero_grad(set_to_none=True)``)."""
    with torch.no_grad():
        for name in SHARED:
            tensor = batch.gradient_inputs.get(name)
            if tensor is not None:
                tensor.mul_(STEP_FACTOR)
                tensor.grad = None


def _head_gradients(batch: Inputs, suffix: str) -> dict[str, torch.Tensor | None]:
    return {f"grad_{name}/{suffix}": None if tensor.grad is None else tensor.grad.double().cpu()
            for name, tensor in batch.gradient_inputs.items() if name in SHARED}


def _call(loss_function, batch: Inputs, k: int, results: dict) -> torch.Tensor:
    """Batch ``k``'s forward: its loss recorded, the loss returned for its backward."""
    loss = loss_function(batch).loss
    results[f"loss/{k}"] = loss.detach().double().cpu()
    return loss


def _backward(batch: Inputs, loss: torch.Tensor, k: int, results: dict) -> None:
    if batch.gradient_inputs:
        loss.backward(upstream_for(batch, loss))
    if "hidden" in batch.gradient_inputs:
        results[f"grad_hidden/{k}"] = None if batch.hidden.grad is None else batch.hidden.grad.double().cpu()


def run_pattern(loss_function, inputs: list[Inputs], pattern: str, on_call=None) -> dict[str, torch.Tensor | None]:
    """The batches through ``loss_function`` in a call pattern, sharing one head:

    - ``interleaved``: every forward first, then the backwards in another order (the second, the
      rest, the first), the head's gradients accumulating: a shared head, multi-token prediction,
      a pipeline schedule;
    - ``steps``: two micro-batches accumulating gradients in ``.grad``, an optimizer step that
      changes the head in place, then a third batch: a training loop.

    ``on_call(k, batch)`` is called before batch k's forward (the reference takes its terms there).
    """
    results: dict[str, torch.Tensor | None] = {}
    notify = on_call or (lambda k, batch: None)
    if pattern == "interleaved":
        losses = []
        for k, batch in enumerate(inputs):
            notify(k, batch)
            losses.append(_call(loss_function, batch, k, results))
        for k in [1, *range(2, len(inputs)), 0]:
            _backward(inputs[k], losses[k], k, results)
        results.update(_head_gradients(inputs[0], "all"))
        return results
    for k, batch in enumerate(inputs):
        if k == len(inputs) - 1:
            results.update(_head_gradients(inputs[0], "accumulated"))
            optimizer_step(batch)
        notify(k, batch)
        _backward(batch, _call(loss_function, batch, k, results), k, results)
    results.update(_head_gradients(inputs[0], "step"))
    return results


def run_alone(loss_function, case: Case, count: int, pattern: str, device: str) -> dict[str, torch.Tensor | None]:
    """What ``run_pattern`` must equal: each batch alone on a fresh head of its own (the last one of
    ``steps`` after the optimizer step), the head's gradients summed over the batches it spans."""
    results: dict[str, torch.Tensor | None] = {}
    for k in range(count):
        batch = batches(case, count, device=device)[k]
        stepped = pattern == "steps" and k == count - 1
        if stepped:
            optimizer_step(batch)
        _backward(batch, _call(loss_function, batch, k, results), k, results)
        suffix = "step" if stepped else ("accumulated" if pattern == "steps" else "all")
        for name, grad in _head_gradients(batch, suffix).items():
            results[name] = grad if results.get(name) is None or grad is None else results[name] + grad
    return results


def check_call_pattern(pattern: str, count: int):
    """The property that ``pattern`` over ``count`` batches gives what each batch gives alone."""

    def check(impl: Implementation, case: Case, ctx: CheckContext) -> None:
        def sides(which: Implementation) -> Sides:
            loss_function = implementation_loss(which)
            called = run_pattern(loss_function, batches(case, count, device=ctx.device), pattern)
            alone = run_alone(loss_function, case, count, pattern, ctx.device)
            return {name: (called[name], alone.get(name)) for name in called}

        terms: dict[int, dict[str, torch.Tensor]] = {}
        reference = run_pattern(reference_loss_function, batches(case, count, reference=True), pattern,
                                on_call=lambda k, batch: terms.setdefault(k, term_magnitudes(batch, case.torch_dtype)))
        magnitudes, accumulated = {}, {}
        for name in reference:
            tensor, _, which = name.partition("/")
            if which.isdigit():
                magnitudes[name] = terms[int(which)][tensor]
            else:  # a head gradient: the batches it spans, each backward after the first added into .grad
                spans = {"all": range(count), "accumulated": range(count - 1), "step": [count - 1]}[which]
                magnitudes[name] = sum(terms[k][tensor] for k in spans)
                accumulated[name] = len(spans) - 1
        problems = compare_identity(impl, sides, reference, case, ctx, magnitudes, accumulated=accumulated)
        what = {"interleaved": f"{count} forwards, then their backwards in another order",
                "steps": f"{count - 1} micro-batches, an optimizer step in place, one more batch"}[pattern]
        ctx.fail_if(problems, f"{what}, vs each batch alone")

    return check


# --- invariances ---------------------------------------------------------------------------------


def token_groups(case: Case, parts: int) -> list[torch.Tensor]:
    """A permutation of the flat token positions from the case's seed, cut into ``parts`` groups."""
    generator = torch.Generator().manual_seed(case.seed + 1)
    order = torch.randperm(case.num_tokens, generator=generator)
    if parts == 1:
        return [order]
    cut = 1 + int(torch.randint(0, case.num_tokens - 1, (1,), generator=generator))
    return [order[:cut], order[cut:]]


def _loss_on_tokens(impl: Implementation, inputs: Inputs, index: torch.Tensor, device: str):
    hidden = inputs.hidden.reshape(-1, inputs.hidden.shape[-1])[index.to(device)]
    labels = inputs.labels.reshape(-1)[index.to(device)]
    return impl.loss(hidden, inputs.weight, labels, inputs.spec, bias=inputs.bias)


def _gradients_of(inputs: Inputs, names) -> dict[str, torch.Tensor | None]:
    grads = {}
    for name in names:
        grad = getattr(inputs, name).grad
        grads[f"grad_{name}"] = None if grad is None else grad.double().cpu()
    return grads


def check_sum_split(impl: Implementation, case: Case, ctx: CheckContext) -> None:
    """With ``reduction="sum"`` the loss (and every gradient) of a batch is the sum over a split of it."""
    if case.reduction != "sum" or case.num_tokens < 2 or case.tied:
        raise HarnessError("the sum-split property needs an untied case with reduction=sum and N >= 2")

    def sides(which: Implementation) -> Sides:
        whole = run_implementation(which, case, device=ctx.device)
        inputs = make_inputs(case, device=ctx.device)
        total = torch.zeros((), dtype=torch.float64)
        for index in token_groups(case, 2):
            part = _loss_on_tokens(which, inputs, index, ctx.device).loss
            total = total + part.detach().double().cpu()
            if inputs.gradient_inputs:
                part.backward()
        split = {"loss": total, **_gradients_of(inputs, whole.grads)}
        return {name: (split[name], value) for name, value in whole.tensors().items() if name != "z_loss"}

    ref = run_reference(case)
    ctx.fail_if(compare_identity(impl, sides, ref.tensors(), case, ctx, ref.magnitudes),
                "sum over a split of the tokens vs the whole batch")


def check_permutation(impl: Implementation, case: Case, ctx: CheckContext) -> None:
    """Permuting the tokens permutes the ``none`` losses; the gradients are unchanged."""
    if case.reduction != "none" or case.tied:
        raise HarnessError("the permutation property needs an untied case with reduction=none")
    (order,) = token_groups(case, 1)

    def sides(which: Implementation) -> Sides:
        plain = run_implementation(which, case, device=ctx.device)
        inputs = make_inputs(case, device=ctx.device)
        permuted = _loss_on_tokens(which, inputs, order, ctx.device).loss
        if inputs.gradient_inputs:
            upstream = upstream_for(inputs, permuted.reshape(case.tokens)).reshape(-1)[order.to(ctx.device)]
            permuted.backward(upstream)
        moved = {"loss": permuted.detach().double().cpu(), **_gradients_of(inputs, plain.grads)}
        expected = {"loss": plain.loss.reshape(-1)[order], **_grad_tensors(plain)}
        return {name: (moved[name], expected[name]) for name in moved}

    ref = run_reference(case)
    reference = {"loss": ref.loss.reshape(-1)[order], **_grad_tensors(ref)}
    magnitudes = {**ref.magnitudes, "loss": ref.magnitudes["loss"].reshape(-1)[order]}
    ctx.fail_if(compare_identity(impl, sides, reference, case, ctx, magnitudes), "permuted tokens")


# --- the logits path ------------------------------------------------------------------------------


def kept_positions(case: Case) -> torch.Tensor:
    """Positions for ``logits_to_keep`` as a tensor, from the case's seed: ``keep`` of them (all T when
    0) in random order, ``(K,)`` for ``(N, D)`` inputs and one row per sequence, ``(B, K)``, for
    ``(B, T, D)``."""
    generator = torch.Generator().manual_seed(case.seed + 2)
    length = case.tokens[-1]
    count = case.keep or length
    if len(case.tokens) == 1:
        return torch.randperm(length, generator=generator)[:count]
    return torch.stack([torch.randperm(length, generator=generator)[:count] for _ in range(case.tokens[0])])


def check_logits(impl: Implementation, case: Case, ctx: CheckContext) -> None:
    """``logits(hidden, weight, bias=..., spec=..., logits_to_keep=k)``: the reference's logits of
    the last k positions (all when k = 0), in the shape ``hidden.shape[:-2] + (k, V)``; and the
    same for a tensor of positions in random order (see ``kept_positions``)."""
    inputs = make_inputs(case, device=ctx.device)
    reference_inputs = make_inputs(case, reference=True)
    positions = kept_positions(case)
    for keep in (case.keep, positions):

        def logits_of(which: Implementation) -> torch.Tensor:
            with torch.no_grad():
                return which.logits(inputs.hidden, inputs.weight, bias=inputs.bias, spec=inputs.spec,
                                    logits_to_keep=keep.to(ctx.device) if isinstance(keep, torch.Tensor) else keep)

        got = logits_of(impl)
        with torch.no_grad():
            expected = head_logits(reference_inputs.hidden, reference_inputs.weight, reference_inputs.bias,
                                   reference_inputs.spec, logits_to_keep=keep)
            _, terms = logit_terms(keep_positions(reference_inputs.hidden, keep), reference_inputs.weight,
                                   reference_inputs.bias, reference_inputs.spec, case.torch_dtype)
        what = f"logits_to_keep={keep}" if isinstance(keep, int) else f"logits_to_keep=positions {keep.tolist()}"
        if tuple(got.shape) != tuple(expected.shape):
            message = f"logits: shape {tuple(got.shape)}, expected {tuple(expected.shape)} for {what}"
            ctx.fail_if([Mismatch(ctx.property_id, case, "logits", message)])
        eager_errors = None if is_yardstick(impl) else [Error.between(logits_of(YARDSTICK).detach().cpu(), expected,
                                                                      terms)]
        problem = judge("logits", got.detach().cpu(), expected, terms, case, ctx, eager_errors, [got.dtype])
        if problem is not None:
            ctx.fail_if([problem], what)


# --- the list the gate runs ------------------------------------------------------------------------


@dataclass(frozen=True)
class Property:
    """One row of the gate's table: a check, and the cases Hypothesis draws for it.

    ``draw`` holds the keyword arguments of ``harness.check.strategies.cases``; ``share`` is the
    property's share of the implementation's time budget for drawn examples; ``needs_chunk_size``:
    not applicable to implementations without a chunk size; ``needs_logits``: not applicable to
    implementations without a logits path (plain-function plugins).
    """

    id: str
    check: Callable[[Implementation, Case, CheckContext], None]
    summary: str
    draw: dict
    share: float = 1.0
    needs_chunk_size: bool = False
    needs_logits: bool = False


ALL_DTYPES = ("float32", "bfloat16", "float16")
HALF_DTYPES = ("bfloat16", "float16")

PROPERTIES = (
    Property("equivalence/float32", check_equivalence, "loss, z-loss, gradients vs float64 reference in float32",
             {"dtypes": ("float32",)}),
    Property("equivalence/bfloat16", check_equivalence, "the same in bfloat16", {"dtypes": ("bfloat16",)}),
    Property("equivalence/float16", check_equivalence, "the same in float16", {"dtypes": ("float16",)}),
    Property("equivalence/large-vocab", check_equivalence, "the same with V >= 2^16 (N, D >= 64)",
             {"dtypes": ALL_DTYPES, "large_vocab": True}, share=0.3),
    Property("equivalence/model-sizes", check_equivalence,
             "the same past 2^16 tokens, and at real models' hidden sizes (2048-8192)",
             {"dtypes": ALL_DTYPES, "model_sizes": True}, share=0.3),
    Property("precision/at-scale", check_equivalence,
             "bfloat16/float16 with thousands of tokens: partial sums kept in the input dtype show",
             {"dtypes": HALF_DTYPES, "at_scale": True}, share=0.3),
    Property("autograd/grad-subsets", check_equivalence,
             "gradients reach exactly the inputs that require grad (frozen backbone, frozen head, ...)",
             {"dtypes": ALL_DTYPES, "tied": False, "grad_subsets": True}, share=0.5),
    Property("autograd/scaled-loss", check_grad_scaling,
             f"backward of {LOSS_SCALE} x loss scales every gradient by {LOSS_SCALE}",
             {"dtypes": ALL_DTYPES}, share=0.4),
    Property("autograd/retain-graph", check_retain_graph,
             "two backwards with retain_graph=True accumulate exactly twice the gradient",
             {"dtypes": ALL_DTYPES}, share=0.4),
    Property("autograd/no-grad", check_no_grad, "a forward under torch.no_grad() runs and gives the same loss",
             {"dtypes": ALL_DTYPES}, share=0.3),
    Property("autograd/inputs-unchanged", check_inputs_unchanged, "forward and backward do not modify inputs",
             {"dtypes": ALL_DTYPES}, share=0.3),
    Property("autograd/tied-weights", check_tied_weights,
             "a tied head weight gets the sum of the embedding's and the head's gradients",
             {"dtypes": ALL_DTYPES, "tied": True}, share=0.3),
    Property("autograd/interleaved", check_call_pattern("interleaved", 3),
             "three forwards on new values with one head, then their backwards in another order, give what each "
             "gives alone", {"dtypes": ALL_DTYPES, "tied": False}, share=0.3),
    Property("autograd/training-steps", check_call_pattern("steps", 3),
             "two micro-batches accumulate into .grad what each gives alone; after an optimizer step changes the "
             "head in place, a third batch gives what it gives alone", {"dtypes": ALL_DTYPES, "tied": False},
             share=0.3),
    Property("invariance/sum-split", check_sum_split, "with sum, the loss of a batch is the sum over a split of it",
             {"dtypes": ALL_DTYPES, "reductions": ("sum",), "tied": False, "min_tokens": 2}, share=0.3),
    Property("invariance/permutation", check_permutation, "permuting tokens permutes per-token losses",
             {"dtypes": ALL_DTYPES, "reductions": ("none",), "tied": False}, share=0.3),
    Property("invariance/chunk-size", check_chunk_size, "the result does not depend on the chunk size",
             {"dtypes": ALL_DTYPES, "chunked": True}, share=0.5, needs_chunk_size=True),
    Property("logits/keep-last", check_logits,
             "the generation path: logits of the last logits_to_keep positions, or of a tensor of positions, "
             "match the reference",
             {"dtypes": ALL_DTYPES, "logits": True, "tied": False}, share=0.2, needs_logits=True),
)

PROPERTY_IDS = tuple(p.id for p in PROPERTIES)


def find_property(property_id: str) -> Property:
    for prop in PROPERTIES:
        if prop.id == property_id:
            return prop
    raise HarnessError(f"unknown property {property_id!r}; expected one of {', '.join(PROPERTY_IDS)}")
