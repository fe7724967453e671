"""The results folder: one run is ``results/<run-id>/``, written as it is produced.

A run folder holds:

- ``meta.json``: ``"kind"`` (``"sweep"`` or ``"check"``) and the run's environment (device, versions, git commit, host, time, command line),
  written when the run starts and updated (atomically) with figures measured once per run, such
  as the device's matmul rate. ``"finished"`` is the time the run completed (``mark_run_finished``);
  a run without it was interrupted (or predates the mark).
- ``rows.csv``: the tidy long-format table, one row per case x implementation x mode x metric
  (``ROW_COLUMNS``). Rows are appended and flushed to disk as each case finishes, so a crash,
  an OOM, a timeout or Ctrl-C loses nothing already measured. A case that did not produce
  numbers has one row with ``metric = "status"``, its ``status`` and its ``reason``.
A check run (``python -m harness check``, kind ``"check"``) holds ``properties.csv``
(``PROPERTY_COLUMNS``: with the cases each property refused at run time, and the traceback of an
error an implementation raised), ``precision.csv``
(``PRECISION_COLUMNS``), ``not_checked.csv`` (``NOT_CHECKED_COLUMNS``: the dtypes, reductions and
options each implementation does not support here) and ``behaviour.csv`` (``BEHAVIOUR_COLUMNS``)
beside its ``meta.json``.
"""

from __future__ import annotations

import csv
import fcntl
import datetime as dt
import json
import os
import tempfile
from pathlib import Path

import pandas as pd

from harness.baseline import BASELINE  # noqa: F401 - speed-ups in reports are over it
from harness.errors import HarnessError

RESULTS_DIR = Path("results")

# What one timed call of a sweep does (see harness.sweep.measure).
MODES = ("forward", "forward_backward", "backward")

ROW_COLUMNS = (
    "run_id",
    "case",  # unique case name, e.g. "llama3-8b/N=8192/bfloat16"
    "shape",  # the model / shape family, e.g. "llama3-8b" or "vocab-sweep"
    "vocab",
    "hidden",
    "tokens",
    "dtype",
    "tied",
    "options",  # LossSpec.describe() plus ", bias" when a bias is used
    "logits",  # the inputs: random (near-uniform softmax) or peaked (harness.case.make_inputs)
    "implementation",
    "mode",  # forward | forward_backward | backward
    "metric",  # see METRICS, or "status" for a case that produced no numbers
    "value",
    "unit",
    "status",  # ok | wrong | unsupported | oom | timeout | crash | error
    "reason",  # why a case has no numbers, or why its numbers are wrong
    "device",
    "note",  # about numbers that stand: the timer's noise warning, a verification that could not run
)

# Columns added after runs were committed, with the value every row of an older run had.
COLUMNS_ADDED_SINCE = {"logits": "random", "note": ""}

# Only distributed implementations' jobs (torchrun) have these; their peak_memory is the largest rank's.
DISTRIBUTED_METRICS = {
    "comm_bytes": "bytes",  # handed to collectives in one call by the busiest rank
    "comm_calls": "count",  # collectives that rank issued in one call
    "world_size": "ranks",
    **{f"peak_memory_rank{rank}": "bytes" for rank in range(8)},
}

# metric name -> unit
METRICS = {
    "time_median": "ms",
    "time_p20": "ms",
    "time_p80": "ms",
    "first_call": "ms",  # first call, compilation and autotuning included
    "peak_memory": "bytes",  # above the baseline of the inputs already in place
    "tflops": "TFLOP/s",  # from 2*N*D*V (forward) or 6*N*D*V (forward+backward)
    "matmul_fraction": "ratio",  # tflops / the device's measured matmul rate in this dtype
    "memory_over_lower_bound": "ratio",  # peak / (bytes of grad_hidden + grad_weight)
    "memory_over_logits": "ratio",  # peak / (bytes of the N x V logits in the input dtype)
    **DISTRIBUTED_METRICS,
}

# wrong: measured, but its result did not match torch-eager's on the same inputs (harness.sweep.verify).
STATUSES = ("ok", "wrong", "unsupported", "oom", "timeout", "crash", "error")

# traceback: of an error the implementation raised (or the end of the output of a process that died).
PROPERTY_COLUMNS = ("implementation", "property", "status", "examples", "refused", "seconds", "detail", "reproducer",
                    "traceback")
BEHAVIOUR_COLUMNS = ("implementation", "edge_case", "behaviour", "detail")
# Per implementation x property x dtype x tensor: its worst error as a multiple of torch-eager's.
PRECISION_COLUMNS = ("implementation", "property", "dtype", "tensor", "budget_ratio", "ratio", "error", "eager_error",
                     "case")
# What was not checked: per implementation, each dtype, reduction or option it does not support here.
NOT_CHECKED_COLUMNS = ("implementation", "what", "reason")


def new_run_id(now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now()
    return now.strftime("%Y%m%d-%H%M%S")


def new_run_dir(results_dir: Path, suffix: str = "") -> Path:
    """A fresh ``<results_dir>/<run-id><suffix>`` (numbered when two runs start within the same second)."""
    base = new_run_id() + suffix
    for attempt in range(1, 1000):
        candidate = Path(results_dir) / (base if attempt == 1 else f"{base}-{attempt}")
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            continue
    raise HarnessError(f"cannot create a new run folder under {results_dir}")


def write_json_atomic(path: Path, data: dict) -> None:
    """Replace ``path`` with ``data`` so that a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


class RowWriter:
    """Appends rows to a CSV file, flushing each batch to disk; creates the header when new.

    Appends hold an exclusive lock, so several processes (one per GPU under torchrun) can share
    one run's file.
    """

    def __init__(self, path: Path, columns: tuple[str, ...] = ROW_COLUMNS):
        self.path = Path(path)
        self.columns = columns
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, rows: list[dict]) -> None:
        if not rows:
            return
        with open(self.path, "a+", newline="") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            new_file = handle.tell() == 0
            columns = self.columns
            if not new_file:  # a resumed older run keeps its own header (see COLUMNS_ADDED_SINCE)
                handle.seek(0)
                columns = tuple(next(csv.reader(handle)))
                handle.seek(0, os.SEEK_END)
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            for row in rows:
                writer.writerow({column: row.get(column, "") for column in columns})
            handle.flush()
            os.fsync(handle.fileno())


def read_rows(run_dir: Path) -> pd.DataFrame:
    """The rows of one run (empty frame with the right columns when it has none yet)."""
    path = Path(run_dir) / "rows.csv"
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame(columns=list(ROW_COLUMNS))
    text_columns = ("run_id", "case", "shape", "dtype", "options", "logits", "implementation", "mode", "metric",
                    "unit", "status", "reason", "device", "note")
    # Text columns are read as text, empty as "": a column that is empty in every row stays a string.
    rows = pd.read_csv(
        path,
        dtype={column: str for column in text_columns},
        keep_default_na=False,
        na_values={column: [""] for column in ROW_COLUMNS if column not in text_columns},
    )
    for column, value in COLUMNS_ADDED_SINCE.items():
        if column not in rows.columns:
            rows[column] = value
    return rows


def mark_run_finished(run_dir: Path) -> str:
    """Record in ``meta.json`` that the run completed (``"finished"``: the time); returns the time.

    Called last by every command that writes a run, and only when it was not interrupted: a report
    reads a run without the mark as incomplete.
    """
    meta = read_meta(run_dir)
    meta["finished"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    write_json_atomic(Path(run_dir) / "meta.json", meta)
    return meta["finished"]


def run_finished(meta: dict) -> bool:
    """Whether a run's ``meta.json`` carries the mark of a completed run."""
    return bool(meta.get("finished"))


def read_meta(run_dir: Path) -> dict:
    path = Path(run_dir) / "meta.json"
    return json.loads(path.read_text()) if path.exists() else {}


def list_runs(results_dir: Path = RESULTS_DIR, kind: str | None = None) -> list[Path]:
    """Run folders (those with a meta.json), oldest first by run id; ``kind`` is "sweep" or "check"."""
    if not Path(results_dir).is_dir():
        return []
    runs = sorted(p for p in Path(results_dir).iterdir() if (p / "meta.json").exists())
    return [p for p in runs if kind is None or read_meta(p).get("kind") == kind]


def latest_run(results_dir: Path = RESULTS_DIR, kind: str | None = None) -> Path | None:
    runs = list_runs(results_dir, kind)
    return runs[-1] if runs else None
