"""Child process of ``python -m harness check``: one implementation's properties, one message each.

    python -m harness.check.worker REPORT_FILE --impl NAME --profile ci [--max-examples N] [--device cpu]
        [--dtype NAME ...] ITEM...

Each ITEM is a property id, or ``support``: what the implementation supports here (its declared
capabilities and, for a plain-function plugin, what probing found), so that the parent can say
what was not checked. ``harness.isolation`` runs it and defines the protocol;
``harness.check.engine`` starts it.

After an error that leaves the CUDA context unusable (illegal memory access, device-side assert),
the worker reports the property it happened in and stops with ``FATAL_EXIT_STATUS``: every later
property would fail with the same error, so the parent runs them in a fresh process.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

SUPPORT_ITEM = "support"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="check worker (one implementation)")
    parser.add_argument("report", help="the file the messages are appended to")
    parser.add_argument("--impl", required=True)
    parser.add_argument("--profile", required=True)
    parser.add_argument("--max-examples", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", action="append", dest="dtypes", help="check only these dtypes (repeatable)")
    parser.add_argument("--shared-results", help="the folder where checks of several implementations share results")
    parser.add_argument("properties", nargs="+")
    args = parser.parse_args(argv)

    import harness  # noqa: F401 - sets TRITON_INTERPRET before anything imports triton
    from harness.check.engine import restricted_support
    from harness.check.profiles import get_profile
    from harness.check.properties import find_property
    from harness.check.run_property import FAIL, Target, run_property
    from harness.check.shared import SharedResults
    from harness.check.support_probe import discover_support
    from harness.isolation import FATAL_EXIT_STATUS, child_report, is_fatal
    from harness.registry import resolve

    report = child_report(args.report)
    target = Target(args.impl, resolve(args.impl))
    support = restricted_support(discover_support(target.impl, args.device), args.dtypes and tuple(args.dtypes))
    profile = get_profile(args.profile, args.max_examples)
    history = []  # every case run in this process: a failure's reproducer may need the ones before it
    shared = SharedResults(args.shared_results and Path(args.shared_results))
    for property_id in args.properties:
        report.send({"started": property_id})
        if property_id == SUPPORT_ITEM:
            report.send({"item": SUPPORT_ITEM, "support": support.to_json()})
            continue
        prop = find_property(property_id)

        def announce(case) -> None:
            report.send({"case": str(case)})

        result = run_property(target, prop, support, profile, args.device, on_case=announce, history=history,
                              shared=shared)
        report.send({"item": property_id, **dataclasses.asdict(result)})
        if result.status == FAIL and is_fatal(result.detail):
            return FATAL_EXIT_STATUS
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
