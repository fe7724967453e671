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
import datetime as dt
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from harness.errors import HarnessError
from harness.isolation import child_environment
from harness.results import RESULTS_DIR, new_run_id, read_meta, write_json_atomic
from harness.spec import DTYPES
from harness.sweep.cases import MODES, canonical_case_argument, load_cases, with_dtypes
from harness.sweep.distributed import Coordinator, Ranks, ranks_from_environment, shard, visible_device_for
from harness.sweep.environment import host_environment, memory_bytes
from harness.sweep.measure import TimingSettings
from harness.sweep.presets import PRESETS, DeviceDescription, choose_preset
from harness.sweep.rows import Job
from harness.sweep.runner import (
    SweepSettings,
    job_modes,
    measure_environment,
    plan_jobs,
    recorded_jobs,
    run_jobs,
)

EXPLICIT_CASES_TIMEOUT_S = 600  # per (case, implementation) when case files are given
MEMORY_LIMIT_FRACTION = 0.9  # default --max-memory: this share of the memory available at start
# Arguments stored in meta.json, so that --resume RUN alone re-creates the sweep.
RESUMABLE = ("cases", "impl", "dtype", "mode", "device", "preset", "timeout", "max_memory", "measure_time",
             "min_repeats")


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
                             f"it as oom (default: {MEMORY_LIMIT_FRACTION:.0%} of the memory available at start; 0: no limit)")
    parser.add_argument("--measure-time", type=float, metavar="SECONDS",
                        help="time spent on timed repetitions per mode (default: the preset's)")
    parser.add_argument("--min-repeats", type=int, metavar="N",
                        help="on a CPU, time at least N repetitions per mode (default: the preset's)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where runs are written (default: results)")
    parser.add_argument("--resume", metavar="RUN",
                        help="finish an interrupted run (run id or folder): skip what it recorded, append the rest")
    parser.add_argument("--no-report", action="store_true", help="do not build the report after a preset sweep")
    parser.add_argument("--dry-run", action="store_true", help="list the (case, implementation) jobs and stop")


def parse_device(text: str | None) -> tuple[str, int | None]:
    """("cpu", None) or ("cuda", index or None); HarnessError for anything else."""
    if text is None:
        return ("cuda", None) if torch.cuda.is_available() else ("cpu", None)
    kind, _, index = text.partition(":")
    if kind == "cpu" and not index:
        return "cpu", None
    if kind == "cuda" and (not index or index.isdigit()):
        if not torch.cuda.is_available():
            raise HarnessError(f"--device {text}: no CUDA GPU is available here (use --device cpu)")
        return "cuda", int(index) if index else None
    raise HarnessError(f"unknown device {text!r}; expected cpu, cuda or cuda:N")


def resolve_resume(name: str, results_dir: Path) -> Path:
    for candidate in (Path(name), Path(results_dir) / name):
        if (candidate / "meta.json").is_file():
            meta = read_meta(candidate)
            if meta.get("kind") != "sweep":
                raise HarnessError(f"--resume {name}: {candidate} is a {meta.get('kind')!r} run, not a sweep")
            if "arguments" not in meta:
                raise HarnessError(f"--resume {name}: {candidate}/meta.json has no sweep arguments to resume from")
            return candidate
    raise HarnessError(f"--resume {name}: no run folder {name} or {Path(results_dir) / name} (with a meta.json)")


def merged_arguments(args: argparse.Namespace, stored: dict) -> dict:
    """The sweep's arguments: the command line's, and for --resume the run's own where not given."""
    given = {key: getattr(args, key) for key in RESUMABLE}
    if given["cases"] == []:
        given["cases"] = None
    return {key: given[key] if given[key] is not None else stored.get(key) for key in RESUMABLE}


def new_run_dir(results_dir: Path) -> Path:
    """A fresh ``results/<run-id>`` (a suffix when two sweeps start within the same second)."""
    run_id = new_run_id()
    for attempt in range(1, 1000):
        candidate = Path(results_dir) / (run_id if attempt == 1 else f"{run_id}-{attempt}")
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            continue
    raise HarnessError(f"cannot create a new run folder under {results_dir}")


@dataclass(frozen=True)
class SweepPlan:
    """Everything a sweep will do, decided before anything runs."""

    jobs: list[Job]
    settings: SweepSettings
    dtypes: list[str]
    preset: str | None  # the preset's name when no case files were given
    arguments: dict  # stored in meta.json for --resume


def make_plan(args: argparse.Namespace, ranks: Ranks, resume_dir: Path | None) -> SweepPlan:
    """Cases, implementations, modes, device and limits from the command line (and the resumed run)."""
    choice = merged_arguments(args, read_meta(resume_dir)["arguments"] if resume_dir else {})
    kind, index = parse_device(choice["device"])
    if ranks.world_size > 1 and index is not None:
        raise HarnessError("under torchrun give --device cuda (each rank uses its local GPU), not cuda:N")
    preset = PRESETS[choice["preset"]] if choice["preset"] else choose_preset(DeviceDescription(kind=kind))
    is_preset_run = not choice["cases"]
    case_arguments = [canonical_case_argument(name) for name in (choice["cases"] or preset.case_files)]
    cases = load_cases(case_arguments)
    for name in choice["dtype"] or []:
        if name not in DTYPES:
            raise HarnessError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    if choice["dtype"]:
        cases = with_dtypes(cases, choice["dtype"])

    timing = TimingSettings(
        measure_time=choice["measure_time"] if choice["measure_time"] is not None else preset.timing.measure_time,
        min_repeats=choice["min_repeats"] if choice["min_repeats"] is not None else preset.timing.min_repeats,
        gpu_warmup=preset.timing.gpu_warmup,
    )
    if timing.measure_time <= 0 or timing.min_repeats < 1:
        raise HarnessError("--measure-time must be > 0 and --min-repeats >= 1")
    if choice["timeout"] is not None and choice["timeout"] <= 0:
        raise HarnessError("--timeout must be > 0 seconds")
    if choice["max_memory"] is not None and choice["max_memory"] < 0:
        raise HarnessError("--max-memory must be >= 0 GiB (0: no limit)")
    visible = None
    if kind == "cuda" and (ranks.world_size > 1 or index is not None):
        visible = visible_device_for(ranks.local_rank if ranks.world_size > 1 else index)
    settings = SweepSettings(
        modes=tuple(m for m in MODES if m in (choice["mode"] or MODES)),
        device=kind,
        timing=timing,
        timeout_s=choice["timeout"] or (preset.timeout_s if is_preset_run else EXPLICIT_CASES_TIMEOUT_S),
        max_memory_bytes=default_memory_limit() if choice["max_memory"] is None
        else int(choice["max_memory"] * 2**30) or None,
        child_env=child_environment(visible),
    )
    jobs = [job for job in plan_jobs(cases, choice["impl"]) if job_modes(job, settings)]
    arguments = {
        **choice,
        "device": choice["device"] or kind,  # a resumed run stays on the same kind of device
        "cases": None if is_preset_run else case_arguments,
        "preset": preset.name if is_preset_run else choice["preset"],
    }
    return SweepPlan(
        jobs=jobs,
        settings=settings,
        dtypes=sorted({job.case.dtype for job in jobs}),
        preset=preset.name if is_preset_run else None,
        arguments=arguments,
    )


def run(args: argparse.Namespace) -> int:
    ranks = ranks_from_environment()
    resume_dir = resolve_resume(args.resume, args.results_dir) if args.resume else None
    plan = make_plan(args, ranks, resume_dir)
    if args.dry_run:
        for job in plan.jobs:
            print(f"{job.implementation}\t{job.case.name}\t{','.join(job_modes(job, plan.settings))}\t{job.case.source}")
        print(f"{len(plan.jobs)} jobs")
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
        label = f"rank {ranks.rank}/{ranks.world_size}" if ranks.world_size > 1 else "sweep"
        counts = run_jobs(shard(todo, ranks), plan.settings, run_dir=run_dir, run_id=run_dir.name,
                          device_name=shared["device_name"], matmul_tflops=shared["matmul_tflops"], label=label,
                          console=console)
        console.print(f"{label}: {counts.jobs} jobs; results per mode: {dict(counts.statuses)}", highlight=False)
        coordinator.wait_for_all()
        if ranks.is_leader:
            finish_run(run_dir)
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


def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")


def default_memory_limit() -> int | None:
    available = memory_bytes("MemAvailable")
    if available is None:
        return None
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return int(available * MEMORY_LIMIT_FRACTION / max(1, local_processes))


def start_run(plan: SweepPlan, resume_dir: Path | None, results_dir: Path, ranks: Ranks, console: Console) -> dict:
    """Leader only: create (or reopen) the run folder, describe the device, write meta.json."""
    settings = plan.settings
    if resume_dir is not None:
        meta = read_meta(resume_dir)
        rates = dict(meta.get("matmul_tflops") or {})
        missing = [d for d in plan.dtypes if d not in rates]
        if missing:
            rates.update(measure_environment(settings, missing)["matmul_tflops"])
        meta["matmul_tflops"] = rates
        meta.setdefault("resumed", []).append(
            {"time": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
             "command": host_environment()["command"], "arguments": plan.arguments}
        )
        write_json_atomic(resume_dir / "meta.json", meta)
        return {"run_dir": str(resume_dir), "device_name": meta["device_name"], "matmul_tflops": rates}

    console.print(f"measuring the device's matmul rate ({', '.join(plan.dtypes)})...", highlight=False)
    device = measure_environment(settings, plan.dtypes)
    run_dir = new_run_dir(results_dir)
    environment = device["environment"]
    meta = {
        "kind": "sweep",
        "run_id": run_dir.name,
        **host_environment(),
        **environment,
        "device": environment["device_name"],
        "matmul_tflops": device["matmul_tflops"],
        "matmul_failures": device["matmul_failures"],
        "preset": plan.preset,
        "modes": list(settings.modes),
        "timing": settings.timing.to_json(),
        "timeout_s": settings.timeout_s,
        "max_memory_bytes": settings.max_memory_bytes,
        "world_size": ranks.world_size,
        "arguments": plan.arguments,
        "finished": None,
    }
    write_json_atomic(run_dir / "meta.json", meta)
    return {"run_dir": str(run_dir), "device_name": environment["device_name"], "matmul_tflops": device["matmul_tflops"]}


def finish_run(run_dir: Path) -> None:
    meta = read_meta(run_dir)
    meta["finished"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    write_json_atomic(run_dir / "meta.json", meta)


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
