"""``python -m harness sweep``: speed and peak memory over cases (work in progress)."""

from __future__ import annotations

import argparse

from harness.errors import HarnessError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cases", nargs="*", metavar="CASES", help="case files (paths or names in cases/)")


def run(args: argparse.Namespace) -> int:
    raise HarnessError("sweep is being written")
