"""``python -m harness list [--verbose] [--impl NAME ...] [--plugin MODULE:ATTR ...]``: what runs here.

By default one line per implementation, fitted to the terminal's width (``shutil.get_terminal_size``:
the ``COLUMNS`` variable, else the terminal, else 80): its name, whether it runs here, its family,
and one short reason (how it runs, or why it does not), cut with an ellipsis where the line ends.
``--verbose`` adds under each the dtypes, reductions and options it supports, why it lacks the
others, and the warnings its packages printed on import.

Listing imports the peer packages the adapters wrap (Megatron-core, OLMo-core, transformers), and
some of them warn on import (no Transformer Engine, no Apex): those warnings are captured while
the implementations are loaded and probed, not printed, since they say nothing about the harness.
"""

from __future__ import annotations

import argparse
import shutil
import textwrap

import torch
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from harness.adapter import Implementation
from harness.environment import local_device
from harness.quiet import Captured, captured
from harness.registry import resolve, resolve_many
from harness.spec import dtype_name

EXAMPLES = """\
examples:
  python -m harness list                        one line per implementation
  python -m harness list --verbose              with dtypes, reductions and options, and why not
  python -m harness list --impl chunked --impl liger --verbose
  python -m harness list --plugin mypkg.heads:my_loss
                                                a plugin beside the built-ins
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--impl", action="append", metavar="NAME", help="built-in name or package.module:attr (repeatable)"
    )
    parser.add_argument(
        "--plugin", action="append", default=[], metavar="MODULE:ATTR",
        help="list a plugin in addition to the built-ins (repeatable)",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also the dtypes, reductions and options each supports, and why it lacks the others")


def describe(impl: Implementation, device: str) -> dict:
    """One implementation: the line's fields, and the details ``--verbose`` adds (``unsupported``:
    the options it lacks, grouped by their common reason)."""
    available = impl.availability()
    caps = impl.capabilities(device)
    unsupported: dict[str, list[str]] = {}
    for option, why in caps.reasons().items():
        unsupported.setdefault(why, []).append(option)
    return {
        "name": impl.name,
        "here": "yes" if available.available else "no",
        "family": impl.family,
        "how / why not": available.detail or impl.summary,
        "dtypes": ", ".join(dtype_name(d) for d in caps.dtypes),
        "reductions": ", ".join(caps.reductions),
        "options": ", ".join(caps.options) or "none",
        "unsupported": [f"{', '.join(options)}: {why}" for why, options in unsupported.items()],
    }


def run(args: argparse.Namespace) -> int:
    width = shutil.get_terminal_size().columns
    console = Console(width=width, highlight=False, soft_wrap=False)
    said = Captured()
    with captured(said):
        impls = resolve_many(args.impl)
        impls += [resolve(name) for name in args.plugin]
        device = local_device()
        rows = [describe(impl, device) for impl in impls]
    title = f"LM-head implementations here ({device}, torch {torch.__version__})"
    console.print(Text(title, overflow="ellipsis", no_wrap=True))
    if args.verbose:
        print_verbose(console, rows, said)
    else:
        console.print(line_table(rows))
        console.print(Text("--verbose: dtypes, reductions and options of each", overflow="ellipsis", no_wrap=True),
                      style="dim")
    return 0


def line_table(rows: list[dict]) -> Table:
    """One line per implementation: the reason column takes the width left and ends in an ellipsis."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, expand=True)
    for column in ("name", "here", "family"):
        table.add_column(column, no_wrap=True)  # a name is what users copy into --impl: never cut
    table.add_column("how it runs / why not", no_wrap=True, overflow="ellipsis", ratio=1)
    for row in rows:
        table.add_row(row["name"], row["here"], row["family"], row["how / why not"],
                      style=None if row["here"] == "yes" else "dim")
    return table


def print_verbose(console: Console, rows: list[dict], said: Captured) -> None:
    """Each implementation's name, then its details, wrapped to the width with a hanging indent."""
    width = console.width

    def wrapped(text: str, indent: str, style: str | None = None) -> None:
        lines = textwrap.wrap(text, width=width, initial_indent=indent, subsequent_indent=indent + "    ",
                              break_on_hyphens=False)
        for line in lines:
            console.print(Text(line, style=style or ""), overflow="fold")

    for row in rows:
        console.print()
        wrapped(f"{row['name']}  ({row['family']}; runs here: {row['here']})", "", "bold")
        for key in ("how / why not", "dtypes", "reductions", "options"):
            wrapped(f"{key}: {row[key]}", "  ")
        if row["unsupported"]:
            console.print(Text("  unsupported:"))
            for line in row["unsupported"]:
                wrapped(line, "    ")
    if said.warnings:
        console.print()
        wrapped(f"captured while importing the peer packages ({len(said.warnings)} lines):", "", "dim")
        for warning in said.warnings:
            wrapped(warning, "  ", "dim")
