"""``python -m harness {list,check,sweep,report,compare}``.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
this file only wires them up and turns ``HarnessError`` into a one-line message (exit status 2).

Only the chosen command's module is imported: each command needs its own extras (``check``
Hypothesis, ``report`` seaborn and matplotlib), and a machine without one of them must still run
the others (a GPU machine with no registry to install from runs ``sweep`` without ``report``).
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
EXAMPLES = """\
examples (each command's --help has more):
  python -m harness list                         what runs here, one line per implementation
  python -m harness check --impl chunked         the correctness gate on one implementation
  python -m harness sweep                        the main job: the preset for this machine, then its report
  python -m harness report                       the dashboard of the latest sweep in results/
  python -m harness compare BASE NEW             fail on a slowdown or memory growth between two runs
"""
# Commands that run implementations on this machine's device.
DEVICE_COMMANDS = ("list", "check", "sweep")
# The extra that provides what each command imports beyond the core dependencies.
EXTRAS = {"check": "test", "report": "report", "compare": "report"}


def chosen_command(argv: list[str]) -> str | None:
    """The command named on the command line (the first argument that is one), or None."""
    return next((arg for arg in argv if arg in COMMANDS), None)


def import_command(name: str):
    """The command's module; a missing package becomes a one-line ``HarnessError`` naming its extra."""
    try:
        return importlib.import_module(COMMANDS[name][0])
    except ModuleNotFoundError as exc:
        extra = EXTRAS.get(name, "all")
        raise HarnessError(
            f"`{name}` needs the package {exc.name!r}, which is not installed "
            f"(pip install 'lmhead-bench[{extra}]'); the other commands do not need it"
        ) from None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s arguments are added (its module imported), the others are listed."""
    parser = argparse.ArgumentParser(prog="python -m harness", description=__doc__.splitlines()[0],
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        subparser = sub.add_parser(name, help=help_text, description=help_text)
        subparser.set_defaults(module=module_name)
        if name == command:
            import_command(name).add_arguments(subparser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser(chosen_command(argv))
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if args.command in DEVICE_COMMANDS:
        # A CUDA build of torch that sees no GPU would otherwise fall back to the CPU in silence.
        from harness.environment import warn_if_gpu_missing

        warn_if_gpu_missing()
    try:
        return importlib.import_module(args.module).run(args)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
