"""``python -m harness check``: the correctness gate.

Runs every property of ``harness.check.properties`` with Hypothesis on the chosen
implementations (default: every built-in one available here), then the behaviour matrix, and
prints a pass/fail table, the matrix, and a one-line reproducer per failure. Results go to a run
folder ``results/<run-id>-check/`` (``properties.csv``, ``behaviour.csv``, ``meta.json``) as they
are produced. Exit status 1 when a property fails (known failures excepted), 2 for bad input.

``--case`` reruns one case of a reproducer, without Hypothesis and without writing results.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from harness.check.behaviour import EDGE_CASES, BehaviourResult, run_behaviour
from harness.check.case import parse_case
from harness.check.gate import FAIL, KNOWN_FAILURE, PASS, UNSUPPORTED, PropertyResult, Target, run_case, run_property
from harness.check.profiles import CI_EXAMPLES, PROFILES, THOROUGH_EXAMPLES, default_profile, profile_settings
from harness.check.properties import PROPERTIES, PROPERTY_IDS, find_property
from harness.check.support import discover_support
from harness.check import tolerance
from harness.errors import HarnessError
from harness.registry import builtin_names, resolve
from harness.results import BEHAVIOUR_COLUMNS, PROPERTY_COLUMNS, RESULTS_DIR, RowWriter, new_run_id, write_json_atomic

STATUS_STYLE = {PASS: "green", FAIL: "bold red", KNOWN_FAILURE: "yellow", UNSUPPORTED: "dim", "n/a": "dim"}
PACKAGES = ("torch", "triton", "liger-kernel", "cut-cross-entropy", "hypothesis")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--impl", action="append", metavar="NAME",
        help="built-in name or package.module:attr (repeatable; default: every available built-in)",
    )
    parser.add_argument(
        "--property", action="append", metavar="ID", dest="properties",
        help=f"check only these properties (repeatable): {', '.join(PROPERTY_IDS)}",
    )
    parser.add_argument("--case", metavar="CASE", help="rerun one case, e.g. 'N=7,D=5,V=257,dtype=bfloat16,seed=1'")
    parser.add_argument(
        "--profile", choices=PROFILES, default=None,
        help=f"Hypothesis profile: ci (derandomised, {CI_EXAMPLES} examples per property, default when CI is set), "
        f"dev (the same budget, random; default otherwise), thorough ({THOROUGH_EXAMPLES} examples, random)",
    )
    parser.add_argument("--max-examples", type=int, metavar="N", help="override the profile's examples per property")
    parser.add_argument("--no-behaviour", action="store_true", help="skip the behaviour matrix")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory (default: results/)")


def local_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


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


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, check=True).stdout
        return commit + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: str) -> dict:
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "device_type": device,
        "cpu_count": os.cpu_count(),
        "host": platform.node(),
        "python": platform.python_version(),
        "versions": {package: _version(package) for package in PACKAGES},
        "time": dt.datetime.now().isoformat(timespec="seconds"),
        "command": "python -m harness " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "git_commit": _git_commit(),
    }


def new_run_dir(out: Path) -> Path:
    base = f"{new_run_id()}-check"
    run_dir, n = out / base, 1
    while run_dir.exists():
        n += 1
        run_dir = out / f"{base}-{n}"
    run_dir.mkdir(parents=True)
    return run_dir


def _status_cell(result: PropertyResult) -> str:
    style = STATUS_STYLE.get(result.status, "")
    text = f"{result.status} ({result.examples})" if result.status in (PASS, KNOWN_FAILURE) else result.status
    return f"[{style}]{text}[/{style}]" if style else text


def print_property_table(console: Console, results: list[PropertyResult], names: list[str]) -> None:
    table = Table(title="Properties (examples that ran)", show_lines=False)
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
    case = parse_case(args.case)
    if not args.impl:
        raise HarnessError("--case needs --impl (the implementation to rerun it on)")
    props = _selected_properties(args.properties)
    results = []
    for target in choose_targets(args.impl, console):
        for prop in props:
            result = run_case(target, prop, case, local_device())
            results.append(result)
            console.print(f"{result.implementation}  {prop.id}  {_status_cell(result)}  {result.seconds:.1f} s")
    print_details(console, results)
    return 1 if any(r.status == FAIL for r in results) else 0


def run(args: argparse.Namespace) -> int:
    console = Console(width=200)
    if args.max_examples is not None and args.max_examples < 1:
        raise HarnessError("--max-examples must be at least 1")
    if args.case:
        return run_one_case(args, console)
    props = _selected_properties(args.properties)
    targets = choose_targets(args.impl, console)
    if not targets:
        raise HarnessError("no implementation to check: none of the built-ins is available here")
    profile_name = args.profile or default_profile()
    profile = profile_settings(profile_name)
    if args.max_examples is not None:
        profile = type(profile)(profile, max_examples=args.max_examples)
    device = local_device()

    run_dir = new_run_dir(args.out)
    meta = {
        "kind": "check",
        "run_id": run_dir.name,
        "profile": profile_name,
        "max_examples": profile.max_examples,
        "implementations": [t.given for t in targets],
        "properties": [p.id for p in props],
        "tolerance": {
            "multiple": tolerance.MULTIPLE,
            "floor_ulps": tolerance.FLOOR_ULPS,
            "yardstick_floors": tolerance.YARDSTICK_FLOORS,
        },
        **environment(device),
    }
    write_json_atomic(run_dir / "meta.json", meta)
    property_rows = RowWriter(run_dir / "properties.csv", PROPERTY_COLUMNS)
    behaviour_rows = RowWriter(run_dir / "behaviour.csv", BEHAVIOUR_COLUMNS)
    console.print(f"checking {', '.join(t.given for t in targets)} on {device}, profile {profile_name} -> {run_dir}")

    results: list[PropertyResult] = []
    for target in targets:
        support = discover_support(target.impl, device)
        for prop in props:
            with console.status(f"{target.given}: {prop.id}"):
                result = run_property(target, prop, support, profile, device)
            property_rows.append([result.row()])
            results.append(result)
            console.print(f"{target.given:<20} {prop.id:<28} {result.seconds:6.1f} s  {_status_cell(result)}")

    behaviour: list[BehaviourResult] = []
    if not args.no_behaviour:
        for target in targets:
            if not target.impl.availability().available:
                continue
            with console.status(f"{target.given}: behaviour matrix"):
                for row in run_behaviour(target.given, device):
                    behaviour_rows.append([row.row()])
                    behaviour.append(row)

    names = [t.given for t in targets]
    console.print()
    print_property_table(console, results, names)
    if behaviour:
        print_behaviour_table(console, behaviour, names)
    print_details(console, results)
    failed = [r for r in results if r.status == FAIL]
    console.print(f"\nresults: {run_dir}")
    console.print(f"[bold red]{len(failed)} properties failed[/bold red]" if failed else "[green]all properties hold[/green]")
    return 1 if failed else 0
