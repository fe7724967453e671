"""Run one property on one implementation with Hypothesis, and turn what happened into a result.

Hypothesis draws cases (after the property's explicit examples), shrinks a failure to a minimal
case, and replays it last, so the last case run before the failure surfaces is the one printed
as the reproducer.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass

from hypothesis import Phase, Verbosity, example, given, reject, settings

from harness.adapter import Implementation
from harness.check.case import Case
from harness.check.known import known_failures, known_limitation
from harness.check.outcome import CheckFailure
from harness.check.properties import CaseRejected, CheckContext, Property, explicit_examples
from harness.check.strategies import cases, fit_to
from harness.check.support import Support
from harness.errors import HarnessError, UnsupportedCase

# Statuses of a property result (the "status" column of properties.csv).
PASS, FAIL, KNOWN_FAILURE, UNSUPPORTED, NOT_APPLICABLE = "pass", "fail", "known-failure", "unsupported", "n/a"


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
    examples: int  # cases that ran to completion (unsupported ones not counted)
    detail: str
    reproducer: str
    seconds: float

    def row(self) -> dict:
        return {
            "implementation": self.implementation,
            "property": self.property,
            "status": self.status,
            "examples": self.examples,
            "detail": self.detail,
            "reproducer": self.reproducer,
        }


def reproducer(given: str, property_id: str, case: Case) -> str:
    """The command that reruns one case of one property on the implementation named ``given``."""
    return f"python -m harness check --impl {shlex.quote(given)} --property {property_id} --case '{case}'"


def describe_failure(exc: BaseException) -> str:
    if isinstance(exc, CheckFailure):
        text = str(exc)
    else:
        text = f"raised {type(exc).__name__}: {exc}"
    return " ".join(text.split())


def _settings_for(prop: Property, profile: settings, *, shrink: bool) -> settings:
    phases = [p for p in profile.phases if shrink or p not in (Phase.shrink, Phase.explain)]
    examples = max(1, round(profile.max_examples * prop.share))
    return settings(profile, max_examples=examples, phases=phases, verbosity=Verbosity.quiet)


def cannot_run(target: Target, prop: Property, support: Support) -> tuple[str, str] | None:
    """(status, reason) when the property cannot run on this implementation here, else None."""
    if not support.available:
        return UNSUPPORTED, support.why_not.get("implementation", "not available")
    if prop.needs_chunk_size and target.impl.with_chunk_size(1) is None:
        return NOT_APPLICABLE, f"{target.impl.name} has no chunk size"
    for key, supported in (("dtypes", support.dtypes), ("reductions", support.reductions)):
        wanted = prop.draw.get(key)
        if wanted and not any(w in supported for w in wanted):
            return UNSUPPORTED, "; ".join(support.why_not.get(w, w) for w in wanted)
    return None


def _known_failure_detail(ctx: CheckContext) -> tuple[str, str]:
    """(detail, case) for the known failures a run observed (its first case is the reproducer)."""
    _, case, message = ctx.observed[0]
    reasons = list(dict.fromkeys(k.reason for k, _, _ in ctx.observed))
    return f"{'; '.join(reasons)}. Seen: {message}", case


def run_property(
    target: Target,
    prop: Property,
    support: Support,
    profile: settings,
    device: str,
    on_case: Callable[[Case], None] | None = None,
) -> PropertyResult:
    """Check one property with Hypothesis; never raises for what the implementation does.

    ``on_case`` is called with each case before it runs (the worker reports it, so that a crash
    names its case).
    """
    started = time.perf_counter()

    def result(status: str, examples: int, detail: str = "", repro: str = "") -> PropertyResult:
        return PropertyResult(target.given, prop.id, status, examples, detail, repro, time.perf_counter() - started)

    refused = cannot_run(target, prop, support)
    if refused is not None:
        return result(refused[0], 0, refused[1])

    ctx = CheckContext(device=device, property_id=prop.id, known_failures=known_failures(target.impl.name))
    limitation = known_limitation(target.impl.name, prop.id)
    passed, unsupported_reasons, last_case = [0], {}, [None]

    def body(case: Case) -> None:
        last_case[0] = case
        if on_case is not None:
            on_case(case)
        try:
            prop.check(target.impl, case, ctx)
        except UnsupportedCase as exc:
            unsupported_reasons[str(exc)] = unsupported_reasons.get(str(exc), 0) + 1
            return
        except CaseRejected:
            reject()
        passed[0] += 1

    test = given(case=cases(support, **prop.draw))(body)
    for explicit in reversed(explicit_examples(prop)):
        fitted = fit_to(explicit, support)
        if fitted is not None:
            test = example(case=fitted)(test)
    test = _settings_for(prop, profile, shrink=limitation is None)(test)
    try:
        test()
    except Exception as exc:  # noqa: BLE001 - every failure becomes a row with its reproducer
        case = last_case[0]
        repro = reproducer(target.given, prop.id, case) if case is not None else ""
        detail = describe_failure(exc)
        if limitation is not None and not isinstance(exc, CheckFailure):
            return result(UNSUPPORTED, passed[0], f"{limitation.reason}: {detail}", repro)
        return result(FAIL, passed[0], detail, repro)
    skipped = sum(unsupported_reasons.values())
    if passed[0] == 0 and skipped:
        return result(UNSUPPORTED, 0, "; ".join(unsupported_reasons))
    if ctx.observed:
        detail, case = _known_failure_detail(ctx)
        return result(KNOWN_FAILURE, passed[0], detail, reproducer(target.given, prop.id, case))
    detail = f"{skipped} drawn cases unsupported ({'; '.join(unsupported_reasons)})" if skipped else ""
    return result(PASS, passed[0], detail)


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


def run_case(target: Target, prop: Property, case: Case, device: str) -> PropertyResult:
    """Check one property on one given case (the reproducer's ``--case``), without Hypothesis."""
    started = time.perf_counter()
    check_case_fits(target, prop, case)
    repro = reproducer(target.given, prop.id, case)

    def result(status: str, examples: int, detail: str = "") -> PropertyResult:
        return PropertyResult(target.given, prop.id, status, examples, detail, repro, time.perf_counter() - started)

    ctx = CheckContext(device=device, property_id=prop.id, known_failures=known_failures(target.impl.name))
    limitation = known_limitation(target.impl.name, prop.id)
    try:
        prop.check(target.impl, case, ctx)
    except UnsupportedCase as exc:
        return result(UNSUPPORTED, 0, str(exc))
    except CaseRejected as exc:
        raise HarnessError(f"this case cannot judge {target.impl.name}: {exc}") from None
    except Exception as exc:  # noqa: BLE001
        detail = describe_failure(exc)
        if limitation is not None and not isinstance(exc, CheckFailure):
            return result(UNSUPPORTED, 0, f"{limitation.reason}: {detail}")
        return result(FAIL, 0, detail)
    if ctx.observed:
        return result(KNOWN_FAILURE, 1, _known_failure_detail(ctx)[0])
    return result(PASS, 1)
