"""Child process of ``python -m harness check``: one implementation's properties, one JSON line each.

    python -m harness.check.worker --impl NAME --profile ci [--max-examples N] [--device cpu] ITEM...

Each ITEM is a property id, or ``support``: what the implementation supports here (its declared
capabilities and, for a plain-function plugin, what probing found), so that the parent can say
what was not checked. See ``harness.check.isolation`` for the protocol; ``harness.check.command``
starts it.
"""

from __future__ import annotations

import argparse
import dataclasses

SUPPORT_ITEM = "support"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="check worker (one implementation)")
    parser.add_argument("--impl", required=True)
    parser.add_argument("--profile", required=True)
    parser.add_argument("--max-examples", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("properties", nargs="+")
    args = parser.parse_args(argv)

    import harness  # noqa: F401 - sets TRITON_INTERPRET before anything imports triton
    from harness.check.run_property import Target, run_property
    from harness.check.isolation import ReportChannel
    from harness.check.profiles import get_profile
    from harness.check.properties import find_property
    from harness.check.support_probe import discover_support
    from harness.registry import resolve

    channel = ReportChannel()
    target = Target(args.impl, resolve(args.impl))
    support = discover_support(target.impl, args.device)
    profile = get_profile(args.profile, args.max_examples)
    for property_id in args.properties:
        channel.send({"started": property_id})
        if property_id == SUPPORT_ITEM:
            channel.send({"item": SUPPORT_ITEM, "support": support.to_json()})
            continue
        prop = find_property(property_id)

        def announce(case, property_id=property_id) -> None:
            channel.send({"started": property_id, "case": str(case)})

        result = run_property(target, prop, support, profile, args.device, on_case=announce)
        channel.send({"item": property_id, **dataclasses.asdict(result)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
