"""Finding run folders and turning their long-format rows into the tables reports are built from.

Everything downstream (plots, dashboard, Markdown, compare) works on two frames:

- ``measurements``: one row per run x case x implementation x mode, one column per metric
  (``time_median``, ``time_p20``, ``peak_memory``, ...), only for cases that produced numbers;
- ``failures``: one row per case that did not (``status`` other than ok: no numbers, or numbers
  that are ``wrong``), with its reason and the case's columns, so that tables, plots and
  heatmaps show a failure in the place its numbers would have had.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from harness.errors import HarnessError
from harness.results import (
    BASELINE,
    MODES,
    BEHAVIOUR_COLUMNS,
    METRICS,
    NOT_CHECKED_COLUMNS,
    PRECISION_COLUMNS,
    PROPERTY_COLUMNS,
    list_runs,
    read_meta,
    read_rows,
)

# The sweep's modes in order of preference for plots: forward+backward first (what training runs).
MODES_BY_PREFERENCE = tuple(sorted(MODES, key=lambda mode: mode != "forward_backward"))

# What identifies one measured case; everything but the implementation and the metric.
CASE_COLUMNS = ["case", "shape", "vocab", "hidden", "tokens", "dtype", "tied", "options", "logits"]
MEASUREMENT_KEY = ["run", "device", *CASE_COLUMNS, "implementation", "mode"]


@dataclass(frozen=True)
class Run:
    """One run folder as read from disk."""

    path: Path
    meta: dict
    rows: pd.DataFrame

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def kind(self) -> str:
        return self.meta.get("kind", "sweep")


@dataclass(frozen=True)
class CheckResults:
    """The correctness gate's tables from a check run (empty frames when a file is missing)."""

    run: Run
    properties: pd.DataFrame
    behaviour: pd.DataFrame
    precision: pd.DataFrame
    not_checked: pd.DataFrame


def resolve_run(name: str | Path, results_dir: Path) -> Path:
    """A run folder from a path or a run id under ``results_dir``; a clear error when neither exists."""
    candidates = [Path(name), Path(results_dir) / str(name)]
    for candidate in candidates:
        if candidate.is_dir():
            if not (candidate / "meta.json").exists():
                raise HarnessError(f"{candidate} is not a run folder (it has no meta.json)")
            return candidate
    raise HarnessError(f"run {str(name)!r} not found (neither a folder nor a run id in {results_dir}/)")


def load_run(path: Path) -> Run:
    try:
        return Run(path=Path(path), meta=read_meta(path), rows=read_rows(path))
    except (ValueError, KeyError, pd.errors.ParserError) as exc:
        raise HarnessError(f"cannot read run {path}: {exc}") from None


def load_check(path: Path) -> CheckResults:
    run = load_run(path)
    return CheckResults(
        run=run,
        properties=_read_optional_csv(path / "properties.csv", PROPERTY_COLUMNS),
        behaviour=_read_optional_csv(path / "behaviour.csv", BEHAVIOUR_COLUMNS),
        precision=_read_optional_csv(path / "precision.csv", PRECISION_COLUMNS),
        not_checked=_read_optional_csv(path / "not_checked.csv", NOT_CHECKED_COLUMNS),
    )


def latest_check(results_dir: Path) -> Path | None:
    runs = list_runs(results_dir, kind="check")
    return runs[-1] if runs else None


def _read_optional_csv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame(columns=list(columns))
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.ParserError as exc:
        raise HarnessError(f"cannot read {path}: {exc}") from None
    for column in columns:
        if column not in frame:
            frame[column] = ""
    return frame


def _with_run_and_keys(run: Run) -> pd.DataFrame:
    rows = run.rows.copy()
    rows["run"] = run.name
    for column in ("case", "shape", "dtype", "tied", "options", "logits", "implementation", "mode", "device", "note"):
        rows[column] = rows[column].fillna("").astype(str)
    for column in ("vocab", "hidden", "tokens"):
        rows[column] = pd.to_numeric(rows[column], errors="coerce")
    rows["value"] = pd.to_numeric(rows["value"], errors="coerce")
    return rows


def measurements(runs: list[Run]) -> pd.DataFrame:
    """One row per run x case x implementation x mode with a column per metric (ok cases only).

    When a run holds the same measurement twice (a resumed sweep), the later row wins. The
    ``series`` column names what a plot line or table column shows: the implementation, with the
    run added when several runs measured the same implementation.
    """
    frames = [_with_run_and_keys(run) for run in runs]
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    columns = [*MEASUREMENT_KEY, "series", *METRICS, "note"]
    if rows.empty:
        return pd.DataFrame(columns=[*columns, "speedup"])
    rows = rows[(rows["status"].isin(["ok", ""])) & (rows["metric"].isin(list(METRICS)))]
    if rows.empty:
        return pd.DataFrame(columns=[*columns, "speedup"])
    grouped = rows.groupby([*MEASUREMENT_KEY, "metric"], dropna=False, sort=False)
    wide = grouped["value"].last().unstack("metric").reset_index()
    for metric in METRICS:
        if metric not in wide:
            wide[metric] = float("nan")
    # The timer's noise warning and the like: on the time rows (the same on every metric row of a mode).
    notes = rows[rows["metric"] == "time_median"].groupby(MEASUREMENT_KEY, dropna=False, sort=False)["note"].last()
    wide = wide.merge(notes.rename("note").reset_index(), on=MEASUREMENT_KEY, how="left")
    wide["note"] = wide["note"].fillna("")
    wide["series"] = _series(wide, frames)
    wide["speedup"] = _speedup_over_baseline(wide)
    return wide[[*columns, "speedup"]]


def _speedup_over_baseline(wide: pd.DataFrame) -> pd.Series:
    """time of torch-eager / time of the implementation, for the same case and mode on the same device."""
    match = ["device", "case", "mode"]
    baseline = wide[wide["implementation"] == BASELINE].groupby(match, dropna=False)["time_median"].last()
    baseline = baseline.rename("baseline_time").reset_index()
    merged = wide[match + ["time_median"]].merge(baseline, on=match, how="left")
    return pd.Series((merged["baseline_time"] / merged["time_median"]).to_numpy(), index=wide.index)


def _series(frame: pd.DataFrame, frames: list[pd.DataFrame]) -> list[str]:
    """What names each row's implementation in plots and tables: its name, with the run added when
    several of the runs (``frames``) hold the same implementation."""
    runs = pd.concat([f[["implementation", "run"]] for f in frames], ignore_index=True)
    runs_per_impl = runs.groupby("implementation")["run"].nunique()
    shared = set(runs_per_impl[runs_per_impl > 1].index)
    return [f"{impl} [{run}]" if impl in shared else impl for impl, run in zip(frame["implementation"], frame["run"])]


FAILURE_COLUMNS = ["run", "device", *CASE_COLUMNS, "implementation", "series", "mode", "status", "reason"]


def failures(runs: list[Run]) -> pd.DataFrame:
    """Every case without numbers that stand, with its status and reason (one row per case x impl x
    mode): out of memory, timed out, crashed, raised an error, unsupported, or measured but ``wrong``."""
    frames = [_with_run_and_keys(run) for run in runs]
    columns = FAILURE_COLUMNS
    if not frames:
        return pd.DataFrame(columns=columns)
    rows = pd.concat(frames, ignore_index=True)
    bad = rows[(rows["metric"] == "status") | (~rows["status"].isin(["ok", ""]))]
    bad = bad.drop_duplicates(subset=["run", "case", "implementation", "mode", "status"], keep="last")
    bad = bad.assign(series=_series(bad, frames))
    return bad[columns].reset_index(drop=True)


def primary_mode(frame: pd.DataFrame) -> str | None:
    """The mode plots and summaries show: forward+backward when measured (what training runs)."""
    present = set(frame["mode"]) if not frame.empty else set()
    for mode in MODES_BY_PREFERENCE:
        if mode in present:
            return mode
    return sorted(present)[0] if present else None


def device_label(runs: list[Run]) -> str:
    """What figures say they were measured on, from each run's recorded environment."""
    labels = []
    for run in runs:
        label = run.meta.get("device_name") or run.meta.get("device")
        if not label and not run.rows.empty:
            label = ", ".join(sorted(set(run.rows["device"].dropna().astype(str)) - {""}))
        label = str(label or "unknown device")
        if label not in labels:
            labels.append(label)
    return "; ".join(labels)


def format_ms(value: float) -> str:
    if pd.isna(value):
        return "–"
    if value >= 100:
        return f"{value:.0f} ms"
    if value >= 1:
        return f"{value:.2f} ms"
    return f"{value * 1000:.0f} µs"


def format_bytes(value: float) -> str:
    if pd.isna(value):
        return "–"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} B"


def format_ratio(value: float, suffix: str = "×") -> str:
    return "–" if pd.isna(value) else f"{value:.2f}{suffix}"
