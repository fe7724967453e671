"""What a sweep will do and where it writes: the plan from the command line (and a resumed run's
own arguments), and the run folder's ``meta.json`` at the start and the end of the run (with the
load check's readings and judgement: ``harness.machine_load``)."""

from __future__ import annotations

import argparse
import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from harness.environment import host_environment, memory_bytes
from harness.errors import HarnessError
from harness.isolation import MEMORY_LIMIT_FRACTION, child_environment
from harness.results import MODES, mark_run_finished, new_run_dir, read_meta, write_json_atomic
from harness.spec import DTYPES
from harness.sweep.cases import canonical_case_argument, load_cases, with_dtypes
from harness.sweep.distributed import Ranks, visible_device_for
from harness.sweep.measure import TimingSettings
from harness.sweep.presets import PRESETS, DeviceDescription, choose_preset
from harness.sweep.rows import Job
from harness.machine_load import busy_cores, judge, load_average, probe_record
from harness.sweep.runner import (
    COMPILE_CACHES,
    SweepSettings,
    job_modes,
    measure_environment,
    measure_probe,
    plan_jobs,
)

EXPLICIT_CASES_TIMEOUT_S = 600  # per (case, implementation) when case files are given
# Arguments stored in meta.json, so that --resume RUN alone re-creates the sweep.
RESUMABLE = ("cases", "impl", "dtype", "mode", "device", "preset", "timeout", "max_memory", "measure_time",
             "min_repeats", "nproc_per_node")


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


@dataclass(frozen=True)
class SweepPlan:
    """Everything a sweep will do, decided before anything runs."""

    jobs: list[Job]
    settings: SweepSettings
    dtypes: list[str]
    preset: str | None  # the preset's name when no case files were given
    arguments: dict  # stored in meta.json for --resume
    excluded: dict[str, str] = field(default_factory=dict)  # implementation -> why the preset skips it


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
    if choice["nproc_per_node"] is not None and choice["nproc_per_node"] < 1:
        raise HarnessError("--nproc-per-node must be at least 1")
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
        world_size=choice["nproc_per_node"] or 2,
    )
    jobs = [job for job in plan_jobs(cases, choice["impl"]) if job_modes(job, settings)]
    # A preset leaves out what cannot run with the pinned packages, unless --impl names it.
    excluded = {name: why for name, why in preset.excluded} if is_preset_run and not choice["impl"] else {}
    excluded = {name: why for name, why in excluded.items() if any(job.implementation == name for job in jobs)}
    jobs = [job for job in jobs if job.implementation not in excluded]
    arguments = {
        **choice,
        "device": choice["device"] or kind,  # a resumed run stays on the same kind of device
        "cases": None if is_preset_run else case_arguments,
        "preset": preset.name if is_preset_run else choice["preset"],
    }
    return SweepPlan(
        jobs=jobs,
        settings=settings,
        dtypes=sorted({job.case.case.dtype for job in jobs}),
        preset=preset.name if is_preset_run else None,
        arguments=arguments,
        excluded=excluded,
    )


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
            measured = measure_environment(settings, missing)
            rates.update(measured["matmul_tflops"])
            meta["matmul_routines"] = {**meta.get("matmul_routines", {}), **measured["matmul_routines"]}
        meta["matmul_tflops"] = rates
        probes = (meta.get("load") or {}).get("probes", []) + [probe_record("resumed", measure_probe(settings))]
        meta["load"] = judge(probes, device_kind=settings.device, cpu_count=os.cpu_count())
        meta.setdefault("resumed", []).append(
            {"time": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
             "command": host_environment()["command"], "arguments": plan.arguments}
        )
        write_json_atomic(resume_dir / "meta.json", meta)
        return {"run_dir": str(resume_dir), "device_name": meta["device_name"], "matmul_tflops": rates}

    console.print(f"measuring the device's matmul rate ({', '.join(plan.dtypes)})...", highlight=False)
    # Before the sweep's own processes add to them; the busy cores are judged on a CPU alone (2 s).
    load_before, busy_before = load_average(), busy_cores() if settings.device == "cpu" else None
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
        "matmul_routines": device["matmul_routines"],
        "matmul_failures": device["matmul_failures"],
        "preset": plan.preset,
        "modes": list(settings.modes),
        "timing": settings.timing.to_json(),
        "compile_caches": COMPILE_CACHES,
        "timeout_s": settings.timeout_s,
        "max_memory_bytes": settings.max_memory_bytes,
        "world_size": ranks.world_size,
        "arguments": plan.arguments,
        "excluded": plan.excluded,
        # cases measured beside CPU-bound companion processes of their own (the case file's companions)
        "companions": {job.case.name: job.case.companions for job in plan.jobs if job.case.companions},
        "companion_sessions": {job.case.name: job.case.companion_session for job in plan.jobs if job.case.companions},
        "load": judge([probe_record("start", device["probe"].get("tflops"), load_before, busy=busy_before)],
                      device_kind=settings.device, cpu_count=os.cpu_count()),
        "finished": None,
    }
    write_json_atomic(run_dir / "meta.json", meta)
    return {"run_dir": str(run_dir), "device_name": environment["device_name"], "matmul_tflops": device["matmul_tflops"]}


def record_load(run_dir: Path, settings: SweepSettings, probes: list[dict]) -> dict:
    """Leader only: the load check's readings between jobs and at the end into meta.json, judged."""
    meta = read_meta(run_dir)
    readings = (meta.get("load") or {}).get("probes", []) + probes + [probe_record("end", measure_probe(settings))]
    meta["load"] = judge(readings, device_kind=settings.device, cpu_count=os.cpu_count())
    write_json_atomic(run_dir / "meta.json", meta)
    return meta


def finish_run(run_dir: Path) -> None:
    mark_run_finished(run_dir)
