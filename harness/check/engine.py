"""One implementation through the gate: the code path that ``python -m harness check``,
``harness.check()`` and the pytest plugin (``harness.pytest_plugin``) share.

``check_target`` yields what the implementation supports here, then one ``PropertyResult`` per
property as each finishes, then (if asked) its behaviour on the edge cases. By default everything
runs in child processes (``harness.isolation``, ``harness.check.worker``): each property has a time
limit and each process a memory limit, and a crash, a timeout or an oom fails only the property
that was running, with the case it was running as the reproducer and the end of the process's
output (a crash's Python stack) as its traceback. ``in_process`` runs everything in this process
instead, for a debugger: no isolation, no limits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from harness.case import parse_case
from harness.check.behaviour import EDGE_CASE_TIMEOUT_S, EDGE_CASES, BehaviourResult, probe, run_behaviour
from harness.check.profiles import get_profile
from harness.check.properties import PROPERTIES, Property, find_property
from harness.check.reproduce import split_detail
from harness.check.run_property import FAIL, PropertyResult, Target, reproducer, run_property
from harness.check.shared import SharedResults
from harness.check.support_probe import Support, discover_support
from harness.check.worker import SUPPORT_ITEM
from harness.environment import memory_bytes
from harness.errors import HarnessError
from harness.isolation import MEMORY_LIMIT_FRACTION, Limits, child_environment, run_items
from harness.spec import DTYPES, known_choices

LOG_LINES_KEPT = 60  # of a child's output, kept as the traceback of the property it died in


@dataclass(frozen=True)
class SupportResult:
    """What one implementation supports here, as its worker found it."""

    implementation: str
    support: Support

    def not_checked_rows(self) -> list[dict]:
        return [{"implementation": self.implementation, "what": what, "reason": reason}
                for what, reason in self.support.why_not.items()]


@dataclass(frozen=True)
class Progress:
    """An implementation has started an item (a property, or ``support``), or a case of it."""

    implementation: str
    item: str
    case: str = ""  # the case about to run; "" when the item starts


@dataclass(frozen=True)
class ChildLimits:
    """The limits of the child processes: per property, and per behaviour edge case."""

    properties: Limits
    edge_cases: Limits


@dataclass(frozen=True)
class GateSettings:
    """How the gate runs: profile, device, which dtypes, and in which processes."""

    profile: str = "ci"
    max_examples: int | None = None  # exactly this many drawn cases per property (None: the profile's budget)
    device: str = "cpu"
    dtypes: tuple[str, ...] | None = None  # check only these (None: every dtype)
    in_process: bool = False
    limits: ChildLimits = field(default_factory=lambda: ChildLimits(Limits(), Limits()))
    threads: int | None = None  # OMP_NUM_THREADS of each child (None: torch's default)
    shared_folder: str | None = None  # where the checks of several implementations share results (None: nowhere)


def child_limits(profile: str, max_examples: int | None, *, timeout_s: float | None = None,
                 max_memory_gib: float | None = None, jobs: int = 1) -> ChildLimits:
    """The time and memory limits (``--timeout``, ``--max-memory``), or their defaults: the profile's
    time limit per property, and a share of the memory available now among ``jobs`` processes."""
    if timeout_s is not None and timeout_s <= 0:
        raise HarnessError("--timeout must be > 0 seconds")
    if max_memory_gib is not None and max_memory_gib < 0:
        raise HarnessError("--max-memory must be >= 0 GiB (0: no limit)")
    if max_memory_gib is None:
        available = memory_bytes("MemAvailable")
        memory = int(available * MEMORY_LIMIT_FRACTION / jobs) if available else None
    else:
        memory = int(max_memory_gib * 2**30) or None
    return ChildLimits(
        properties=Limits(timeout_s or get_profile(profile, max_examples).time_limit_s(), memory),
        edge_cases=Limits(timeout_s or EDGE_CASE_TIMEOUT_S, memory),
    )


def check_dtypes(dtypes) -> tuple[str, ...] | None:
    """``dtypes`` as a tuple of known names (None stays None); ``HarnessError`` for an unknown one."""
    return None if dtypes is None else known_choices("dtype", dtypes, tuple(DTYPES))


def selected_properties(ids=None, dtypes: tuple[str, ...] | None = None) -> list[Property]:
    """The properties named (every one when None), less those that draw none of ``dtypes``."""
    if isinstance(ids, str):
        ids = [ids]
    chosen = [find_property(i) for i in dict.fromkeys(ids)] if ids else list(PROPERTIES)
    if dtypes is not None:
        chosen = [p for p in chosen if set(p.draw.get("dtypes", dtypes)) & set(dtypes)]
    if not chosen:
        raise HarnessError(f"none of the properties asked for draws the dtypes asked for ({', '.join(dtypes or ())})")
    return chosen


def restricted_support(support: Support, dtypes: tuple[str, ...] | None) -> Support:
    """``support`` with only ``dtypes`` left (the others are "not asked for")."""
    if dtypes is None or not support.available:
        return support
    why_not = dict(support.why_not)
    for dtype in support.dtypes:
        if dtype not in dtypes:
            why_not[dtype] = f"{dtype} not asked for (dtypes: {', '.join(dtypes)})"
    return replace(support, dtypes=tuple(d for d in support.dtypes if d in dtypes), why_not=why_not)


def check_target(
    target: Target, property_ids: list[str], settings: GateSettings, *, behaviour: bool = False,
    cancel: threading.Event | None = None, on_progress: Callable[[Progress], None] | None = None,
) -> Iterator[PropertyResult | BehaviourResult | SupportResult]:
    """One implementation's results as they are produced: what it supports, its properties in the
    order given, then (``behaviour``) its behaviour matrix. ``on_progress`` hears each item and case
    as it starts; ``cancel``, once set, stops the children."""
    if settings.in_process:
        yield from _in_process(target, property_ids, settings, behaviour, on_progress)
    else:
        yield from _in_children(target, property_ids, settings, behaviour, cancel, on_progress)


def _in_process(target, property_ids, settings, behaviour, on_progress):
    def tell(item: str, case: str = "") -> None:
        if on_progress is not None:
            on_progress(Progress(target.given, item, case))

    profile = get_profile(settings.profile, settings.max_examples)
    tell(SUPPORT_ITEM)
    support = restricted_support(discover_support(target.impl, settings.device), settings.dtypes)
    yield SupportResult(target.given, support)
    history = []  # every case run for this implementation: a failure's reproducer may need the ones before it
    shared = SharedResults(settings.shared_folder and Path(settings.shared_folder))
    for property_id in property_ids:
        tell(property_id)
        yield run_property(target, find_property(property_id), support, profile, settings.device,
                           on_case=lambda case, item=property_id: tell(item, str(case)), history=history,
                           shared=shared)
    if behaviour:
        for edge in EDGE_CASES:
            yield BehaviourResult(target.given, edge.id, *probe(target.impl, edge, settings.device))


def _in_children(target, property_ids, settings, behaviour, cancel, on_progress):
    given = target.given
    args = ["--impl", given, "--profile", settings.profile, "--device", settings.device]
    if settings.max_examples is not None:
        args += ["--max-examples", str(settings.max_examples)]
    for dtype in settings.dtypes or ():
        args += ["--dtype", dtype]
    if settings.shared_folder:
        args += ["--shared-results", settings.shared_folder]
    started: dict[str, float] = {}  # when each item started, for the seconds of one that took its process down
    running = ""

    def heard(message: dict) -> None:
        nonlocal running
        if "started" in message:
            running = message["started"]
            started[running] = time.perf_counter()
        if on_progress is not None:
            on_progress(Progress(given, running, message.get("case", "")))

    env = child_environment(threads=settings.threads)
    items = [SUPPORT_ITEM, *property_ids]
    for outcome in run_items("harness.check.worker", args, items, limits=settings.limits.properties, env=env,
                             cancel=cancel, on_message=heard):
        if outcome.item == SUPPORT_ITEM:
            if outcome.record is not None:
                yield SupportResult(given, Support.from_json(outcome.record["support"]))
            continue
        if outcome.record is not None:
            yield PropertyResult(**{k: v for k, v in outcome.record.items() if k != "item"})
            continue
        repro = reproducer(given, outcome.item, parse_case(outcome.last_case)) if outcome.last_case else ""
        detail = f"{outcome.failure}: {outcome.detail}"
        log = "\n".join(outcome.log_tail.strip("\n").splitlines()[-LOG_LINES_KEPT:])
        if log:
            detail += f"\nthe end of the process's output:\n{log}"
        seconds = time.perf_counter() - started.get(outcome.item, time.perf_counter())
        yield PropertyResult(given, outcome.item, FAIL, 0, detail, repro, seconds)
    if behaviour and not (cancel is not None and cancel.is_set()):
        yield from run_behaviour(given, settings.device, limits=settings.limits.edge_cases, env=env, cancel=cancel)


def property_row(result: PropertyResult) -> dict:
    """The row of ``properties.csv``: the one-line detail, and the traceback in a column of its own."""
    summary, traceback = split_detail(result.detail)
    return {**result.row(), "detail": summary, "traceback": traceback}
