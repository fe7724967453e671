"""``python -m harness compare BASE NEW [--threshold 5%]``: the regression gate between two runs.

Cases are matched on (case, implementation, mode). The gate fails (exit status 1) when a case

- got **slower**: the new median time is above the base median by more than the threshold *and* the
  new p20 is above the base p80, so the two runs' measured spreads (p20–p80) do not overlap and
  noise alone cannot fail it (when a run has no p20/p80, the threshold alone decides). The rule is
  ``harness.report.noise.judge_time``, which the reports' picks of a fastest implementation share;
- uses **more memory**: the new peak memory is above the base by more than the threshold (peak
  memory is a single, repeatable measurement, so it has no spread);
- stopped producing numbers: it measured in BASE and is out of memory, timed out, crashed,
  raised an error or gave a wrong result in NEW. A case that became *unsupported* is listed but does not fail the gate:
  that is a statement about what the implementation supports, not about its speed or memory.

Cases present in only one of the runs are listed and never fail the gate. Faster and leaner cases
are shown as improvements under the same rules.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from harness.errors import HarnessError
from harness.report.noise import UNCHANGED, judge_time, relative_change
from harness.report.runs import Run, device_label, failures, format_bytes, format_ms, load_run, measurements, resolve_run
from harness.results import RESULTS_DIR

KEY = ["case", "implementation", "mode"]
BROKEN_STATUSES = {"oom": "more memory", "timeout": "slower", "crash": "broken", "error": "broken", "wrong": "broken"}
# How rows are ordered in the printed table: what fails the gate first.
VERDICT_ORDER = ["slower", "more memory", "broken", "now unsupported", "faster", "less memory", "fixed",
                 "within noise", "unchanged"]
REGRESSIONS = {"slower", "more memory", "broken"}


EXAMPLES = """\
examples:
  python -m harness compare 20261201-090000 20261207-101500
                                  fail (exit status 1) on a slowdown or memory growth beyond 5%
  python -m harness compare results/main results/branch --threshold 10%
                                  two run folders, a wider threshold

A slowdown must also clear both runs' p20–p80 spread; compare runs measured on the same device.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("base", metavar="BASE", help="baseline run folder or run id")
    parser.add_argument("new", metavar="NEW", help="new run folder or run id")
    parser.add_argument(
        "--threshold", default="5%", help="relative change tolerated, as a percentage or a fraction (default 5%%)"
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where run ids are looked up")


def parse_threshold(text: str) -> float:
    """``"5%"`` or ``"0.05"`` -> 0.05; anything else is a one-line error."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(%?)\s*", str(text))
    if not match:
        raise HarnessError(f"bad threshold {text!r}: write a percentage such as 5% or a fraction such as 0.05")
    value, percent = float(match.group(1)), match.group(2) == "%"
    if not percent and value >= 1:
        raise HarnessError(f"ambiguous threshold {text!r}: write {value:g}% for a percentage, or a fraction below 1")
    return value / 100 if percent else value


@dataclass(frozen=True)
class Comparison:
    """The outcome of comparing two runs; ``changes`` has one row per matched case with its verdicts."""

    base: Run
    new: Run
    threshold: float
    changes: pd.DataFrame
    only_in_base: pd.DataFrame
    only_in_new: pd.DataFrame

    @property
    def regressions(self) -> pd.DataFrame:
        return self.changes[self.changes["verdicts"].apply(lambda v: bool(REGRESSIONS & set(v)))]


def compare_runs(base: Run, new: Run, threshold: float) -> Comparison:
    base_ok, new_ok = _indexed(measurements([base])), _indexed(measurements([new]))
    base_bad, new_bad = _indexed(failures([base])), _indexed(failures([new]))
    base_keys = base_ok.index.union(base_bad.index)
    new_keys = new_ok.index.union(new_bad.index)

    rows = []
    for key in base_keys.intersection(new_keys):
        row = dict(zip(KEY, key))
        if key in base_ok.index and key in new_ok.index:
            row.update(_measured_change(base_ok.loc[key], new_ok.loc[key], threshold))
        elif key in base_ok.index:  # measured before, no numbers now
            status, reason = new_bad.loc[key, "status"], new_bad.loc[key, "reason"]
            verdict = BROKEN_STATUSES.get(status, f"now {status}")
            row.update(_status_change(base_ok.loc[key], None, f"{status}: {reason}", verdict))
        elif key in new_ok.index:  # no numbers before, measured now
            row.update(_status_change(None, new_ok.loc[key], f"was {base_bad.loc[key, 'status']}", "fixed"))
        else:
            continue  # no numbers in either run: nothing to compare
        rows.append(row)
    changes = pd.DataFrame(rows, columns=[*KEY, "base_time", "new_time", "time_change", "base_memory",
                                          "new_memory", "memory_change", "verdicts", "note"])
    changes["rank"] = changes["verdicts"].apply(
        lambda verdicts: min(VERDICT_ORDER.index(v) if v in VERDICT_ORDER else len(VERDICT_ORDER) for v in verdicts)
    )
    changes = changes.sort_values(["rank", *KEY]).drop(columns="rank").reset_index(drop=True)
    return Comparison(
        base=base, new=new, threshold=threshold, changes=changes,
        only_in_base=pd.DataFrame(sorted(base_keys.difference(new_keys)), columns=KEY),
        only_in_new=pd.DataFrame(sorted(new_keys.difference(base_keys)), columns=KEY),
    )


def _indexed(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop_duplicates(subset=KEY, keep="last").set_index(KEY)


def _measured_change(base: pd.Series, new: pd.Series, threshold: float) -> dict:
    time = judge_time(base, new, threshold)
    memory_change = relative_change(base["peak_memory"], new["peak_memory"])
    verdicts = [] if time.verdict == UNCHANGED else [time.verdict]
    notes = [time.note] if time.note else []
    if memory_change > threshold:
        verdicts.append("more memory")
    elif memory_change < -threshold:
        verdicts.append("less memory")
    return dict(
        base_time=base["time_median"], new_time=new["time_median"], time_change=time.change,
        base_memory=base["peak_memory"], new_memory=new["peak_memory"], memory_change=memory_change,
        verdicts=verdicts or ["unchanged"], note="; ".join(notes),
    )


def _status_change(base: pd.Series | None, new: pd.Series | None, note: str, verdict: str) -> dict:
    nan = float("nan")
    return dict(
        base_time=base["time_median"] if base is not None else nan,
        new_time=new["time_median"] if new is not None else nan, time_change=nan,
        base_memory=base["peak_memory"] if base is not None else nan,
        new_memory=new["peak_memory"] if new is not None else nan, memory_change=nan,
        verdicts=[verdict], note=note,
    )


def _percent(value: float) -> str:
    if pd.isna(value):
        return "–"
    return "+inf" if value == float("inf") else f"{value:+.1%}"


def print_comparison(comparison: Comparison, console: Console) -> None:
    base, new = comparison.base, comparison.new
    base_device, new_device = device_label([base]), device_label([new])
    console.print(f"BASE {base.name} measured on: {base_device}")
    console.print(f"NEW  {new.name} measured on: {new_device}")
    if base_device != new_device:
        console.print("[yellow]note: the runs were measured on different devices; their times are not comparable[/]")
    table = Table(
        title=f"Changes in time and memory (threshold {comparison.threshold:.1%}; "
        "a slowdown must also clear both runs' p20–p80 spread)",
        show_lines=False,
    )
    for column in ("case", "implementation", "mode", "time base", "time new", "Δ time",
                   "memory base", "memory new", "Δ memory", "verdict", "note"):
        table.add_column(column, overflow="fold")
    for _, row in comparison.changes.iterrows():
        regressed = bool(REGRESSIONS & set(row["verdicts"]))
        improved = bool({"faster", "less memory", "fixed"} & set(row["verdicts"]))
        style = "bold red" if regressed else ("green" if improved else None)
        table.add_row(
            row["case"], row["implementation"], row["mode"],
            format_ms(row["base_time"]), format_ms(row["new_time"]), _percent(row["time_change"]),
            format_bytes(row["base_memory"]), format_bytes(row["new_memory"]), _percent(row["memory_change"]),
            ", ".join(row["verdicts"]), row["note"], style=style,
        )
    console.print(table)
    for label, frame in (("only in BASE", comparison.only_in_base), ("only in NEW", comparison.only_in_new)):
        if frame.empty:
            continue
        listed = Table(title=f"Cases {label} ({base.name if label.endswith('BASE') else new.name}; listed, not failed)")
        for column in KEY:
            listed.add_column(column, overflow="fold")
        for _, row in frame.iterrows():
            listed.add_row(*(str(row[c]) for c in KEY))
        console.print(listed)


def run(args: argparse.Namespace) -> int:
    threshold = parse_threshold(args.threshold)
    base = load_run(resolve_run(args.base, args.results_dir))
    new = load_run(resolve_run(args.new, args.results_dir))
    for run_ in (base, new):
        if run_.kind == "check":
            raise HarnessError(f"{run_.path} is a check run; compare takes two sweep runs")
    comparison = compare_runs(base, new, threshold)
    console = Console(width=200)
    print_comparison(comparison, console)
    regressions = comparison.regressions
    one_sided = len(comparison.only_in_base) + len(comparison.only_in_new)
    summary = (f"{len(comparison.changes)} cases compared, {one_sided} in one run only, "
               f"threshold {threshold:.1%}")
    if not regressions.empty:
        console.print(f"[bold red]FAIL[/]: {len(regressions)} case(s) regressed ({summary})")
        return 1
    console.print(f"[green]OK[/]: no case slower or hungrier beyond the threshold and the measured spread ({summary})")
    return 0
