"""Which (property, case) of the gate's explicit examples kills each subtle bug: ``tests/killers.csv``.

    python -m tests.find_killers              # every bug of every corpus
    python -m tests.find_killers NAME...      # only these bugs (plugin names); the other rows are kept
    python -m tests.find_killers --jobs 1     # one bug at a time (default: 2 processes)
    python -m tests.find_killers NAME --property equivalence/model-sizes   # only that property's examples

For each bug, in this process, every property's explicit examples, fitted to what the bug's plugin
supports, are evaluated one by one, the cheapest first (as ``python -m harness check --case``
does), until one fails: that (property, case) is the bug's row.
A bug that no explicit example kills is printed and the command exits 1. The table is rewritten
after each bug, so an interrupted run keeps what it found.

The table is what ``tests/test_subtle_bugs.py`` checks cheaply, in two halves: that the gate reaches
the case (it is among the property's fitted explicit examples) and that it detects the bug there
(one evaluation fails; the correct kernel passes every explicit example). Rerun this after changing the explicit
examples or the properties, and commit the table.
"""

from __future__ import annotations

import argparse
import csv
import functools
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

from harness.case import Case
from harness.check.examples import fitted_examples
from harness.check.properties import PROPERTIES, Property
from harness.check.run_property import FAIL, Target, cannot_run, run_case
from harness.check.strategies import fit_to
from harness.check.support_probe import Support, discover_support
from harness.errors import HarnessError
from harness.registry import resolve

TABLE = Path(__file__).resolve().parent / "killers.csv"
COLUMNS = ("bug", "property", "case")
DEVICE = "cpu"

# Each corpus of subtle bugs, and the correct kernel its bugs were made from (it passes every explicit
# example, the killers included, so that a kill is the bug's doing).
CORPORA = {"tests.subtle_bugs": "fused_chunked", "tests.subtle_head_bugs": "correct_head",
           "tests.reach_bugs": "chunked_kernel"}


# Bugs no explicit example kills yet, each with why: the gate's known gaps. tests/test_subtle_bugs.py
# shows each one passing where it should fail, so that closing a gap moves it into the table.
KNOWN_SURVIVORS: dict[str, tuple[str, str, str]] = {
    "tests.reach_bugs:target_gradient_from_rounded_probability": (
        "equivalence/bfloat16",
        "B=2,T=40,D=64,V=129,dtype=bfloat16,reduction=none,logits=confident,seed=2500",
        "the budget counts a logit's error as a relative error of every probability, every term positive; "
        "for a confident token the errors of z_y and of the logsumexp cancel in p_y, which it does not credit, "
        "so the gradient's budget is about 30 x torch-eager's error there, and the norm-wise comparison "
        "(10 x torch-eager's error norm on grad_hidden) is floored at one element's budget",
    ),
}


@dataclass(frozen=True)
class Killer:
    bug: str  # the plugin name, e.g. tests.subtle_bugs:last_class_gradient
    property: str
    case: str

    def row(self) -> dict:
        return {"bug": self.bug, "property": self.property, "case": self.case}


def bug_names(module_name: str) -> list[str]:
    """The plugin names of a corpus's bugs (its ``BUGS``: plugins, or a mapping from their names)."""
    bugs = import_module(module_name).BUGS
    names = list(bugs) if isinstance(bugs, dict) else [bug.__name__ for bug in bugs]
    return [f"{module_name}:{name}" for name in names]


def all_bugs() -> list[str]:
    return [bug for module_name in CORPORA for bug in bug_names(module_name)]


@functools.cache
def target_and_support(name: str) -> tuple[Target, Support]:
    target = Target(name, resolve(name))
    return target, discover_support(target.impl, DEVICE)


def gate_examples(name: str, prop: Property) -> list[Case]:
    """The explicit examples the gate runs for ``prop`` on plugin ``name`` (none where it cannot
    run the property), as ``run_property`` fits them."""
    target, support = target_and_support(name)
    if cannot_run(target, prop, support) is not None:
        return []
    return fitted_examples(prop.id, prop.draw.get("dtypes", ()), lambda case: fit_to(case, support))


def evaluate(name: str, prop: Property, case: Case) -> str:
    """The status of one evaluation of ``prop`` on ``case`` (what ``check --case`` prints), from a
    clean start: a corpus that keeps state from call to call (the call-pattern bugs) forgets it
    first, so that the recorded killer fails alone, as its reproducer does."""
    forget = getattr(import_module(name.partition(":")[0]), "forget_cached_state", None)
    if forget is not None:
        forget()
    target, _ = target_and_support(name)
    return run_case(target, prop, case, DEVICE).status


def cost(case: Case) -> int:
    """About the work of one evaluation: the logits' N x V, each a dot product over D."""
    return case.num_tokens * case.vocab * (case.dim + 8)


def first_killer(bug: str, properties: tuple[str, ...] = ()) -> Killer | None:
    """The cheapest of the explicit examples that kills ``bug`` (ties in the gate's order), so that
    the quick tier's check of it stays quick; only those of ``properties`` when given."""
    chosen = [prop for prop in PROPERTIES if not properties or prop.id in properties]
    candidates = [(prop, case) for prop in chosen for case in gate_examples(bug, prop)]
    for prop, case in sorted(candidates, key=lambda candidate: cost(candidate[1])):
        try:
            status = evaluate(bug, prop, case)
        except HarnessError:  # a case that cannot judge this plugin: the gate skips it too
            continue
        if status == FAIL:
            return Killer(bug, prop.id, str(case))
    return None


def read_table(path: Path = TABLE) -> dict[str, Killer]:
    with open(path, newline="") as handle:
        return {row["bug"]: Killer(row["bug"], row["property"], row["case"]) for row in csv.DictReader(handle)}


def write_table(killers: dict[str, Killer], path: Path = TABLE) -> None:
    order = {bug: i for i, bug in enumerate(all_bugs())}
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS, lineterminator="\n")
        writer.writeheader()
        for bug in sorted(killers, key=lambda name: order.get(name, len(order))):
            writer.writerow(killers[bug].row())


def record(bug: str, killer: Killer | None) -> None:
    """Put one bug's row into the table on disk (re-read first: the other rows stay as they are)."""
    table = read_table() if TABLE.exists() else {}
    table.pop(bug, None)
    if killer is not None:
        table[bug] = killer
    write_table({name: row for name, row in table.items() if name in all_bugs()})


def timed_killer(bug: str, properties: tuple[str, ...] = ()) -> tuple[str, Killer | None, float]:
    started = time.perf_counter()
    killer = first_killer(bug, properties)
    return bug, killer, time.perf_counter() - started


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.find_killers", description=__doc__.split("\n")[0])
    parser.add_argument("bugs", nargs="*", metavar="NAME", help="plugin names of the bugs (default: every bug)")
    parser.add_argument("--jobs", type=int, default=2, help="bugs searched at the same time (processes)")
    parser.add_argument("--property", action="append", default=[], metavar="ID",
                        help="search only these properties' examples (repeatable; default: every property)")
    args = parser.parse_args(argv)
    chosen = args.bugs or [bug for bug in all_bugs() if bug not in KNOWN_SURVIVORS]
    unknown = sorted(set(chosen) - set(all_bugs()))
    if unknown:
        print(f"error: not a bug of {', '.join(CORPORA)}: {', '.join(unknown)}", file=sys.stderr)
        return 2
    survivors = []
    # Spawned, not forked: each process imports torch and the harness afresh.
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        for done in as_completed([pool.submit(timed_killer, bug, tuple(args.property)) for bug in chosen]):
            bug, killer, seconds = done.result()
            if killer is None:
                survivors.append(bug)
                print(f"{bug}: NOT KILLED by any explicit example ({seconds:.1f} s)", flush=True)
            else:
                print(f"{bug}: {killer.property} --case '{killer.case}' ({seconds:.1f} s)", flush=True)
            record(bug, killer)
    print(f"wrote {TABLE} ({len(read_table())} bugs)")
    if survivors:
        print(f"{len(survivors)} bugs survive every explicit example: {', '.join(survivors)}")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
