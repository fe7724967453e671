"""The gate from Python: for a kernel author's own tests and scripts.

- ``check(implementation)`` runs the correctness gate (``python -m harness check``'s engine,
  ``harness.check.engine``) on one implementation and returns a ``CheckReport``;
- ``reference(hidden, weight, labels, ...)`` is the float64 reference loss and gradients, for
  assertions of one's own;
- ``cases(...)`` is the Hypothesis strategy of the cases the gate draws, and ``make_inputs(case)``
  their tensors.

This module imports neither Hypothesis nor the gate: ``check`` and ``cases`` import them when
called, so ``import harness`` stays as cheap as importing torch.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from harness.adapter import Implementation
from harness.case import Case, Inputs, parse_case
from harness.case import make_inputs as _case_inputs
from harness.errors import HarnessError
from harness.semantics import ReferenceResult, reference_result
from harness.spec import DTYPES, OPTIONS, REDUCTIONS, LossSpec, known_choices, validate_inputs

# Two of the statuses of ``harness.check.run_property`` (not imported: it imports Hypothesis).
PASS, FAIL = "pass", "fail"


@dataclass(frozen=True)
class WorstError:
    """A property's worst error on one tensor in one dtype, in the 2-norm, beside torch-eager's error
    on the same inputs (``ratio``: the first as a multiple of the second; 1 when both are exact)."""

    dtype: str
    tensor: str
    error: float
    torch_eager_error: float
    ratio: float
    case: str


@dataclass(frozen=True)
class PropertyReport:
    """One property on one implementation.

    ``status`` is ``"pass"``, ``"fail"``, ``"known-failure"`` (a built-in's listed failure, not
    counted), ``"unsupported"`` (the implementation cannot run its cases here) or ``"n/a"``;
    ``detail`` says why in one line, and ``traceback`` is the traceback of an error the
    implementation raised (or the end of the output of a process that died); ``reproducer`` is a
    command that reruns the failing case, as printed, in a new shell.
    """

    implementation: str
    property: str
    status: str
    cases_checked: int
    cases_refused: int  # cases the implementation refused at run time (UnsupportedCase)
    detail: str
    traceback: str
    reproducer: str
    seconds: float
    worst_errors: tuple[WorstError, ...]  # equivalence and precision properties

    @property
    def failed(self) -> bool:
        return self.status == FAIL

    def __str__(self) -> str:
        counts = f"{self.cases_checked} cases" + (f", {self.cases_refused} refused" if self.cases_refused else "")
        text = f"{self.property}: {self.status} ({counts})"
        return text + (f": {self.detail}" if self.detail and self.status != PASS else "")


@dataclass(frozen=True)
class CheckReport:
    """The gate's results on one implementation: one ``PropertyReport`` per property, in the gate's order.

    ``report["equivalence/float32"]`` is one property's; ``not_checked`` says, per dtype, reduction
    or option the implementation does not support here, why.
    """

    implementation: str
    profile: str
    device: str
    results: tuple[PropertyReport, ...]
    not_checked: dict[str, str]

    def __getitem__(self, property_id: str) -> PropertyReport:
        for result in self.results:
            if result.property == property_id:
                return result
        raise KeyError(f"{property_id!r} was not checked; checked: {', '.join(r.property for r in self.results)}")

    @property
    def failures(self) -> tuple[PropertyReport, ...]:
        return tuple(r for r in self.results if r.failed)

    @property
    def checked_anything(self) -> bool:
        """Whether any property ran a case to completion (an implementation that refuses everything did not)."""
        return any(r.cases_checked for r in self.results)

    @property
    def passed(self) -> bool:
        """No property failed, and at least one case was checked."""
        return not self.failures and self.checked_anything

    def raise_for_failures(self) -> None:
        """Raise ``AssertionError`` listing each failure with its reproducer (and traceback), or saying
        that nothing was checked; return quietly when the report ``passed``."""
        if self.passed:
            return
        if not self.failures:
            reasons = "; ".join(f"{r.property}: {r.detail}" for r in self.results)
            raise AssertionError(f"nothing was checked on {self.implementation}: {reasons}")
        lines = [f"{len(self.failures)} of {len(self.results)} properties failed on {self.implementation} "
                 f"(profile {self.profile}, {self.device}):"]
        for failure in self.failures:
            lines.append(f"- {failure.property}: {failure.detail}")
            if failure.reproducer:
                lines.append(f"  reproduce: {failure.reproducer}")
            if failure.traceback:
                lines.extend("    " + line for line in failure.traceback.splitlines())
        raise AssertionError("\n".join(lines))

    def __str__(self) -> str:
        lines = [f"{self.implementation} (profile {self.profile}, {self.device}):"]
        lines += [f"  {result}" for result in self.results]
        return "\n".join(lines)


def check(
    implementation: str | Callable | Implementation | type[Implementation],
    *,
    profile: str = "ci",
    properties: Iterable[str] | str | None = None,
    dtypes: Iterable[str] | str | None = None,
    max_examples: int | None = None,
    in_process: bool = False,
    timeout: float | None = None,
    max_memory: float | None = None,
    device: str | None = None,
) -> CheckReport:
    """Run the correctness gate on one implementation, as ``python -m harness check`` does.

    ``implementation`` is a built-in's name or ``"package.module:attr"``, a loss function with the
    plain-function contract (``fn(hidden, weight, labels, *, bias=None, ignore_index=-100,
    reduction="mean", ...) -> loss``, see ``harness.registry``), an ``Implementation`` (instance or
    class). Every property of the gate runs (or those in ``properties``, less those of dtypes not
    in ``dtypes``): its explicit examples, then the cases the ``profile`` draws ("ci": a fixed set,
    the same on every run; "dev", "thorough": more, random) or exactly ``max_examples`` drawn cases
    (0: the explicit examples only).

    The implementation runs in child processes: each property has a time limit (``timeout``
    seconds; default from the profile) and each process a memory limit (``max_memory`` GiB), and a
    crash fails only the property it happened in. So it must be importable by name there: a
    function or class defined at a module's top level, an ``Implementation`` bound to a top-level
    name of its class's module, or a built-in. ``in_process=True`` runs it here instead, whatever
    it is (a lambda, a closure): no isolation, no limits, for a debugger.

    Bad input (an unknown name, property or dtype) raises ``HarnessError``; what the implementation
    does never raises: it is in the report. ``report.raise_for_failures()`` turns it into an
    assertion.

    >>> import torch.nn.functional as F
    >>> from harness import check
    >>> def my_loss(hidden, weight, labels, *, bias=None, reduction="mean"):  # (N, D) or (B, T, D)
    ...     logits = F.linear(hidden, weight, bias).float().flatten(0, -2)
    ...     loss = F.cross_entropy(logits, labels.flatten(), reduction=reduction)
    ...     return loss.view(labels.shape) if reduction == "none" else loss
    >>> report = check(my_loss, properties=["equivalence/float32"], max_examples=0, in_process=True)
    >>> report.passed, report["equivalence/float32"].cases_checked > 20
    (True, True)
    >>> report.raise_for_failures()  # quiet: it passed
    """
    from harness.check.engine import GateSettings, check_dtypes, check_target, child_limits, selected_properties
    from harness.check.profiles import PROFILES
    from harness.environment import local_device

    if profile not in PROFILES:
        raise HarnessError(f"unknown profile {profile!r}; expected one of {', '.join(PROFILES)}")
    if max_examples is not None and max_examples < 0:
        raise HarnessError("max_examples must be 0 or more")
    chosen_dtypes = check_dtypes(dtypes)
    chosen = selected_properties(properties, chosen_dtypes)
    target = gate_target(implementation, isolated=not in_process)
    settings = GateSettings(
        profile=profile, max_examples=max_examples, device=device or local_device(), dtypes=chosen_dtypes,
        in_process=in_process, limits=child_limits(profile, max_examples, timeout_s=timeout, max_memory_gib=max_memory),
    )
    return collect_report(target.given, settings, check_target(target, [p.id for p in chosen], settings))


def collect_report(implementation: str, settings, stream) -> CheckReport:
    """A ``CheckReport`` from the results ``harness.check.engine.check_target`` yields."""
    from harness.check.engine import SupportResult
    from harness.check.run_property import PropertyResult

    results, not_checked = [], {}
    for item in stream:
        if isinstance(item, SupportResult):
            not_checked = dict(item.support.why_not)
        elif isinstance(item, PropertyResult):
            results.append(property_report(item))
    return CheckReport(implementation, settings.profile, settings.device, tuple(results), not_checked)


def property_report(result) -> PropertyReport:
    """The public form of a ``harness.check.run_property.PropertyResult``."""
    from harness.check.reproduce import split_detail

    summary, traceback = split_detail(result.detail)
    worst = tuple(WorstError(p["dtype"], p["tensor"], float(p["error"]), float(p["eager_error"]), float(p["ratio"]),
                             p["case"]) for p in result.precision)
    return PropertyReport(result.implementation, result.property, result.status, result.examples, result.refused,
                          summary, traceback, result.reproducer, result.seconds, worst)


def gate_target(implementation, *, isolated: bool):
    """The ``Target`` (name and implementation) of what ``check`` was given; ``HarnessError`` when a
    child process could not import it by name and ``isolated`` is asked for."""
    from harness.check.run_property import Target
    from harness.registry import FunctionImplementation, builtin_names, resolve

    if isinstance(implementation, str):
        return Target(implementation, resolve(implementation))
    name = importable_name(implementation)
    if isinstance(implementation, Implementation) and name is None and implementation.name in builtin_names():
        if type(resolve(implementation.name)) is type(implementation):
            name = implementation.name
    if isolated and name is None:
        raise HarnessError(
            f"{implementation!r} cannot be imported by name in a child process (define it at a module's top "
            "level, or give its name as 'package.module:attr'); or pass in_process=True (no crash isolation, "
            "no time or memory limit)")
    if isolated:
        return Target(name, resolve(name))
    if isinstance(implementation, Implementation):
        return Target(name or implementation.name, implementation)
    if inspect.isclass(implementation) and issubclass(implementation, Implementation):
        impl = implementation()
        return Target(name or impl.name, impl)
    if callable(implementation):
        given = name or getattr(implementation, "__qualname__", repr(implementation))
        return Target(given, FunctionImplementation(given, implementation))
    raise HarnessError(f"{implementation!r} is neither a name, a loss function nor an Implementation")


def importable_name(obj) -> str | None:
    """``"module:attr"`` when importing that gives back ``obj`` itself in a fresh process, else None."""
    holder = type(obj) if isinstance(obj, Implementation) else obj
    module_name = getattr(holder, "__module__", None)
    module = sys.modules.get(module_name or "")
    if module is None or module_name == "__main__":
        return None
    if isinstance(obj, Implementation):  # an instance: a top-level name of its class's module
        return next((f"{module_name}:{attr}" for attr, value in vars(module).items() if value is obj), None)
    qualname = getattr(obj, "__qualname__", "")
    if not qualname or "<" in qualname:  # <lambda>, <locals>
        return None
    found = module
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return f"{module_name}:{qualname}" if found is obj else None


def reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    spec: LossSpec | None = None,
    *,
    bias: torch.Tensor | None = None,
    grad_output: torch.Tensor | None = None,
    **options,
) -> ReferenceResult:
    """The float64 reference: the loss, z-loss and gradients the gate holds every implementation to.

    ``hidden`` is ``(N, D)`` or ``(B, T, D)``, ``weight`` ``(V, D)``, ``labels`` the leading shape
    of ``hidden``; the options are a ``LossSpec`` or its fields as keywords (``reduction="sum"``,
    ``softcap=30.0``, ...). The result's ``loss`` and ``z_loss`` are float64 on the CPU, and
    ``grad_hidden``, ``grad_weight``, ``grad_bias`` the gradients of ``(loss * grad_output).sum()``
    (``grad_output`` defaults to ones). The inputs are only read: any dtype, any device, with or
    without ``requires_grad``.

    >>> import torch
    >>> from harness import reference
    >>> hidden, weight = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(16, 8, dtype=torch.bfloat16)
    >>> labels = torch.tensor([1, 5, -100, 15])
    >>> ref = reference(hidden, weight, labels, label_smoothing=0.1)
    >>> ref.loss.dtype, tuple(ref.grad_hidden.shape), float(ref.grad_hidden[2].abs().sum())  # token 2 is ignored
    (torch.float64, (4, 8), 0.0)
    """
    if spec is not None and options:
        raise HarnessError("give the options as a LossSpec or as keywords, not both")
    if spec is None:
        try:
            spec = LossSpec(**options)
        except TypeError as exc:
            raise HarnessError(f"unknown loss option: {exc}") from None
    validate_inputs(hidden, weight, labels, spec, bias)
    return reference_result(hidden, weight, labels, spec, bias, grad_output=grad_output)


def cases(
    *,
    dtypes: Iterable[str] | None = None,
    reductions: Iterable[str] | None = None,
    options: Iterable[str] | None = None,
    **kinds,
):
    """The Hypothesis strategy of the ``Case``s the gate draws: shapes at and around block edges,
    primes, logits ordinary, large and past float32's ``exp`` range, ignored tokens, strided and tied
    inputs, and every combination of ``options``.

    ``dtypes`` (default: all three), ``reductions`` (default: all) and ``options`` (default: every
    option of ``harness.spec.OPTIONS``; ``[]`` for none) bound what is drawn; ``kinds`` are the
    keywords of ``harness.check.strategies.cases``: ``large_vocab=True`` (V >= 2^16),
    ``at_scale=True`` (thousands of tokens), ``tied=False``, ``grad_subsets=True``, ``flat=True``
    (2-D inputs only), ``min_tokens=N``. ``make_inputs(case)`` builds a case's tensors.

    >>> import torch, torch.nn.functional as F
    >>> from hypothesis import given, settings
    >>> from harness import cases, make_inputs, reference
    >>> @settings(max_examples=10, deadline=None)
    ... @given(cases(dtypes=["float32"], options=["bias", "label_smoothing"], tied=False))
    ... def test_my_loss_matches_the_reference(case):
    ...     i = make_inputs(case)
    ...     logits = F.linear(i.hidden, i.weight, i.bias).float().flatten(0, -2)
    ...     loss = F.cross_entropy(logits, i.labels.flatten(), reduction=i.spec.reduction,
    ...                            label_smoothing=i.spec.label_smoothing, ignore_index=i.spec.ignore_index)
    ...     expected = reference(i.hidden, i.weight, i.labels, i.spec, bias=i.bias).loss
    ...     torch.testing.assert_close(loss.double().flatten(), expected.flatten(), rtol=1e-4, atol=1e-4)
    >>> test_my_loss_matches_the_reference()
    """
    from harness.check.strategies import cases as gate_cases
    from harness.check.support_probe import Support

    chosen_dtypes = known_choices("dtype", dtypes, tuple(DTYPES))
    chosen_reductions = known_choices("reduction", reductions, REDUCTIONS)
    chosen_options = known_choices("option", options, OPTIONS, empty_allowed=True)
    support = Support(True, chosen_dtypes, chosen_reductions, frozenset(chosen_options))
    return gate_cases(support, dtypes=chosen_dtypes, reductions=chosen_reductions, **kinds)


def make_inputs(case: Case | str, *, device: str = "cpu") -> Inputs:
    """The tensors of a case (a ``Case``, or its one-line form from a reproducer), drawn from its seed.

    ``hidden``, ``weight``, ``bias``, ``labels`` (with the case's ignored tokens), ``spec`` (the
    ``LossSpec``, class weights and the head's norm included) and ``upstream`` (the gradient of
    per-token losses for ``reduction="none"``, else None); the tensors whose gradients the gate
    checks require grad. The same case line gives the same tensors on every machine.

    >>> from harness import make_inputs
    >>> i = make_inputs("N=7,D=5,V=257,dtype=bfloat16,reduction=sum,bias=1,seed=1")
    >>> tuple(i.hidden.shape), i.hidden.dtype, tuple(i.bias.shape), i.spec.reduction, i.hidden.requires_grad
    ((7, 5), torch.bfloat16, (257,), 'sum', True)
    """
    return _case_inputs(parse_case(case) if isinstance(case, str) else case, device=device)
