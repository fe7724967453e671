"""Run a sweep: plan the (case, implementation) jobs, run each in its own process, append its rows.

Rows are appended to ``rows.csv`` as each job finishes, so an interrupted sweep keeps every job
already done, and ``resume`` skips exactly those (whatever their status).
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from harness.errors import HarnessError
from harness.isolation import ChildOutcome, Limits, run_child
from harness.quiet import Captured, captured
from harness.registry import resolve, resolve_many
from harness.results import RowWriter, read_rows
from harness.sweep.cases import SweepCase
from harness.machine_load import companion_processes, probe_record
from harness.sweep.measure import TimingSettings
from harness.sweep.rows import Job, job_rows, mode_results

FAILURE_STATUSES = ("wrong", "oom", "timeout", "crash", "error")
# Each job compiles into caches of its own, so its first_call is a cold compilation whatever ran
# before it: with shared caches it read cold for the first job to compile a kernel and warm for the
# next ones, depending on the order of the jobs. Recorded in meta.json.
COMPILE_CACHES = "per job: first_call includes cold Triton and inductor compilation"
# The time limit of the sweep's own jobs (the device's description and matmul rates, the load
# check's last reading): they are no case, and a short --timeout meant for cases must not stop them.
SETUP_TIMEOUT_S = 300


@dataclass(frozen=True)
class SweepSettings:
    """How every job of a sweep is run."""

    modes: tuple[str, ...]
    device: str  # what the children use: "cpu" or "cuda" (pinned through CUDA_VISIBLE_DEVICES)
    timing: TimingSettings
    timeout_s: float
    max_memory_bytes: int | None
    child_env: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    world_size: int = 2  # ranks of a distributed implementation's job (torchrun --nproc-per-node)


@dataclass
class SweepCounts:
    jobs: int = 0
    statuses: collections.Counter = field(default_factory=collections.Counter)  # per mode
    probes: list[dict] = field(default_factory=list)  # the load check's readings (harness.machine_load)

    @property
    def failed(self) -> int:
        return sum(self.statuses[s] for s in FAILURE_STATUSES)

    def sentence(self, label: str = "sweep") -> str:
        """What the jobs gave, as one sentence: "sweep: 40 jobs; 55 modes measured, 1 timed out, ..."."""
        words = {"ok": "measured", "wrong": "wrong (did not match torch-eager)", "unsupported": "unsupported here",
                 "oom": "out of memory", "timeout": "timed out", "crash": "crashed", "error": "raised an error"}
        parts = [f"{self.statuses[s]} {words[s]}" for s in words if self.statuses[s]]
        parts += [f"{n} {s}" for s, n in sorted(self.statuses.items()) if s not in words]
        modes = sum(self.statuses.values())
        jobs = f"{self.jobs} job{'s' if self.jobs != 1 else ''}"
        if not modes:
            return f"{label}: {jobs}, nothing measured."
        return f"{label}: {jobs}; of their {modes} modes, " + _enumerate(parts) + "."


def _enumerate(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def plan_jobs(cases: list[SweepCase], implementations: list[str] | None) -> list[Job]:
    """Every (case, implementation) pair; ``implementations`` (from --impl) overrides the case files."""
    resolved: dict[str, str] = {}  # reference -> implementation name

    def name_of(reference: str, where: str) -> str:
        if reference not in resolved:
            try:
                resolved[reference] = resolve(reference).name
            except HarnessError as exc:
                raise HarnessError(f"{where}: {exc}") from None
        return resolved[reference]

    if implementations:
        references = [(ref, name_of(ref, "--impl")) for ref in implementations]
    else:
        references = [(impl.name, impl.name) for impl in resolve_many(None)]
    jobs, seen = [], set()
    for case in cases:
        if case.implementations is not None and not implementations:
            where = f"{case.source}: entry {case.entry!r}"
            pairs = [(ref, name_of(ref, where)) for ref in case.implementations]
        else:
            pairs = references
        for reference, name in pairs:
            if (case.name, name) not in seen:
                seen.add((case.name, name))
                jobs.append(Job(case=case, implementation=name, reference=reference))
    return jobs


def job_modes(job: Job, settings: SweepSettings) -> list[str]:
    """The sweep's modes, narrowed to those the case's entry names (if it names any)."""
    return [mode for mode in settings.modes if job.case.modes is None or mode in job.case.modes]


def unsupported_modes(job: Job, modes: list[str]) -> dict[str, dict]:
    """The results of the modes the implementation says it has no such thing as (unsupported)."""
    declared = resolve(job.reference).unsupported_modes
    return {mode: {"status": "unsupported", "reason": declared[mode]} for mode in modes if mode in declared}


def declared_unsupported(job: Job, device: str) -> str | None:
    """Why the implementation says it cannot run this case here (availability, dtype, options), or None.

    Checked in the sweep process so that such a case costs no worker process; the worker checks
    again, and an implementation that only finds out while running still reports unsupported.
    The peer packages' import warnings are kept out of the sweep's output (``harness.quiet``).
    """
    with captured(Captured()):
        return job.case.case.unsupported_reason(resolve(job.reference), device)


def recorded_jobs(run_dir: Path) -> set[tuple[str, str]]:
    """(case, implementation) pairs that already have rows in a run, whatever their status."""
    rows = read_rows(run_dir)
    return set(zip(rows["case"].astype(str), rows["implementation"].astype(str)))


def run_job(job: dict, settings: SweepSettings, reference: str | None = None,
            env: dict[str, str] | None = None, timeout_s: float | None = None) -> ChildOutcome:
    """One job in a fresh ``harness.sweep.worker`` process, within the sweep's limits (``env``: the
    child's environment, the sweep's by default).

    An implementation that runs as P ranks (the ``distributed`` family) names its own job module
    (``torchrun_module``), which becomes torchrun in the same process: the limits cover its ranks.
    """
    limits = Limits(timeout_s=timeout_s or settings.timeout_s, max_memory_bytes=settings.max_memory_bytes)
    module = None if reference is None else getattr(resolve(reference), "torchrun_module", None)
    if module is not None:
        job = {**job, "world_size": settings.world_size}
        return run_child(module, [f"--nproc-per-node={settings.world_size}"], limits=limits,
                         stdin=json.dumps(job), env=env or settings.child_env)
    return run_child("harness.sweep.worker", [], limits=limits, stdin=json.dumps(job), env=env or settings.child_env)


def job_environment(env: dict[str, str], cache_dir: str) -> dict[str, str]:
    """``env`` with Triton's and inductor's on-disk caches in ``cache_dir`` (one per job)."""
    return {**env, "TRITON_CACHE_DIR": os.path.join(cache_dir, "triton"),
            "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache_dir, "inductor")}


def measure_environment(settings: SweepSettings, dtypes: list[str]) -> dict:
    """The device's description and matmul rate per dtype, measured in a child like a case, with
    the load check's first reading (``probe``)."""
    job = {"kind": "environment", "device": settings.device, "dtypes": dtypes, "timing": settings.timing.to_json()}
    outcome = run_job(job, settings, timeout_s=max(settings.timeout_s, SETUP_TIMEOUT_S))
    for message in outcome.messages:
        if message.get("event") == "environment":
            return {**message, "probe": probe_message(outcome) or {}}
    status, reason = outcome.failure or ("error", "no result")
    raise HarnessError(f"could not describe the device {settings.device!r} ({status}): {reason}")


def probe_message(outcome: ChildOutcome) -> dict | None:
    """The load check's reading a child sent, if any."""
    return next((m for m in outcome.messages if m.get("event") == "probe"), None)


def measure_probe(settings: SweepSettings) -> float | None:
    """The load check's matmul rate, measured in a child of its own (None when it failed)."""
    job = {"kind": "probe", "device": settings.device}
    message = probe_message(run_job(job, settings, timeout_s=max(settings.timeout_s, SETUP_TIMEOUT_S)))
    return None if message is None else message.get("tflops")


# A distributed job (torchrun, one process per rank) times the rank-side computation directly; its
# ranks do not yet compare their result with torch-eager's (harness.sweep.verify), so it says so.
NOT_VERIFIED_DISTRIBUTED = "not verified against torch-eager (a distributed job's ranks do not compare yet)"


def _unverified(result: dict) -> dict:
    if "metrics" not in result:
        return result
    return {**result, "note": "; ".join(n for n in (result.get("note"), NOT_VERIFIED_DISTRIBUTED) if n)}


def _summary(job: Job, results: dict[str, dict], seconds: float) -> str:
    parts = []
    for mode, result in results.items():
        label = {"forward": "fwd", "forward_backward": "fwd+bwd", "backward": "bwd"}.get(mode, mode)
        if "metrics" in result:
            metrics = result["metrics"]
            text = f"{label} {metrics['time_median']:.3g} ms"
            if "peak_memory" in metrics:
                text += f", {metrics['peak_memory'] / 2**20:.4g} MiB"
            if result["status"] != "ok":
                text += f" [bold red]{result['status']}[/]"
            parts.append(text)
        else:
            parts.append(f"{label} [bold]{result['status']}[/]")
    reasons = {r.get("reason", "") for r in results.values() if r["status"] != "ok"} - {""}
    in_session = " in its session" if job.case.companion_session == "job" else ""
    beside = f", beside {job.case.companions} companion process{'es' if job.case.companions > 1 else ''}{in_session}" \
        if job.case.companions else ""
    line = escape(f"{job.implementation:>16}  {job.case.name} ({seconds:.0f} s{beside}): ") + "; ".join(parts)
    if reasons:
        line += escape(f"  ({sorted(reasons)[0]})")
    return line


def run_jobs(
    jobs: list[Job],
    settings: SweepSettings,
    *,
    run_dir: Path,
    run_id: str,
    device_name: str,
    matmul_tflops: dict[str, float],
    label: str = "sweep",
    console: Console | None = None,
) -> SweepCounts:
    """Run ``jobs`` one after the other, appending each one's rows as soon as it finishes."""
    console = console or Console(stderr=True)
    writer = RowWriter(run_dir / "rows.csv")
    counts = SweepCounts()
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]} failed, {task.fields[unsupported]} unsupported"),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(label, total=len(jobs), failed=0, unsupported=0)
        for job in jobs:
            progress.update(task, description=f"{label}: {job.implementation} {job.case.name}")
            all_modes = job_modes(job, settings)
            declared_modes = unsupported_modes(job, all_modes)
            modes = [mode for mode in all_modes if mode not in declared_modes]
            payload = {
                "kind": "case",
                "case": job.case.to_json(),
                "implementation": job.reference,
                "modes": modes,
                "device": settings.device,
                "timing": settings.timing.to_json(),
                "probe": True,
            }
            reason = declared_unsupported(job, settings.device)
            companions = job.case.companions
            # companions in the job's session are the job process's to start (harness.sweep.worker)
            own_session_companions = companions if job.case.companion_session == "own" else 0
            results, seconds = {}, 0.0
            if reason is None and modes:
                with tempfile.TemporaryDirectory(prefix="lmhead-bench-job-") as cache_dir, \
                        companion_processes(own_session_companions):
                    outcome = run_job(payload, settings, reference=job.reference,
                                      env=job_environment(settings.child_env, cache_dir))
                results, seconds = mode_results(outcome, modes), outcome.seconds
                if getattr(resolve(job.reference), "torchrun_module", None) is not None:
                    results = {mode: _unverified(result) for mode, result in results.items()}
                probe = probe_message(outcome)
                if probe is not None and probe.get("tflops"):
                    counts.probes.append(probe_record(f"before {job.implementation} {job.case.name}", probe["tflops"],
                                                      companions=companions))
            elif reason is not None:  # known without starting a process
                results = {mode: {"status": "unsupported", "reason": reason} for mode in modes}
            results = {mode: declared_modes.get(mode) or results[mode] for mode in all_modes}
            writer.append(job_rows(job, results, run_id=run_id, device=device_name, matmul_tflops=matmul_tflops))
            counts.jobs += 1
            counts.statuses.update(result["status"] for result in results.values())
            progress.console.print(_summary(job, results, seconds), highlight=False)
            progress.update(task, advance=1, failed=counts.failed, unsupported=counts.statuses["unsupported"])
        progress.update(task, description=label)
    return counts
