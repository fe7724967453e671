"""``python -m harness report [RUN ...] [--out reports/NAME] [--check RUN]``.

Builds, for one or more runs (default: the latest sweep), a folder with the seaborn figures as
PNG files, a self-contained ``index.html`` dashboard and a ``summary.md`` for a pull-request comment.
Its correctness section comes from a check run in the same results folder of the sweep's commit
and device (``harness.report.checks``), or from the check run ``--check`` names.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.errors import HarnessError
from harness.report import plots as plotting
from harness.report.dashboard import write_dashboard
from harness.report.markdown import write_summary
from harness.report.checks import choose_check
from harness.report.runs import (
    device_label,
    failures,
    load_run,
    measurements,
    primary_mode,
    resolve_run,
)
from harness.results import RESULTS_DIR, latest_run

REPORTS_DIR = Path("reports")


EXAMPLES = """\
examples:
  python -m harness report                      the latest sweep in results/, into reports/<run id>/
  python -m harness report 20261207-101500      one sweep, by run id (or give its folder)
  python -m harness report RUN_A RUN_B --out reports/a-vs-b
                                                two sweeps in one dashboard, side by side
  python -m harness report RUN --check 20261207-093000-check
                                                with that check run's correctness section

The dashboard (index.html) opens in any browser; summary.md fits a pull-request comment.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("runs", nargs="*", metavar="RUN", help="run folders or run ids (default: the latest sweep)")
    parser.add_argument("--out", type=Path, help="output folder (default: reports/<run id of the last run>)")
    parser.add_argument("--check", metavar="RUN", help="check run to include, whatever it is (default: one beside the runs of the sweep's commit and "
                             "device, if any)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where run ids are looked up")


def build_report(run_dirs: list[Path], out_dir: Path | None = None, check_dir: Path | None = None) -> Path:
    """Write the report for ``run_dirs`` into ``out_dir`` and return the path of its ``index.html``.

    ``out_dir`` defaults to ``reports/<run id of the last run>/``. A check run among ``run_dirs``, or
    ``check_dir``, feeds the correctness section as given; otherwise a check run beside the last
    run that matches the sweep's commit and device, if there is one.
    """
    if not run_dirs:
        raise HarnessError("no run to report on")
    loaded = [load_run(Path(path)) for path in run_dirs]
    sweeps = [run for run in loaded if run.kind != "check"]
    checks = [Path(run.path) for run in loaded if run.kind == "check"]
    explicit = check_dir or (checks[-1] if checks else None)
    if explicit is not None and load_run(Path(explicit)).kind != "check":
        raise HarnessError(f"{explicit} is a {load_run(Path(explicit)).kind} run, not a check run")
    check = choose_check(sweeps, Path(run_dirs[-1]).parent, explicit)

    out_dir = Path(out_dir) if out_dir is not None else REPORTS_DIR / loaded[-1].name
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = measurements(sweeps)
    failed = failures(sweeps)
    device = device_label(sweeps) if sweeps else device_label([check.check.run])
    mode = primary_mode(frame)
    figures = plotting.draw_all(frame, device, out_dir, failed)
    for figure in figures:
        if figure.path is None:  # don't leave a stale figure from an earlier report in this folder
            (out_dir / f"{figure.name}.png").unlink(missing_ok=True)

    index = write_dashboard(
        out_dir / "index.html", runs=sweeps, device=device, frame=frame, failures=failed,
        plots=figures, check=check, mode=mode,
    )
    write_summary(
        out_dir / "summary.md", runs=sweeps or [check.check.run], device=device, frame=frame, failures=failed,
        mode=mode, dashboard=index,
    )
    return index


def run(args: argparse.Namespace) -> int:
    if args.runs:
        run_dirs = [resolve_run(name, args.results_dir) for name in args.runs]
    else:
        latest = latest_run(args.results_dir, kind="sweep")
        if latest is None:
            raise HarnessError(
                f"no sweep run in {args.results_dir}/; run `python -m harness sweep` first or name a run folder"
            )
        run_dirs = [latest]
    check_dir = resolve_run(args.check, args.results_dir) if args.check else None
    index = build_report(run_dirs, args.out, check_dir)
    print(f"dashboard: {index}")
    print(f"summary:   {index.parent / 'summary.md'}")
    return 0
