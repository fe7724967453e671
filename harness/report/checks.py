"""Which check run a sweep's report shows: one of the same code on the same kind of device, or none.

A correctness section belongs to the code that was timed. So a report attaches a check run only
when its ``meta.json`` names the sweep's git commit and device (``matching``), preferring a run
that finished (``harness.results.run_finished``) and, among those, the one that covers most of
the sweep's implementations. Its tables are narrowed to the sweep's implementations (a plugin
gated on its own does not appear in a benchmark of the built-ins). Without a match, the report
says which check runs exist and how to make a matching one. A check run named with ``--check``
is shown whatever it is, with what does not match it said first.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from harness.report.runs import CheckResults, Run, load_check
from harness.results import list_runs, run_finished


@dataclass(frozen=True)
class CheckChoice:
    """The check run a report shows (None: none), and what a reader must know about it."""

    check: CheckResults | None
    warnings: list[str] = field(default_factory=list)  # about the run shown: mismatch, interrupted
    notes: list[str] = field(default_factory=list)  # coverage: what it does not cover, what it left out
    missing: str = ""  # when none is shown: which check runs exist and how to make a matching one


def device_identity(meta: dict) -> str:
    """What a run ran on, for matching: the GPU's name, or the CPU's model (not its thread count,
    which a check's worker processes set differently from a sweep's)."""
    if meta.get("device_kind") == "cpu" and meta.get("cpu"):
        return f"CPU: {meta['cpu']}"
    return str(meta.get("device_name") or meta.get("device") or "unknown device")


def short_commit(meta: dict) -> str:
    commit = meta.get("git_commit")
    if not commit:
        return "an unrecorded commit"
    return commit[:10] + (" (with uncommitted changes)" if meta.get("git_dirty") else "")


def mismatches(check: dict, sweep: dict) -> list[str]:
    """Why a check run's meta does not describe the sweep's code and device (empty: it does)."""
    problems = []
    if not sweep.get("git_commit") or check.get("git_commit") != sweep.get("git_commit"):
        problems.append(f"it is from commit {short_commit(check)}, the sweep from {short_commit(sweep)}")
    if device_identity(check) != device_identity(sweep):
        problems.append(f"it ran on {device_identity(check)}, the sweep on {device_identity(sweep)}")
    return problems


def _implementations(run: CheckResults) -> set[str]:
    return set(run.properties["implementation"]) | set(run.not_checked["implementation"])


def choose_check(sweeps: list[Run], results_dir: Path | None, explicit: Path | None = None) -> CheckChoice:
    """The check run to show beside ``sweeps`` (the last one's commit and device decide)."""
    sweep_meta = sweeps[-1].meta if sweeps else {}
    measured = set().union(*(set(run.rows["implementation"].astype(str)) for run in sweeps)) if sweeps else set()
    if explicit is not None:
        check = load_check(Path(explicit))
        warnings = [f"This check run was named with --check but does not match the sweep: {problem}."
                    for problem in (mismatches(check.run.meta, sweep_meta) if sweeps else [])]
        return _narrowed(check, measured, warnings)
    candidates = [load_check(path) for path in list_runs(results_dir, kind="check")] if results_dir else []
    matching = [c for c in candidates if sweeps and not mismatches(c.run.meta, sweep_meta)]
    if not matching:
        return CheckChoice(None, missing=_how_to_match(candidates, sweep_meta, measured, results_dir))
    # Finished before interrupted, then the widest coverage of the sweep, then the latest.
    best = max(enumerate(matching), key=lambda item: (run_finished(item[1].run.meta),
                                                       len(_implementations(item[1]) & measured), item[0]))[1]
    return _narrowed(best, measured, [])


def _narrowed(check: CheckResults, measured: set[str], warnings: list[str]) -> CheckChoice:
    """``check`` with its tables cut to the sweep's implementations, and what that left out."""
    warnings = list(warnings)
    if not run_finished(check.run.meta):
        warnings.append(f"Check run {check.run.name} is not marked finished in its meta.json: it was "
                        "interrupted (or made before runs were marked), so its tables may hold only what it reached.")
    notes = []
    covered = _implementations(check)
    if measured:
        not_covered = sorted(measured - covered)
        others = sorted(covered - measured)
        if not_covered:
            notes.append(f"Not covered by this check run: {', '.join(not_covered)}.")
        if others:
            notes.append(f"Left out here (checked, but not in this sweep): {', '.join(others)}.")

        def keep(frame):
            return frame[frame["implementation"].isin(measured)].reset_index(drop=True)

        check = replace(check, properties=keep(check.properties), behaviour=keep(check.behaviour),
                        precision=keep(check.precision), not_checked=keep(check.not_checked))
    return CheckChoice(check, warnings, notes)


def _how_to_match(candidates: list[CheckResults], sweep: dict, measured: set[str], results_dir: Path | None) -> str:
    where = f"in {results_dir}/" if results_dir else "beside this run"
    identity = f"commit {short_commit(sweep)} on {device_identity(sweep)}"
    text = f"No check run {where} matches this sweep ({identity}), so no correctness results are shown."
    if candidates:
        latest = candidates[-1]
        covered = len(_implementations(latest) & measured)
        state = "" if run_finished(latest.run.meta) else ", not marked finished"
        text += (f" The latest, {latest.run.name}, is from commit {short_commit(latest.run.meta)} on "
                 f"{device_identity(latest.run.meta)} ({covered} of this sweep's {len(measured)} implementations"
                 f"{state}); {len(candidates)} check run{'s' if len(candidates) != 1 else ''} in all.")
    out = f" --out {results_dir}" if results_dir and str(results_dir) != "results" else ""
    text += (f" To make a matching one, run `python -m harness check{out}` on this machine at commit "
             f"{(sweep.get('git_commit') or 'the sweep’s')[:10]}, then build this report again.")
    return text
