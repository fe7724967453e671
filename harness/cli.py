"""``python -m harness {list,check,sweep,report,compare}``.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
this file only wires them up and turns ``HarnessError`` into a one-line message (exit status 2).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from harness.errors import HarnessError

COMMANDS = {
    "list": ("harness.listing", "list every implementation, whether it runs here, and what it supports"),
    "check": ("harness.check.command", "property-based correctness gate against the float64 reference"),
    "sweep": ("harness.sweep.command", "measure speed and peak memory over cases into results/"),
    "report": ("harness.report.command", "build the dashboard (plots, HTML, Markdown) for runs"),
    "compare": ("harness.report.compare", "regression gate: compare two runs' time and memory"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harness", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(module=module_name)
        importlib.import_module(module_name).add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return importlib.import_module(args.module).run(args)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
