"""``python -m harness list [--impl NAME|module:attr ...]``: what runs here, and what it supports."""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table

from harness.adapter import Implementation
from harness.environment import local_device
from harness.registry import resolve, resolve_many
from harness.spec import dtype_name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--impl", action="append", metavar="NAME", help="built-in name or package.module:attr (repeatable)"
    )
    parser.add_argument(
        "--plugin", action="append", default=[], metavar="MODULE:ATTR",
        help="list a plugin in addition to the built-ins (repeatable)",
    )


def describe(impl: Implementation, device: str) -> dict[str, str]:
    """One row of the listing, as plain strings (also used by the reports)."""
    available = impl.availability()
    caps = impl.capabilities(device)
    missing = "; ".join(f"{option}: {why}" for option, why in caps.reasons().items())
    return {
        "name": impl.name,
        "family": impl.family,
        "available": "yes" if available.available else "no",
        "how / why not": available.detail,
        "dtypes": ", ".join(dtype_name(d) for d in caps.dtypes),
        "reductions": ", ".join(caps.reductions),
        "options": ", ".join(caps.options),
        "unsupported": missing,
    }


def run(args: argparse.Namespace) -> int:
    impls = resolve_many(args.impl)
    impls += [resolve(name) for name in args.plugin]
    device = local_device()
    title = f"LM-head implementations on this machine ({device}, torch {torch.__version__})"
    table = Table(title=title, show_lines=True)
    rows = [describe(impl, device) for impl in impls]
    for column in rows[0]:
        # A name is what users copy into --impl: never wrap it.
        table.add_column(column, no_wrap=column == "name", overflow="fold")
    for row in rows:
        table.add_row(*row.values())
    Console(width=200).print(table)
    return 0
