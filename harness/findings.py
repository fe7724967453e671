"""The findings page, ``docs/findings.md``, rendered from the known issues the adapters declare.

Each built-in adapter lists what is wrong with the package it wraps (``Implementation.known_issues``,
``harness.known``); those entries are what the gate found about the peers. The page lists each entry
once, with every implementation that declares it, its package, what is wrong, the exact signature
the gate excuses, a reproducer and its status. It is generated so that it cannot drift from the
entries: ``tests/test_docs.py`` fails when they disagree, and ``python -m harness.findings``
rewrites it.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.adapter import Implementation
from harness.known import KnownFailure, KnownImprecision, KnownIssue, KnownLimitation, on_device

DEVICES = ("cpu", "cuda")
DEVICE_NAMES = {"cpu": "CPU", "cuda": "CUDA"}
PAGE = Path(__file__).resolve().parent.parent / "docs" / "findings.md"
REGENERATE = "python -m harness.findings"

KIND_NAMES = {
    KnownFailure: "Known failure",
    KnownImprecision: "Known imprecision",
    KnownLimitation: "Known limitation",
}
KIND_MEANINGS = {
    KnownFailure: "the gate shows `known-failure` for a mismatch of exactly this signature; any other still fails",
    KnownImprecision: "an error up to this bound is shown as `known-failure`; anything beyond fails",
    KnownLimitation: "a case that raises this error is counted as refused, not failed; any other error fails",
}


@dataclass(frozen=True)
class Finding:
    """One known-issue entry, with the built-ins that declare it and the devices where it shows."""

    entry: KnownIssue
    implementations: tuple[str, ...]
    devices: tuple[str, ...]

    @property
    def kind(self) -> str:
        return KIND_NAMES[type(self.entry)]

    @property
    def property_id(self) -> str:
        return example_of(self.entry)[0]

    def reproducers(self) -> list[str]:
        """One ``check`` command per implementation, rerunning the entry's example as printed."""
        property_id, case = example_of(self.entry)
        return [f"python -m harness check --impl {name} --property {property_id} --case '{case}'"
                for name in self.implementations]


def example_of(entry: KnownIssue) -> tuple[str, str]:
    """(property, case) that shows the entry: its ``example``, or a limitation's first property and case."""
    if isinstance(entry, KnownLimitation):
        return entry.properties[0], entry.case
    property_id, _, case = entry.example.partition(": ")
    return property_id, case


def signature_of(entry: KnownIssue) -> str:
    """What the gate excuses, in words: the entry's signature; for a limitation, the error it refuses."""
    if isinstance(entry, KnownLimitation):
        return (f"raises `{entry.error_type}` with a message containing `{entry.message}`, on "
                f"{_code_list(entry.properties)}")
    if isinstance(entry, KnownImprecision) and entry.properties:
        return f"{entry.signature}, on {_code_list(entry.properties)}"
    return entry.signature


def short_signature(entry: KnownIssue) -> str:
    """The signature in a table cell: a limitation's error without its list of properties."""
    if isinstance(entry, KnownLimitation):
        return f"refused: `{entry.error_type}` with `{entry.message}`"
    return entry.signature


def status_of(entry: KnownIssue) -> str:
    """Open, or fixed in a later version where the entry records one (a ``fixed_in`` field)."""
    fixed_in = getattr(entry, "fixed_in", None)
    return f"fixed in {fixed_in}" if fixed_in else "open"


def collect(implementations: Sequence[Implementation]) -> list[Finding]:
    """Every entry the implementations declare on any device, once, in the order they declare them."""
    entries: list[KnownIssue] = []
    names: list[list[str]] = []
    devices: list[list[str]] = []
    for impl in implementations:
        for device in DEVICES:
            for entry in on_device(impl.known_issues(device), device):
                if entry not in entries:
                    entries.append(entry)
                    names.append([])
                    devices.append([])
                i = entries.index(entry)
                if impl.name not in names[i]:
                    names[i].append(impl.name)
                if device not in devices[i]:
                    devices[i].append(device)
    return [Finding(e, tuple(n), tuple(d)) for e, n, d in zip(entries, names, devices)]


def by_package(findings: Sequence[Finding]) -> dict[str, list[Finding]]:
    """The findings grouped by the package at fault, packages in the order they first appear."""
    groups: dict[str, list[Finding]] = {}
    for finding in findings:
        groups.setdefault(finding.entry.package, []).append(finding)
    return groups


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces to ``-``."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def render(findings: Sequence[Finding]) -> str:
    """The Markdown of the findings page."""
    groups = by_package(findings)
    numbered = {id(f): i for i, f in enumerate((f for group in groups.values() for f in group), start=1)}
    lines = [
        "# What the gate found",
        "",
        "<!-- Generated by `" + REGENERATE + "` from each adapter's `known_issues()` "
        "(harness/known.py); do not edit by hand: tests/test_docs.py fails when this page and the entries disagree. -->",
        "",
        "Each entry below is declared beside the adapter of the package at fault",
        "([`implementations/`](../implementations/)). The gate excuses exactly its signature, on built-in",
        "implementations only, and the test suite expects exactly its status on its example, so a fix",
        "or a new bug shows up. How the entries were found, and what else the gate saw that is within",
        "its tolerance or no entry at all: [findings-notes.md](findings-notes.md). How to read a",
        "signature: [gate.md](gate.md#known-issues-of-peer-packages).",
        "",
        "| # | package | what the gate excuses | implementations | shows on | status |",
        "|---|---|---|---|---|---|",
    ]
    headings = {}
    for group in groups.values():
        for finding in group:
            number = numbered[id(finding)]
            headings[id(finding)] = f"{number}. {finding.kind} in `{finding.property_id}`"
            lines.append(f"| [{number}](#{anchor(headings[id(finding)])}) | {finding.entry.package} | "
                         f"{short_signature(finding.entry)} | {_code_list(finding.implementations)} | "
                         f"{_devices(finding.devices)} | {status_of(finding.entry)} |")
    for package, group in groups.items():
        lines += ["", f"## {package}"]
        for finding in group:
            lines += ["", f"### {headings[id(finding)]}", "", *_entry_lines(finding)]
    return "\n".join(lines) + "\n"


def _entry_lines(finding: Finding) -> list[str]:
    entry = finding.entry
    return [
        f"- **Implementations**: {_code_list(finding.implementations)}",
        f"- **Package**: {entry.package}",
        f"- **Shows on**: {_devices(finding.devices)}",
        f"- **What is wrong**: {entry.reason}",
        f"- **Signature allowed**: {signature_of(entry)} ({KIND_MEANINGS[type(entry)]})",
        f"- **Status**: {status_of(entry)}",
        "- **Reproducer**:",
        "",
        "  ```bash",
        *(f"  {command}" for command in finding.reproducers()),
        "  ```",
    ]


def _code_list(items: Sequence[str]) -> str:
    return ", ".join(f"`{item}`" for item in items)


def _devices(devices: Sequence[str]) -> str:
    if set(devices) == set(DEVICES):
        return "every device"
    return " and ".join(DEVICE_NAMES[d] for d in devices) + " only"


def builtin_page() -> str:
    """The page for the built-in implementations, as it should read."""
    from implementations import builtin_implementations

    return render(collect(builtin_implementations()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.findings", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PAGE, help=f"where to write the page (default: {PAGE.name} in docs/)")
    parser.add_argument("--stdout", action="store_true", help="print the page instead of writing it")
    args = parser.parse_args(argv)
    page = builtin_page()
    if args.stdout:
        print(page, end="")
    else:
        args.out.write_text(page)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
