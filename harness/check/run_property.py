"""Run one property on one implementation and turn what happened into a result.

A property runs its explicit examples first (timed), then as many cases drawn by Hypothesis as
the profile's time budget allows at that speed (``harness.check.profiles``). Hypothesis shrinks a
failure to a minimal case and replays it last, so the last case run before the failure surfaces
is the one printed as the reproducer.

A case the implementation refuses at run time (``UnsupportedCase``, or an error matching one of
its known limitations exactly) is counted as *refused*, never as a pass: the result says how
many were, and why.
"""

from __future__ import annotations

import collections
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from hypothesis import given, reject, seed

from harness.adapter import Implementation
from harness.case import Case
from harness.check.examples import fitted_examples
from harness.check.evaluation import CheckFailure
from harness.check.profiles import Profile
from harness.check.properties import PROPERTIES, CaseRejected, CheckContext, ErrorRecord, Property
from harness.check.reproduce import Step, confirm, traceback_text
from harness.check.reproduce import command as replay_command
from harness.check.shared import SharedResults
from harness.check.strategies import cases, fit_to
from harness.check.support_probe import Support
from harness.errors import HarnessError, UnsupportedCase
from harness.isolation import is_fatal
from harness.known import KnownLimitation, Mismatch, on_device
from harness.registry import builtin_names

# Statuses of a property result (the "status" column of properties.csv).
PASS, FAIL, KNOWN_FAILURE, UNSUPPORTED, NOT_APPLICABLE = "pass", "fail", "known-failure", "unsupported", "n/a"

TOTAL_SHARE = sum(p.share for p in PROPERTIES)


@dataclass(frozen=True)
class Target:
    """An implementation and the name the user gave for it (which the reproducer repeats)."""

    given: str
    impl: Implementation


@dataclass(frozen=True)
class PropertyResult:
    implementation: str
    property: str
    status: str
    examples: int  # cases that ran to completion (refused ones not counted)
    detail: str
    reproducer: str
    seconds: float
    refused: int = 0  # cases the implementation refused at run time
    # Per (dtype, tensor): the candidate's worst error as a multiple of torch-eager's (norms).
    precision: list[dict] = field(default_factory=list)

    def row(self) -> dict:
        return {
            "implementation": self.implementation,
            "property": self.property,
            "status": self.status,
            "examples": self.examples,
            "refused": self.refused,
            "seconds": f"{self.seconds:.1f}",
            "detail": self.detail,
            "reproducer": self.reproducer,
        }

    def precision_rows(self) -> list[dict]:
        return [{"implementation": self.implementation, "property": self.property, **p} for p in self.precision]


def reproducer(given: str, property_id: str, case: Case, before: tuple[Step, ...] = ()) -> str:
    """The command that reruns one case of one property on the implementation named ``given`` (after
    the cases ``before`` it, when the failure needs them), as it runs in a new shell
    (``harness.check.reproduce``)."""
    return replay_command(given, property_id, [*before, Step(property_id, case)])


def describe_failure(exc: BaseException) -> str:
    """One line; for an error the implementation raised (not a mismatch), its traceback after it."""
    if isinstance(exc, CheckFailure):
        return " ".join(str(exc).split())
    line = f"raised {type(exc).__name__}: {exc}"
    if isinstance(exc, BaseExceptionGroup):  # Hypothesis's FlakyFailure: what the call that failed raised
        line += "".join(f"; its first call: {describe_failure(sub).splitlines()[0]}" for sub in exc.exceptions)
    return " ".join(line.split()) + "\n" + traceback_text(exc)


def cannot_run(target: Target, prop: Property, support: Support) -> tuple[str, str] | None:
    """(status, reason) when the property cannot run on this implementation here, else None."""
    if not support.available:
        return UNSUPPORTED, support.why_not.get("implementation", "not available")
    if prop.needs_chunk_size and target.impl.with_chunk_size(1) is None:
        return NOT_APPLICABLE, f"{target.impl.name} has no chunk size"
    if prop.needs_logits and not target.impl.has_logits_path:
        return NOT_APPLICABLE, f"{target.impl.name} has no logits path (a plain loss function)"
    for key, supported in (("dtypes", support.dtypes), ("reductions", support.reductions)):
        wanted = prop.draw.get(key)
        if wanted and not any(w in supported for w in wanted):
            return UNSUPPORTED, "; ".join(support.why_not.get(w, w) for w in wanted)
    return None


def _precision_summary(errors: list[ErrorRecord]) -> list[dict]:
    """Per (dtype, tensor): the worst share of the gate's allowance used (``budget_ratio``, with the
    case it came from) and the worst error as a multiple of torch-eager's (``ratio``)."""
    worst: dict[tuple[str, str], ErrorRecord] = {}
    worst_ratio: dict[tuple[str, str], float] = {}
    for record in errors:
        key = (record.dtype, record.tensor)
        if key not in worst or record.budget_ratio > worst[key].budget_ratio:
            worst[key] = record
        worst_ratio[key] = max(worst_ratio.get(key, 0.0), record.ratio)
    return [
        {"dtype": dtype, "tensor": tensor, "ratio": worst_ratio[(dtype, tensor)], "budget_ratio": record.budget_ratio,
         "error": record.error, "eager_error": record.eager_error, "case": str(record.case)}
        for (dtype, tensor), record in sorted(worst.items())
    ]


def known_issues(target: Target, device: str):
    """The known issues the gate excuses for this implementation: a built-in's own, on this device;
    none for a plugin (it cannot excuse its own failures)."""
    if target.impl.name not in builtin_names():
        return ()
    return on_device(target.impl.known_issues(device), device)


class _ContextLost(BaseException):
    """A fatal CUDA error (``harness.isolation.is_fatal``) in a drawn case. Not an ``Exception``, so
    that Hypothesis lets it through at once: shrinking, or any further case, would run on a context
    where everything now fails the same way."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


class _Run:
    """The bookkeeping of one property on one implementation: what ran, what was refused, and why."""

    def __init__(self, target: Target, prop: Property, device: str, on_case: Callable[[Case], None] | None,
                 history: list[Step] | None = None, shared: SharedResults = SharedResults()):
        self.target, self.prop, self.on_case, self.history = target, prop, on_case, history
        self.ctx = CheckContext(device=device, property_id=prop.id, known=known_issues(target, device),
                                shared=shared)
        self.limitations = tuple(k for k in self.ctx.known if isinstance(k, KnownLimitation))
        self.passed = 0
        self.refused: collections.Counter = collections.Counter()
        self.last_case: Case | None = None

    def check(self, case: Case) -> None:
        """Run one case; raises ``CheckFailure`` (or the implementation's error) when it fails."""
        self.last_case = case
        if self.history is not None:
            self.history.append(Step(self.prop.id, case))
        if self.on_case is not None:
            self.on_case(case)
        try:
            self.prop.check(self.target.impl, case, self.ctx)
        except UnsupportedCase as exc:
            self.refused[str(exc)] += 1
            return
        except CaseRejected as exc:
            self.refused[str(exc)] += 1
            raise
        except (CheckFailure, HarnessError):
            raise
        except Exception as exc:  # noqa: BLE001 - an error is a failure unless a known entry says so
            known = next((k for k in self.ctx.known_failures if k.explains_error(exc)), None)
            if known is not None:
                message = f"raised {type(exc).__name__}: {exc}"
                self.ctx.observed.append((known, Mismatch(self.prop.id, case, "error", message)))
                return
            limitation = next((k for k in self.limitations if k.matches(self.prop.id, exc)), None)
            if limitation is None:
                raise
            self.refused[f"{limitation.reason} ({type(exc).__name__})"] += 1
            return
        self.passed += 1

    def failure(self, exc: BaseException, case: Case) -> tuple[str, str]:
        """(detail, reproducer) of a failure on ``case``; with a history of this process's calls, the
        reproducer is the shortest replay that fails in a fresh process (``harness.check.reproduce``)."""
        detail = describe_failure(exc)
        if self.history is None:
            return detail, reproducer(self.target.given, self.prop.id, case)
        confirmed = confirm(self.target.given, self.prop.id, case, self.history[:-1])
        if confirmed.note:
            detail = f"{detail} [reproducer: {confirmed.note}]"
        return detail, reproducer(self.target.given, self.prop.id, case, tuple(confirmed.steps[:-1]))

    def refusals(self) -> str:
        return "; ".join(f"{count} x {reason}" for reason, count in self.refused.most_common())

    def result(self, status: str, detail: str, repro: str, started: float) -> PropertyResult:
        """The result of the cases run so far (``started``: when the property began)."""
        return PropertyResult(self.target.given, self.prop.id, status, self.passed, detail, repro,
                              time.perf_counter() - started, sum(self.refused.values()),
                              _precision_summary(self.ctx.errors))


def run_property(
    target: Target,
    prop: Property,
    support: Support,
    profile: Profile,
    device: str,
    on_case: Callable[[Case], None] | None = None,
    history: list[Step] | None = None,
    shared: SharedResults = SharedResults(),
) -> PropertyResult:
    """Check one property: its explicit examples, then drawn cases; never raises for what the
    implementation does. ``on_case`` is called with each case before it runs (the worker reports
    it, so that a crash names its case). ``history``: the cases run in this process so far, which
    this property's are appended to; given, a failure is confirmed in a fresh process. ``shared``:
    the reference and yardstick results the checks of other implementations saved."""
    started = time.perf_counter()
    run = _Run(target, prop, device, on_case, history, shared)

    def result(status: str, detail: str = "", repro: str = "") -> PropertyResult:
        if status == PASS and run.refused:
            detail = f"{sum(run.refused.values())} cases refused at run time ({run.refusals()})"
        return run.result(status, detail, repro, started)

    refused = cannot_run(target, prop, support)
    if refused is not None:
        return result(*refused)

    def fit(case: Case) -> Case | None:
        return fit_to(case, support)

    seconds = []
    for case in fitted_examples(prop.id, prop.draw.get("dtypes", ()), fit):
        case_started = time.perf_counter()
        try:
            run.check(case)
        except CaseRejected:
            continue
        except Exception as exc:  # noqa: BLE001 - every failure becomes a row with its reproducer
            return result(FAIL, *run.failure(exc, case))
        if not run.passed and any(getattr(known, "raises", None) for known, _ in run.ctx.observed):
            break  # a known failure that raises: every further case would raise it again
        seconds.append(time.perf_counter() - case_started)

    drawn = profile.drawn_examples(prop.share, TOTAL_SHARE, statistics.fmean(seconds) if seconds else None)
    if (run.refused or run.ctx.observed) and not run.passed:
        drawn = 0  # every explicit example was refused or failed as known: drawn cases would only repeat it

    # In a time-budgeted profile the budget is also a deadline: the speed of the explicit examples
    # is an estimate (torch.compile ran them from its cache and pays a compile per drawn case), so
    # past it the remaining drawn cases are skipped (the first ``min_drawn`` always run; once a case
    # has failed, shrinking it runs to the end). A fixed count has no deadline.
    allowed_s = profile.deadline_s(prop.share, TOTAL_SHARE)
    deadline = None if allowed_s is None else time.perf_counter() + allowed_s
    drawn_cases, failed = 0, False

    def body(case: Case) -> None:
        nonlocal drawn_cases, failed
        if (deadline is not None and not failed and drawn_cases >= profile.min_drawn
                and time.perf_counter() > deadline):
            return
        drawn_cases += 1
        try:
            run.check(case)
        except CaseRejected:
            reject()
        except BaseException as exc:
            failed = True
            if isinstance(exc, Exception) and is_fatal(str(exc)):
                raise _ContextLost(exc) from exc
            raise

    if drawn:
        if not profile.seeded:  # random draws: no other implementation's check meets the same case
            run.ctx.shared = SharedResults()
        test = given(case=cases(support, **prop.draw))(body)
        test = profile.hypothesis_settings(drawn)(test)
        property_seed = profile.seed_for(prop.id)
        if property_seed is not None:
            test = seed(property_seed)(test)
        try:
            test()
        except _ContextLost as lost:  # the case that caused it is the reproducer, not a shrunk one
            return result(FAIL, describe_failure(lost.error), reproducer(target.given, prop.id, run.last_case))
        except Exception as exc:  # noqa: BLE001
            if run.last_case is None:
                return result(FAIL, describe_failure(exc), "")
            return result(FAIL, *run.failure(exc, run.last_case))
    if run.passed == 0 and run.refused:
        return result(UNSUPPORTED, f"every case was refused at run time: {run.refusals()}")
    if run.ctx.observed:
        detail, case = _known_failure_detail(run.ctx)
        return result(KNOWN_FAILURE, detail, reproducer(target.given, prop.id, case))
    return result(PASS)


def _known_failure_detail(ctx: CheckContext) -> tuple[str, Case]:
    """(detail, case) for the known failures a run observed (its first case is the reproducer)."""
    _, first = ctx.observed[0]
    reasons = list(dict.fromkeys(k.reason for k, _ in ctx.observed))
    return f"{'; '.join(reasons)}. Seen: {first.message}", first.case


def check_case_fits(target: Target, prop: Property, case: Case) -> None:
    """Raise a one-line ``HarnessError`` when ``--case`` cannot be checked for this property."""
    if prop.needs_chunk_size and case.chunk is None:
        raise HarnessError(f"property {prop.id} needs chunk=... in --case")
    if case.chunk is not None and target.impl.with_chunk_size(case.chunk) is None:
        raise HarnessError(f"{target.impl.name} has no chunk size, but --case sets chunk={case.chunk}")
    if "reductions" in prop.draw and case.reduction not in prop.draw["reductions"]:
        raise HarnessError(f"property {prop.id} needs reduction={' or '.join(prop.draw['reductions'])} in --case")
    if prop.draw.get("min_tokens", 1) > case.num_tokens:
        raise HarnessError(f"property {prop.id} needs at least {prop.draw['min_tokens']} tokens in --case")
    if prop.draw.get("tied") is False and case.tied:
        raise HarnessError(f"property {prop.id} needs an untied case (tied=0)")
    if prop.needs_logits and not target.impl.has_logits_path:
        raise HarnessError(f"{target.impl.name} has no logits path for property {prop.id}")


def run_case(target: Target, prop: Property, case: Case, device: str) -> PropertyResult:
    """Check one property on one given case (the reproducer's ``--case``), without Hypothesis."""
    started = time.perf_counter()
    check_case_fits(target, prop, case)
    repro = reproducer(target.given, prop.id, case)
    run = _Run(target, prop, device, None)

    def result(status: str, detail: str = "") -> PropertyResult:
        return run.result(status, detail, repro, started)

    try:
        run.check(case)
    except CaseRejected as exc:
        raise HarnessError(f"this case cannot judge {target.impl.name}: {exc}") from None
    except HarnessError:
        raise
    except Exception as exc:  # noqa: BLE001
        return result(FAIL, describe_failure(exc))
    if run.refused:
        return result(UNSUPPORTED, run.refusals())
    if run.ctx.observed:
        return result(KNOWN_FAILURE, _known_failure_detail(run.ctx)[0])
    return result(PASS)

