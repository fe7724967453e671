"""``python -m harness sweep [CASES ...] [--impl ...] [--device ...] [--dtype ...]``.

With no CASES it runs the preset for the machine it finds (see ``harness.sweep.presets``) and
then builds the report, so that one command leaves something to look at. Each (case,
implementation) runs in its own process with a time limit; its rows are appended to
``results/<run-id>/rows.csv`` as soon as it finishes, and ``--resume RUN`` completes a run that
was interrupted without repeating what it already recorded.

Under ``torchrun --nproc-per-node K -m harness sweep ...`` the jobs are spread over K GPUs and
written to one run (see ``harness.sweep.distributed``).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from harness.isolation import MEMORY_LIMIT_FRACTION
from harness.results import MODES, RESULTS_DIR
from harness.spec import DTYPES
from harness.sweep.distributed import Coordinator, ranks_from_environment, shard
from harness import machine_load as load
from harness.sweep.plan import (
    EXPLICIT_CASES_TIMEOUT_S,
    finish_run,
    make_plan,
    record_load,
    resolve_resume,
    start_run,
)
from harness.sweep.presets import PRESETS
from harness.sweep.runner import job_modes, recorded_jobs, run_jobs


EXAMPLES = """\
examples:
  python -m harness sweep                      the preset for this machine, then its report
  python -m harness sweep --dry-run            list the jobs the preset would run, and stop
  python -m harness sweep models --impl torch-eager --impl chunked
                                               two implementations on the real model heads
  python -m harness sweep models:llama3-8b --dtype float32
                                               one entry of cases/models.toml, in float32
  python -m harness sweep sweep_vocab --impl mypkg.heads:my_loss --out /tmp/results
                                               a plugin on the vocabulary sweep, into /tmp/results
  python -m harness sweep --resume 20261207-101500
                                               finish an interrupted run

Case files: docs/case-files.md. Each job is checked against torch-eager on the inputs it timed
(a mismatch is 'wrong'), and the machine's load is checked at the start and the end.
"""


class DeprecatedAlias(argparse.Action):
    """``--results-dir``: the sweep's older name of ``--out``, still accepted, with a note."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"note: {option_string} is deprecated; use --out (the name check uses)", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "cases", nargs="*", metavar="CASES",
        help="case files: paths, or names of files in cases/ (e.g. models, sweep_vocab); FILE:ENTRY keeps "
             "only the named entries. Default: the preset for this machine, followed by the report",
    )
    parser.add_argument("--impl", action="append", metavar="NAME",
                        help="implementation to run, built-in name or package.module:attr (repeatable; "
                             "default: those the case file names, else every built-in)")
    parser.add_argument("--dtype", action="append", metavar="DTYPE",
                        help=f"run every case in this dtype instead ({', '.join(DTYPES)}; repeatable)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is a GPU, else cpu)")
    parser.add_argument("--mode", action="append", choices=MODES,
                        help="modes to measure (repeatable; default: all three)")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="run this preset instead of the one chosen for the machine")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="time limit of each (case, implementation) process, compilation included "
                             f"(default: the preset's, or {EXPLICIT_CASES_TIMEOUT_S} s with CASES)")
    parser.add_argument("--max-memory", type=float, metavar="GIB",
                        help="stop a case whose process holds more resident host memory than this and record "
                             f"it as oom (default: {MEMORY_LIMIT_FRACTION * 100:.0f}%% of the memory available at start; 0: no limit)")
    parser.add_argument("--measure-time", type=float, metavar="SECONDS",
                        help="time spent on timed repetitions per mode (default: the preset's)")
    parser.add_argument("--min-repeats", type=int, metavar="N",
                        help="time at least N repetitions per mode, however slow a call (default: the preset's)")
    parser.add_argument("--nproc-per-node", type=int, metavar="P",
                        help="ranks of each job of a distributed (vocab-parallel) implementation, started with "
                             "torchrun --nproc-per-node P (default: 2)")
    parser.add_argument("--out", dest="results_dir", type=Path, default=RESULTS_DIR, metavar="DIR",
                        help="results folder the run is written into, as check's --out (default: results)")
    parser.add_argument("--results-dir", dest="results_dir", type=Path, action=DeprecatedAlias, help=argparse.SUPPRESS)
    parser.add_argument("--resume", metavar="RUN",
                        help="finish an interrupted run (run id or folder): skip what it recorded, append the rest")
    parser.add_argument("--no-report", action="store_true", help="do not build the report after a preset sweep")
    parser.add_argument("--dry-run", action="store_true", help="list the (case, implementation) jobs and stop")


def run(args: argparse.Namespace) -> int:
    ranks = ranks_from_environment()
    resume_dir = resolve_resume(args.resume, args.results_dir) if args.resume else None
    plan = make_plan(args, ranks, resume_dir)
    if args.dry_run:
        for job in plan.jobs:
            print(f"{job.implementation}\t{job.case.name}\t{','.join(job_modes(job, plan.settings))}\t{job.case.source}")
        print(f"{len(plan.jobs)} jobs")
        print_excluded(plan.excluded)
        return 0

    console = Console(stderr=True)
    previous_handler = signal.signal(signal.SIGTERM, _stop_on_sigterm)  # stop the running case's process too
    # Ctrl-C must stop the sweep (and keep what it measured) whatever disposition it inherited: a
    # shell starts background jobs (`nohup ... &`) with SIGINT ignored, and Python keeps that.
    previous_interrupt = signal.signal(signal.SIGINT, signal.default_int_handler)
    coordinator = Coordinator(ranks)
    run_dir = None
    try:
        shared = start_run(plan, resume_dir, args.results_dir, ranks, console) if ranks.is_leader else None
        shared = coordinator.share(shared)
        run_dir = Path(shared["run_dir"])
        done = recorded_jobs(run_dir)
        coordinator.wait_for_all()  # every rank has read what is done before any rank appends
        todo = [job for job in plan.jobs if job.key not in done]
        if ranks.is_leader:
            skipped = f", {len(plan.jobs) - len(todo)} already recorded" if done else ""
            spread = f" over {ranks.world_size} processes" if ranks.world_size > 1 else ""
            console.print(f"run {run_dir} on {shared['device_name']}: {len(todo)} jobs{skipped}{spread}",
                          highlight=False)
            print_excluded(plan.excluded, console)
        label = f"rank {ranks.rank}/{ranks.world_size}" if ranks.world_size > 1 else "sweep"
        counts = run_jobs(shard(todo, ranks), plan.settings, run_dir=run_dir, run_id=run_dir.name,
                          device_name=shared["device_name"], matmul_tflops=shared["matmul_tflops"], label=label,
                          console=console)
        console.print(counts.sentence(label), highlight=False)
        coordinator.wait_for_all()
        if ranks.is_leader:
            meta = record_load(run_dir, plan.settings, counts.probes)
            finish_run(run_dir)
            loaded = load.warning(meta)
            if loaded:
                console.print(f"[bold yellow]WARNING[/]: {escape(loaded)}", highlight=False)
            else:
                console.print(load.summary(meta), highlight=False)
            print(f"results: {run_dir}")
            if plan.preset and not args.no_report:
                build_report(run_dir)
            elif not plan.preset:
                print(f"report: python -m harness report {run_dir}")
    except KeyboardInterrupt:
        if ranks.is_leader and run_dir is not None:
            console.print(f"interrupted; everything measured so far is in {run_dir}. "
                          f"Finish it with: python -m harness sweep --resume {run_dir}", highlight=False)
        raise
    finally:
        coordinator.close()
        signal.signal(signal.SIGTERM, previous_handler)
        signal.signal(signal.SIGINT, previous_interrupt)
    return 0


def print_excluded(excluded: dict[str, str], console: Console | None = None) -> None:
    """One line per implementation the preset leaves out, with why."""
    for name, why in excluded.items():
        line = f"left out of the preset: {name}: {why} (run it with --impl {name})"
        if console is None:
            print(line)
        else:
            console.print(escape(line), highlight=False)


def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")


def build_report(run_dir: Path) -> None:
    try:
        from harness.report.command import build_report as build
    except ImportError as exc:
        print(f"report not built ({exc}); install the report extra: pip install 'lmhead-bench[report]'")
        return
    try:
        path = build([run_dir])
    except ImportError as exc:  # seaborn / matplotlib imported lazily by the report
        print(f"report not built ({exc}); install the report extra: pip install 'lmhead-bench[report]'")
        return
    print(f"report: {path}")
