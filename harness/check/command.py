"""``python -m harness check``: the correctness gate.

Runs every property of ``harness.check.properties`` on the chosen implementations (default: every
built-in one available here): its explicit examples, then cases drawn by Hypothesis within the
profile's time budget. Then the behaviour matrix. Prints a pass/fail table, what was not checked
(unsupported dtypes, reductions and options; cases refused at run time), each implementation's
error as a multiple of torch-eager's, the matrix, and a one-line reproducer per failure. Each
implementation runs in child processes of its own (``--jobs`` at a time), so a crashing kernel
fails only the property it crashed in. Results go to a run folder ``results/<run-id>-check/``
(``properties.csv``, ``precision.csv``, ``not_checked.csv``, ``behaviour.csv``, ``meta.json``) as
they are produced; ``--junit-xml PATH`` also writes one JUnit test case per implementation x
property for CI systems. Exit status 1 when a property fails (known failures excepted), 2 for
bad input.

Each property on an implementation has a time limit (derived from the profile, or ``--timeout``),
and each child process a memory limit (``--max-memory``): a hang or a runaway allocation fails
that property as a timeout or oom (``harness.isolation``). A worker that meets an error after which
its CUDA context is unusable (illegal memory access, device-side assert) reports it and stops; the
remaining properties run in a fresh process.

``--case`` reruns one case of a reproducer, without Hypothesis and without writing results.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from harness.case import parse_case
from harness.check.replay import parse_step
from harness.check.behaviour import EDGE_CASE_TIMEOUT_S, EDGE_CASES, BehaviourResult, probe, run_behaviour
from harness.check.run_property import (
    FAIL,
    KNOWN_FAILURE,
    NOT_APPLICABLE,
    PASS,
    UNSUPPORTED,
    PropertyResult,
    Target,
    reproducer,
    run_case,
    run_property,
)
from harness.check import tolerance
from harness.check.junit import write_junit
from harness.check.profiles import PROFILES, default_profile, get_profile
from harness.check.properties import PROPERTIES, PROPERTY_IDS, find_property
from harness.check.support_probe import Support, discover_support
from harness.check.worker import SUPPORT_ITEM
from harness.errors import HarnessError
from harness.environment import local_device
from harness.isolation import MEMORY_LIMIT_FRACTION, Limits, child_environment, run_items
from harness.registry import builtin_names, resolve
from harness.results import (
    BEHAVIOUR_COLUMNS,
    NOT_CHECKED_COLUMNS,
    PRECISION_COLUMNS,
    PROPERTY_COLUMNS,
    RESULTS_DIR,
    RowWriter,
    new_run_dir,
    write_json_atomic,
)
from harness.environment import device_environment, host_environment, memory_bytes

STATUS_STYLE = {PASS: "green", FAIL: "bold red", KNOWN_FAILURE: "yellow", UNSUPPORTED: "dim", NOT_APPLICABLE: "dim"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--impl", action="append", metavar="NAME",
        help="built-in name or package.module:attr (repeatable; default: every available built-in)",
    )
    parser.add_argument(
        "--property", action="append", metavar="ID", dest="properties",
        help=f"check only these properties (repeatable): {', '.join(PROPERTY_IDS)}",
    )
    parser.add_argument("--case", metavar="CASE", action="append",
                        help="rerun one case, e.g. 'N=7,D=5,V=257,dtype=bfloat16,seed=1'; repeated: run the cases in "
                        "order in one process (PROPERTY@CASE runs one under another property), a reproducer of a "
                        "failure that depends on earlier calls")
    parser.add_argument(
        "--profile", choices=PROFILES, default=None,
        help="how many cases to draw besides every property's explicit examples: ci (a fixed, seeded count per "
        "property: the same cases on every run and machine; default when CI is set), dev (300 s of random "
        "cases per implementation; default otherwise), thorough (1800 s, random)",
    )
    parser.add_argument("--max-examples", type=int, metavar="N",
                        help="draw exactly N cases per property instead of the profile's time budget "
                        "(0: the explicit examples only)")
    parser.add_argument("--junit-xml", type=Path, metavar="PATH",
                        help="also write the results as JUnit XML (one test case per implementation x property)")
    parser.add_argument("--no-behaviour", action="store_true", help="skip the behaviour matrix")
    parser.add_argument(
        "--jobs", type=int, metavar="N",
        help="implementations checked at the same time, each in its own process (default: 2, or 1 on a GPU)",
    )
    parser.add_argument(
        "--timeout", type=float, metavar="SECONDS",
        help="time limit of each property on each implementation, and of each behaviour edge case, after "
        "which it fails as a timeout and the rest go on in a fresh process (default: derived from the "
        "profile: 5 min plus 10 s a drawn case, or twice its time budget; edge cases: "
        f"{EDGE_CASE_TIMEOUT_S} s)",
    )
    parser.add_argument(
        "--max-memory", type=float, metavar="GIB",
        help="stop a process that holds more resident host memory than this, failing its property as oom "
        f"(default: {MEMORY_LIMIT_FRACTION * 100:.0f}%% of the memory available at start, shared among --jobs; 0: no limit)",
    )
    parser.add_argument(
        "--in-process", action="store_true",
        help="run everything in this process, one implementation after another: no crash isolation, no "
        "time or memory limit (for a debugger, or a quick run of a plugin)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory (default: results/)")


def default_jobs() -> int:
    """Two implementations at a time on a CPU (compiling and Triton's interpreter each keep about
    one core busy); one on a GPU, so that no two implementations share its memory."""
    return 1 if torch.cuda.is_available() else min(2, os.cpu_count() or 1)


def choose_targets(names: list[str] | None, console: Console) -> list[Target]:
    """The implementations to check: as named, or every built-in available here."""
    if names:
        return [Target(name, resolve(name)) for name in dict.fromkeys(names)]
    targets = []
    for name in builtin_names():
        impl = resolve(name)
        available = impl.availability()
        if available.available:
            targets.append(Target(name, impl))
        else:
            console.print(f"[dim]skipping {name}: {available.detail}[/dim]")
    return targets


def environment(device: str) -> dict:
    """Host, packages, git commit and device, as a sweep's meta.json records them, plus Hypothesis."""
    env = {**host_environment(), **device_environment(device)}
    env["packages"]["hypothesis"] = importlib.metadata.version("hypothesis")
    return env


def _status_cell(result: PropertyResult) -> str:
    style = STATUS_STYLE.get(result.status, "")
    text = f"{result.status} ({result.examples})" if result.status in (PASS, KNOWN_FAILURE) else result.status
    if result.refused:
        text += f" [{result.refused} refused]"
    return f"[{style}]{text}[/{style}]" if style else text


def print_property_table(console: Console, results: list[PropertyResult], names: list[str]) -> None:
    table = Table(title="Properties (cases that ran; [cases refused at run time])", show_lines=False)
    table.add_column("property")
    for name in names:
        table.add_column(name, overflow="fold")
    by_key = {(r.implementation, r.property): r for r in results}
    for prop in PROPERTIES:
        if not any((name, prop.id) in by_key for name in names):
            continue
        cells = [_status_cell(by_key[(n, prop.id)]) if (n, prop.id) in by_key else "" for n in names]
        table.add_row(prop.id, *cells)
    console.print(table)


def print_details(console: Console, results: list[PropertyResult]) -> None:
    for status, title in ((FAIL, "Failures"), (KNOWN_FAILURE, "Known failures (not counted)"), (UNSUPPORTED, "Unsupported")):
        chosen = [r for r in results if r.status == status]
        if not chosen:
            continue
        console.print(f"\n[bold]{title}[/bold]")
        for r in chosen:
            console.print(f"- {r.implementation} {r.property}: {r.detail}", soft_wrap=True, markup=False)
            if r.reproducer and status != UNSUPPORTED:
                console.print(f"  reproduce: {r.reproducer}", soft_wrap=True, markup=False)


def print_behaviour_table(console: Console, rows: list[BehaviourResult], names: list[str]) -> None:
    table = Table(title="Behaviour on edge cases (recorded, not judged)", show_lines=True)
    table.add_column("edge case")
    for name in names:
        table.add_column(name, overflow="fold")
    by_key = {(r.implementation, r.edge_case): r.behaviour for r in rows}
    for edge in EDGE_CASES:
        table.add_row(f"{edge.id}\n[dim]{edge.summary}[/dim]", *[by_key.get((n, edge.id), "") for n in names])
    console.print(table)


def _selected_properties(ids: list[str] | None):
    return [find_property(i) for i in dict.fromkeys(ids)] if ids else list(PROPERTIES)


def run_one_case(args: argparse.Namespace, console: Console) -> int:
    """``--case``: one case under each chosen property, or a sequence of them under one, in order."""
    if not args.impl:
        raise HarnessError("--case needs --impl (the implementation to rerun it on)")
    props = _selected_properties(args.properties)
    if len(args.case) > 1 and len(props) != 1:
        raise HarnessError("a sequence of --case needs exactly one --property (the one its last case is judged by)")
    steps = [parse_step(text, props[0].id if len(props) == 1 else None) for text in args.case]
    results = []
    for target in choose_targets(args.impl, console):
        for prop in props:
            for step in steps:
                result = run_case(target, find_property(step.property_id or prop.id), step.case, local_device())
                results.append(result)
                console.print(f"{result.implementation}  {result.property}  {_status_cell(result)}  "
                              f"{result.seconds:.1f} s")
    print_details(console, results)
    return 1 if any(r.status == FAIL for r in results) else 0


@dataclass(frozen=True)
class SupportResult:
    """What one implementation supports here, as its worker found it."""

    implementation: str
    support: Support

    def not_checked_rows(self) -> list[dict]:
        return [{"implementation": self.implementation, "what": what, "reason": reason}
                for what, reason in self.support.why_not.items()]


def check_in_process(
    target: Target, property_ids: list[str], *, profile: str, max_examples: int | None, device: str, behaviour: bool,
) -> Iterator[PropertyResult | BehaviourResult | SupportResult]:
    """``check_implementation`` without child processes (``--in-process``)."""
    chosen = get_profile(profile, max_examples)
    support = discover_support(target.impl, device)
    yield SupportResult(target.given, support)
    history = []  # every case run for this implementation: a failure's reproducer may need the ones before it
    for property_id in property_ids:
        yield run_property(target, find_property(property_id), support, chosen, device, history=history)
    if behaviour:
        for edge in EDGE_CASES:
            yield BehaviourResult(target.given, edge.id, *probe(target.impl, edge, device))


@dataclass(frozen=True)
class ChildLimits:
    """The limits of ``check``'s child processes: per property, and per behaviour edge case."""

    properties: Limits
    edge_cases: Limits


def check_implementation(
    given: str, property_ids: list[str], *, profile: str, max_examples: int | None, device: str,
    threads: int, behaviour: bool, limits: ChildLimits, cancel: threading.Event | None = None,
) -> Iterator[PropertyResult | BehaviourResult | SupportResult]:
    """One implementation's results as they are produced: what it supports, its properties, then
    its behaviour matrix.

    Both run in child processes (``harness.isolation``); a crash, a timeout or an oom fails only
    the property that was running, with the case it was running as the reproducer.
    """
    args = ["--impl", given, "--profile", profile, "--device", device]
    if max_examples is not None:
        args += ["--max-examples", str(max_examples)]
    items = [SUPPORT_ITEM, *property_ids]
    env = child_environment(threads=threads)
    for outcome in run_items("harness.check.worker", args, items, limits=limits.properties, env=env, cancel=cancel):
        if outcome.item == SUPPORT_ITEM:
            if outcome.record is not None:
                yield SupportResult(given, Support.from_json(outcome.record["support"]))
            continue
        if outcome.record is not None:
            yield PropertyResult(**{k: v for k, v in outcome.record.items() if k != "item"})
            continue
        repro = ""
        if outcome.last_case:
            repro = reproducer(given, outcome.item, parse_case(outcome.last_case))
        yield PropertyResult(given, outcome.item, FAIL, 0, f"{outcome.failure}: {outcome.detail}", repro, 0.0)
    if behaviour and not (cancel is not None and cancel.is_set()):
        yield from run_behaviour(given, device, limits=limits.edge_cases, env=env, cancel=cancel)


def child_limits(args: argparse.Namespace, profile_time_limit_s: float, jobs: int) -> ChildLimits:
    """``--timeout`` and ``--max-memory``, or their defaults."""
    if args.timeout is not None and args.timeout <= 0:
        raise HarnessError("--timeout must be > 0 seconds")
    if args.max_memory is not None and args.max_memory < 0:
        raise HarnessError("--max-memory must be >= 0 GiB (0: no limit)")
    if args.max_memory is None:
        available = memory_bytes("MemAvailable")
        memory = int(available * MEMORY_LIMIT_FRACTION / jobs) if available else None
    else:
        memory = int(args.max_memory * 2**30) or None
    return ChildLimits(
        properties=Limits(args.timeout or profile_time_limit_s, memory),
        edge_cases=Limits(args.timeout or EDGE_CASE_TIMEOUT_S, memory),
    )


def print_not_checked(console: Console, results: list[PropertyResult], supports: list[SupportResult]) -> None:
    """Per implementation: what it does not support here, and the cases it refused at run time."""
    lines = []
    for entry in supports:
        if not entry.support.available:
            continue
        declared = [f"{what} ({reason})" for what, reason in entry.support.why_not.items()]
        refused = [f"{r.property}: {r.refused}" for r in results if r.implementation == entry.implementation
                   and r.refused]
        if declared or refused:
            text = f"- {entry.implementation}: unsupported here: {'; '.join(declared) or 'nothing'}"
            text += f"; cases refused at run time: {', '.join(refused) or 'none'}"
            lines.append(text)
    if lines:
        console.print("\n[bold]Not checked[/bold]")
        for line in lines:
            console.print(line, soft_wrap=True, markup=False)


def print_precision(console: Console, results: list[PropertyResult], names: list[str]) -> None:
    """Each implementation's worst error as a multiple of torch-eager's, per dtype and tensor, over the
    equivalence and precision properties."""
    worst: dict[tuple[str, str, str], float] = {}
    for r in results:
        for p in r.precision:
            key = (r.implementation, p["dtype"], p["tensor"])
            worst[key] = max(worst.get(key, 0.0), float(p["ratio"]))
    if not worst:
        return
    columns = sorted({(dtype, tensor) for _, dtype, tensor in worst})
    table = Table(title="Error as a multiple of torch-eager's on the same inputs (worst case, norm)")
    table.add_column("implementation")
    for dtype, tensor in columns:
        table.add_column(f"{dtype}\n{tensor}", justify="right")
    for name in names:
        cells = [f"{worst[(name, d, t)]:.2f}" if (name, d, t) in worst else "" for d, t in columns]
        if any(cells):
            table.add_row(name, *cells)
    console.print(table)


def run(args: argparse.Namespace) -> int:
    console = Console(width=200)
    if args.max_examples is not None and args.max_examples < 0:
        raise HarnessError("--max-examples must be 0 or more")
    if args.jobs is not None and args.jobs < 1:
        raise HarnessError("--jobs must be at least 1")
    if args.case:
        return run_one_case(args, console)
    props = _selected_properties(args.properties)
    targets = choose_targets(args.impl, console)
    if not targets:
        raise HarnessError("no implementation to check: none of the built-ins is available here")
    profile_name = args.profile or default_profile()
    profile = get_profile(profile_name, args.max_examples)
    device = local_device()
    jobs = 1 if args.in_process else min(args.jobs or default_jobs(), len(targets))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    limits = child_limits(args, profile.time_limit_s(), jobs)

    run_dir = new_run_dir(args.out, "-check")
    meta = {
        "kind": "check",
        "run_id": run_dir.name,
        "profile": profile_name,
        "budget_s": profile.budget_s,
        "time_limit_s": limits.properties.timeout_s,
        "max_examples": args.max_examples,
        "implementations": [t.given for t in targets],
        "properties": [p.id for p in props],
        "tolerance": {
            "budget": tolerance.BUDGET,
            "spread": tolerance.SPREAD,
            "norm_multiple": tolerance.NORM_MULTIPLE,
            "norm_min_elements": tolerance.NORM_MIN_ELEMENTS,
            "sum_order": tolerance.SUM_ORDER,
        },
        **environment(device),
    }
    write_json_atomic(run_dir / "meta.json", meta)
    property_rows = RowWriter(run_dir / "properties.csv", PROPERTY_COLUMNS)
    precision_rows = RowWriter(run_dir / "precision.csv", PRECISION_COLUMNS)
    not_checked_rows = RowWriter(run_dir / "not_checked.csv", NOT_CHECKED_COLUMNS)
    behaviour_rows = RowWriter(run_dir / "behaviour.csv", BEHAVIOUR_COLUMNS)
    budget = profile.describe()
    console.print(
        f"checking {', '.join(t.given for t in targets)} on {device}, profile {profile_name} "
        f"(explicit examples + {budget}), "
        f"{'in this process' if args.in_process else f'{jobs} at a time'} -> {run_dir}"
    )

    results: list[PropertyResult] = []
    behaviour: list[BehaviourResult] = []
    supports: list[SupportResult] = []
    produced: queue.Queue = queue.Queue()
    cancel = threading.Event()  # set when this thread stops early (Ctrl-C): the children are killed

    def pipeline(target: Target) -> None:
        behaviour = not args.no_behaviour and target.impl.availability().available
        options = dict(profile=profile_name, max_examples=args.max_examples, device=device, behaviour=behaviour)
        property_ids = [p.id for p in props]
        try:
            if args.in_process:
                items = check_in_process(target, property_ids, **options)
            else:
                items = check_implementation(target.given, property_ids, threads=threads, limits=limits,
                                             cancel=cancel, **options)
            for item in items:
                produced.put(item)
        finally:
            produced.put(None)

    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(pipeline, target) for target in targets]
            finished = 0
            try:
                while finished < len(targets):
                    item = produced.get()
                    if item is None:
                        finished += 1
                    elif isinstance(item, PropertyResult):
                        property_rows.append([item.row()])
                        precision_rows.append(item.precision_rows())
                        results.append(item)
                        console.print(f"{item.implementation:<20} {item.property:<28} {item.seconds:6.1f} s  "
                                      f"{_status_cell(item)}")
                    elif isinstance(item, SupportResult):
                        not_checked_rows.append(item.not_checked_rows())
                        supports.append(item)
                    else:
                        behaviour_rows.append([item.row()])
                        behaviour.append(item)
            except BaseException:
                # The children have sessions of their own, so a Ctrl-C does not reach them: stop them
                # here, or the pool would wait for every remaining property to finish.
                cancel.set()
                raise
            for future in futures:
                future.result()  # a harness bug in a pipeline surfaces here instead of being lost
    finally:
        if args.junit_xml is not None:
            write_junit(args.junit_xml, results, suite=f"lmhead-bench check ({profile_name}, {device})")

    names = [t.given for t in targets]
    order = {p.id: i for i, p in enumerate(PROPERTIES)}
    results.sort(key=lambda r: (names.index(r.implementation), order[r.property]))
    console.print()
    print_property_table(console, results, names)
    print_precision(console, results, names)
    if behaviour:
        print_behaviour_table(console, behaviour, names)
    print_not_checked(console, results, supports)
    print_details(console, results)
    failed = [r for r in results if r.status == FAIL]
    console.print(f"\nresults: {run_dir}")
    if args.junit_xml is not None:
        console.print(f"JUnit XML: {args.junit_xml}")
    console.print(f"[bold red]{len(failed)} properties failed[/bold red]" if failed else "[green]all properties hold[/green]")
    return 1 if failed else 0
