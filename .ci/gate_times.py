"""Print each implementation's time in a run of ``python -m harness check``, slowest first.

    python3 .ci/gate_times.py RUN_DIR...

From each run folder's ``properties.csv``: the sum of its properties' ``seconds`` per
implementation (the properties of one implementation run one after another in its worker; worker
start-up, support probing and the behaviour matrix are not in it), with the slowest property.
CI prints it after the gate, so that an implementation whose gate time grows is seen when it does.
Standard library only: it runs outside the project's environment.
"""

from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict
from pathlib import Path


def implementation_times(run_dir: Path) -> list[tuple[str, float, int, str, float]]:
    """(implementation, seconds, properties, slowest property, its seconds), slowest first."""
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    slowest: dict[str, tuple[float, str]] = {}
    with open(run_dir / "properties.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            name, seconds = row["implementation"], float(row["seconds"] or 0.0)
            totals[name] += seconds
            counts[name] += 1
            slowest[name] = max(slowest.get(name, (-1.0, "")), (seconds, row["property"]))
    return sorted(((name, totals[name], counts[name], slowest[name][1], slowest[name][0]) for name in totals),
                  key=lambda entry: -entry[1])


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python3 .ci/gate_times.py RUN_DIR...", file=sys.stderr)
        return 2
    for run_dir in map(Path, argv):
        if not (run_dir / "properties.csv").is_file():
            print(f"{run_dir}: no properties.csv", file=sys.stderr)
            return 2
        rows = implementation_times(run_dir)
        created = json.loads((run_dir / "meta.json").read_text())["created"]
        print(f"gate time per implementation ({run_dir}, started {created}; the sum of its properties' seconds):")
        for name, seconds, count, slow_property, slow_seconds in rows:
            print(f"  {name:<28} {seconds:7.1f} s  {count:2d} properties, slowest {slow_property} {slow_seconds:.1f} s")
        print(f"  {'all implementations':<28} {sum(row[1] for row in rows):7.1f} s  (run side by side: --jobs)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
