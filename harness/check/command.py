"""``python -m harness check``: the correctness gate.

Runs every property of ``harness.check.properties`` on the chosen implementations (default: every
built-in one available here): its explicit examples, then cases drawn by Hypothesis within the
profile's time budget. Then the behaviour matrix. While it runs, a terminal shows each
implementation's current property, how many cases it has started and for how long; each property
is printed as it finishes. Then: a pass/fail table, what was not checked (unsupported dtypes,
reductions and options; cases refused at run time), each implementation's error as a multiple of
torch-eager's, the matrix, and a reproducer per failure, a command that runs as printed in a new
shell. An error an implementation raised is recorded with its traceback (``--verbose`` and
``--in-process`` print it). Each implementation runs in child processes of its own (``--jobs`` at
a time, ``harness.check.engine``), so a crashing kernel fails only the property it crashed in.
Results go to a run folder ``results/<run-id>-check/`` (``properties.csv``, ``precision.csv``,
``not_checked.csv``, ``behaviour.csv``, ``meta.json``) as they are produced; ``--junit-xml PATH``
also writes one JUnit test case per implementation x property for CI systems.

Exit status: 0 when every property holds (known failures of built-ins excepted), 1 when one
fails, 2 for bad input, 130 when interrupted.

``--case`` reruns one case of a reproducer, without Hypothesis and without writing results.
"""

from __future__ import annotations

import argparse
import importlib.metadata
from contextlib import nullcontext
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from harness.check import tolerance
from harness.check.behaviour import EDGE_CASE_TIMEOUT_S, EDGE_CASES, BehaviourResult
from harness.check.engine import (
    GateSettings,
    Progress,
    SupportResult,
    check_dtypes,
    check_target,
    child_limits,
    property_row,
    selected_properties,
)
from harness.check.junit import write_junit
from harness.check.profiles import PROFILES, default_profile, get_profile
from harness.check.properties import PROPERTIES, PROPERTY_IDS, find_property
from harness.check.reproduce import parse_step, split_detail
from harness.check.run_property import (
    FAIL,
    KNOWN_FAILURE,
    NOT_APPLICABLE,
    PASS,
    UNSUPPORTED,
    PropertyResult,
    Target,
    run_case,
)
from harness.check.shared import new_folder as new_shared_folder
from harness.check.worker import SUPPORT_ITEM
from harness.console import terminal_console
from harness.environment import device_environment, host_environment, local_device
from harness.errors import HarnessError
from harness.isolation import MEMORY_LIMIT_FRACTION
from harness.registry import builtin_names, resolve
from harness.results import (
    BEHAVIOUR_COLUMNS,
    NOT_CHECKED_COLUMNS,
    PRECISION_COLUMNS,
    PROPERTY_COLUMNS,
    RESULTS_DIR,
    RowWriter,
    mark_run_finished,
    new_run_dir,
    write_json_atomic,
)
from harness.spec import DTYPES

STATUS_STYLE = {PASS: "green", FAIL: "bold red", KNOWN_FAILURE: "yellow", UNSUPPORTED: "dim", NOT_APPLICABLE: "dim"}

EXAMPLES = """\
examples:
  # every built-in available here, the ci profile (what CI runs)
  python -m harness check --profile ci
  # your kernel: a plain loss function or an Implementation, as package.module:attr
  python -m harness check --impl my_kernels.lce:linear_ce
  # a quick look: bfloat16 only, explicit examples only, with the traceback of any error it raises
  python -m harness check --impl my_kernels.lce:linear_ce --dtype bfloat16 --max-examples 0 --verbose
  # rerun one failing case (the reproducer a failure prints)
  python -m harness check --impl my_kernels.lce:linear_ce --property equivalence/float32 --case 'N=7,D=5,V=257,dtype=float32,reduction=mean,seed=1'
  # in CI: JUnit XML for the CI system's test report
  python -m harness check --profile ci --impl my_kernels.lce:linear_ce --junit-xml check.xml

exit status: 0 every property holds (known failures of built-ins excepted), 1 a property failed,
2 bad input (one line on stderr), 130 interrupted.
From Python, harness.check(); in pytest, the plugin's --lmhead-impl: see docs/kernel-authors.md.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--impl", action="append", metavar="NAME",
        help="built-in name or package.module:attr (repeatable; default: every available built-in)",
    )
    parser.add_argument(
        "--exclude", action="append", default=[], metavar="NAME",
        help="leave this built-in out of the default set (repeatable)",
    )
    parser.add_argument(
        "--property", action="append", metavar="ID", dest="properties",
        help=f"check only these properties (repeatable): {', '.join(PROPERTY_IDS)}",
    )
    parser.add_argument(
        "--dtype", action="append", metavar="NAME", dest="dtypes", choices=tuple(DTYPES),
        help=f"check only these dtypes (repeatable): {', '.join(DTYPES)}; properties of other dtypes are left out",
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
        "time or memory limit, and the traceback of every error printed (for a debugger, or a quick run of a plugin)",
    )
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="print the traceback of every error an implementation raised")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory (default: results/)")


def default_jobs() -> int:
    """Two implementations at a time on a CPU (compiling and Triton's interpreter each keep about
    one core busy); one on a GPU, so that no two implementations share its memory."""
    return 1 if torch.cuda.is_available() else min(2, os.cpu_count() or 1)


def choose_targets(names: list[str] | None, console: Console, excluded: list[str] = ()) -> list[Target]:
    """The implementations to check: as named, or every built-in available here but ``excluded``."""
    unknown = sorted(set(excluded) - set(builtin_names()))
    if unknown:
        raise HarnessError(f"--exclude takes built-in names; unknown: {', '.join(unknown)}")
    if names:
        if excluded:
            raise HarnessError("--exclude narrows the default set of built-ins; it cannot be combined with --impl")
        return [Target(name, resolve(name)) for name in dict.fromkeys(names)]
    targets = []
    for name in builtin_names():
        if name in excluded:
            console.print(f"[dim]skipping {escape(name)}: excluded[/dim]")
            continue
        impl = resolve(name)
        available = impl.availability()
        if available.available:
            targets.append(Target(name, impl))
        else:
            console.print(f"[dim]skipping {escape(name)}: {escape(available.detail)}[/dim]")
    return targets


def environment(device: str) -> dict:
    """Host, packages, git commit and device, as a sweep's meta.json records them, plus Hypothesis."""
    env = {**host_environment(), **device_environment(device)}
    env["packages"]["hypothesis"] = importlib.metadata.version("hypothesis")
    return env


# --- what is printed --------------------------------------------------------------------------------


def _status_text(result: PropertyResult) -> str:
    text = f"{result.status} ({result.examples})" if result.status in (PASS, KNOWN_FAILURE) else result.status
    if result.refused:
        text += f" [{result.refused} refused]"
    return text


def _status_cell(result: PropertyResult) -> str:
    """The status as rich markup (the text itself escaped: "[3 refused]" is no tag)."""
    style = STATUS_STYLE.get(result.status, "")
    text = escape(_status_text(result))
    return f"[{style}]{text}[/{style}]" if style else text


def column_groups(widths: list[int], first_width: int, total: int) -> list[list[int]]:
    """Split columns of ``widths`` (the first column, of ``first_width``, repeated in every group)
    into consecutive groups whose tables fit in ``total`` characters."""
    groups: list[list[int]] = []
    used = total
    for index, width in enumerate(widths):
        if not groups or used + width + 3 > total:
            groups.append([])
            used = first_width + 4
        groups[-1].append(index)
        used += width + 3
    return groups


def _print_grouped(console: Console, title: str, first: str, columns: list[str], rows: list[list[str]],
                   plain: list[list[str]], *, justify: str = "left") -> None:
    """A table with one column per entry of ``columns``, split into as many tables as the width needs
    (``plain``: the cells without markup, for their widths)."""
    def width(texts) -> int:
        return max((len(line) for text in texts for line in text.split("\n")), default=0)

    first_width = width([first, *(row[0] for row in plain)])
    widths = [width([columns[i], *(row[i + 1] for row in plain)]) for i in range(len(columns))]
    groups = column_groups(widths, first_width, console.width)
    if len(groups) > 1:  # one title above the parts: a part's own would wrap at its width
        console.print(f"[italic]{escape(title)}[/italic], in {len(groups)} parts:")
    for group in groups:
        table = Table(title=escape(title) if len(groups) == 1 else None)
        table.add_column(first)
        for i in group:
            table.add_column(escape(columns[i]), justify=justify, overflow="fold")
        for row in rows:
            table.add_row(row[0], *(row[i + 1] for i in group))
        console.print(table)


def print_property_table(console: Console, results: list[PropertyResult], names: list[str]) -> None:
    by_key = {(r.implementation, r.property): r for r in results}
    rows, plain = [], []
    for prop in PROPERTIES:
        if not any((name, prop.id) in by_key for name in names):
            continue
        chosen = [by_key.get((n, prop.id)) for n in names]
        rows.append([prop.id, *(_status_cell(r) if r else "" for r in chosen)])
        plain.append([prop.id, *(_status_text(r) if r else "" for r in chosen)])
    _print_grouped(console, "Properties (cases that ran; [cases refused at run time])", "property", names, rows, plain)


def print_details(console: Console, results: list[PropertyResult], *, tracebacks: bool = False) -> None:
    """Each failure, known failure and unsupported property with its reason and reproducer; with
    ``tracebacks``, the traceback of an error an implementation raised."""
    for status, title in ((FAIL, "Failures"), (KNOWN_FAILURE, "Known failures (not counted)"), (UNSUPPORTED, "Unsupported")):
        chosen = [r for r in results if r.status == status]
        if not chosen:
            continue
        console.print(f"\n[bold]{title}[/bold]")
        for r in chosen:
            summary, traceback = split_detail(r.detail)
            console.print(f"- {r.implementation} {r.property}: {summary}", soft_wrap=True, markup=False)
            if traceback and tracebacks:
                console.print(_indented(traceback), soft_wrap=True, markup=False, highlight=False)
            if r.reproducer and status != UNSUPPORTED:
                console.print(f"  reproduce: {r.reproducer}", soft_wrap=True, markup=False)
    if not tracebacks and any(split_detail(r.detail)[1] for r in results if r.status == FAIL):
        console.print("  (--verbose prints the traceback of each error; the results' properties.csv holds them)",
                      markup=False)


def _indented(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def print_behaviour_table(console: Console, rows: list[BehaviourResult], names: list[str]) -> None:
    by_key = {(r.implementation, r.edge_case): r.behaviour for r in rows}
    cells = [[f"{edge.id}\n{edge.summary}", *(by_key.get((n, edge.id), "") for n in names)] for edge in EDGE_CASES]
    marked = [[f"{escape(edge.id)}\n[dim]{escape(edge.summary)}[/dim]", *(escape(c) for c in row[1:])]
              for edge, row in zip(EDGE_CASES, cells)]
    plain = [[edge.id, *row[1:]] for edge, row in zip(EDGE_CASES, cells)]
    _print_grouped(console, "Behaviour on edge cases (recorded, not judged)", "edge case", names, marked, plain)


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
    plain = []
    for name in names:
        cells = [f"{worst[(name, d, t)]:.2f}" if (name, d, t) in worst else "" for d, t in columns]
        if any(cells):
            plain.append([name, *cells])
    rows = [[escape(row[0]), *row[1:]] for row in plain]
    _print_grouped(console, "Error as a multiple of torch-eager's on the same inputs (worst case, norm)",
                   "implementation", [f"{d}\n{t}" for d, t in columns], rows, plain, justify="right")


class LiveProgress:
    """What each running implementation is doing: its item, the cases it started, for how long.

    Rendered by ``rich.live.Live`` from its own thread while the main thread updates it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[str, tuple[str, int, float]] = {}  # implementation -> (item, cases, since)

    def update(self, progress: Progress) -> None:
        with self._lock:
            item, cases, since = self._rows.get(progress.implementation, ("", 0, time.monotonic()))
            if progress.item != item:
                item, cases, since = progress.item, 0, time.monotonic()
            if progress.case:
                cases += 1
            self._rows[progress.implementation] = (item, cases, since)

    def finish(self, implementation: str) -> None:
        with self._lock:
            self._rows.pop(implementation, None)

    def __rich__(self) -> Table:
        table = Table.grid(padding=(0, 2))
        now = time.monotonic()
        with self._lock:
            rows = list(self._rows.items())
        for implementation, (item, cases, since) in rows:
            doing = "probing what it supports" if item == SUPPORT_ITEM else item or "starting"
            started = f"case {cases}" if cases else ""
            table.add_row(f"[cyan]{escape(implementation)}[/cyan]", escape(doing), started, f"{now - since:5.0f} s")
        return table


# --- running -----------------------------------------------------------------------------------------


def run_one_case(args: argparse.Namespace, console: Console) -> int:
    """``--case``: one case under each chosen property, or a sequence of them under one, in order."""
    if not args.impl:
        raise HarnessError("--case needs --impl (the implementation to rerun it on)")
    props = selected_properties(args.properties)
    if len(args.case) > 1 and len(props) != 1:
        raise HarnessError("a sequence of --case needs exactly one --property (the one its last case is judged by)")
    steps = [parse_step(text, props[0].id if len(props) == 1 else None) for text in args.case]
    results = []
    for target in choose_targets(args.impl, console):
        for prop in props:
            for step in steps:
                result = run_case(target, find_property(step.property_id or prop.id), step.case, local_device())
                results.append(result)
                console.print(f"{escape(result.implementation)}  {result.property}  {_status_cell(result)}  "
                              f"{result.seconds:.1f} s")
    print_details(console, results, tracebacks=True)
    return 1 if any(r.status == FAIL for r in results) else 0


@dataclass(frozen=True)
class _Finished:
    """The end of one implementation's stream of results."""

    implementation: str


def run(args: argparse.Namespace, console: Console | None = None) -> int:
    console = console or terminal_console()
    if args.max_examples is not None and args.max_examples < 0:
        raise HarnessError("--max-examples must be 0 or more")
    if args.jobs is not None and args.jobs < 1:
        raise HarnessError("--jobs must be at least 1")
    if args.case:
        return run_one_case(args, console)
    dtypes = check_dtypes(args.dtypes)
    props = selected_properties(args.properties, dtypes)
    targets = choose_targets(args.impl, console, args.exclude)
    if not targets:
        raise HarnessError("no implementation to check: none of the built-ins is available here")
    profile_name = args.profile or default_profile()
    profile = get_profile(profile_name, args.max_examples)
    device = local_device()
    jobs = 1 if args.in_process else min(args.jobs or default_jobs(), len(targets))
    # Several implementations share the reference and the yardstick of each case (harness.check.shared).
    shared = new_shared_folder() if len(targets) > 1 else None
    settings = GateSettings(
        profile=profile_name, max_examples=args.max_examples, device=device, dtypes=dtypes,
        in_process=args.in_process, threads=max(1, (os.cpu_count() or 1) // jobs),
        limits=child_limits(profile_name, args.max_examples, timeout_s=args.timeout,
                            max_memory_gib=args.max_memory, jobs=jobs),
        shared_folder=shared and shared.name,
    )

    run_dir = new_run_dir(args.out, "-check")
    meta = {
        "kind": "check",
        "run_id": run_dir.name,
        "profile": profile_name,
        "budget_s": profile.budget_s,
        "time_limit_s": settings.limits.properties.timeout_s,
        "max_examples": args.max_examples,
        "implementations": [t.given for t in targets],
        "properties": [p.id for p in props],
        "dtypes": list(dtypes) if dtypes else None,
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
        f"{'in this process' if args.in_process else f'{jobs} at a time'} -> {run_dir}",
        markup=False,
    )

    results: list[PropertyResult] = []
    behaviour: list[BehaviourResult] = []
    supports: list[SupportResult] = []
    produced: queue.Queue = queue.Queue()
    cancel = threading.Event()  # set when this thread stops early (Ctrl-C): the children are killed
    live = LiveProgress()

    def pipeline(target: Target) -> None:
        wants_behaviour = not args.no_behaviour and target.impl.availability().available
        try:
            for item in check_target(target, [p.id for p in props], settings, behaviour=wants_behaviour,
                                     cancel=cancel, on_progress=produced.put):
                produced.put(item)
        finally:
            produced.put(_Finished(target.given))

    try:
        with Live(live, console=console, transient=True, refresh_per_second=2) if console.is_terminal else nullcontext(), \
                ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(pipeline, target) for target in targets]
            finished = 0
            try:
                while finished < len(targets):
                    item = produced.get()
                    if isinstance(item, _Finished):
                        finished += 1
                        live.finish(item.implementation)
                    elif isinstance(item, Progress):
                        live.update(item)
                    elif isinstance(item, PropertyResult):
                        property_rows.append([property_row(item)])
                        precision_rows.append(item.precision_rows())
                        results.append(item)
                        console.print(f"{escape(item.implementation):<20} {item.property:<28} {item.seconds:6.1f} s  "
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
        if shared is not None:
            shared.cleanup()
        if args.junit_xml is not None:
            write_junit(args.junit_xml, results, suite=f"lmhead-bench check ({profile_name}, {device})")

    mark_run_finished(run_dir)  # a report attaches a finished check run before an interrupted one
    names = [t.given for t in targets]
    order = {p.id: i for i, p in enumerate(PROPERTIES)}
    results.sort(key=lambda r: (names.index(r.implementation), order[r.property]))
    console.print()
    print_property_table(console, results, names)
    print_precision(console, results, names)
    if behaviour:
        print_behaviour_table(console, behaviour, names)
    print_not_checked(console, results, supports)
    print_details(console, results, tracebacks=args.verbose or args.in_process)
    failed = [r for r in results if r.status == FAIL]
    console.print(f"\nresults: {run_dir}", markup=False)
    if args.junit_xml is not None:
        console.print(f"JUnit XML: {args.junit_xml}", markup=False)
    console.print(f"[bold red]{len(failed)} properties failed[/bold red]" if failed else "[green]all properties hold[/green]")
    return 1 if failed else 0
