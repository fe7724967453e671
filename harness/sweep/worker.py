"""The child process that measures one job: ``python -m harness.sweep.worker RESULT_FILE`` (job on stdin).

A job is JSON: ``{"kind": "case", "case": {...}, "implementation": ..., "modes": [...],
"device": ..., "timing": {...}, "probe": true}``, ``{"kind": "environment", "device": ...,
"dtypes": [...], "timing": {...}}`` or ``{"kind": "probe", "device": ...}``. Each measures the load
check's matmul rate first (``probe``: ``harness.machine_load``), the environment job last. The worker appends one JSON line to RESULT_FILE as each step starts and ends,
flushed at once, so that when the process dies (abort, segfault, killed at its time limit) the
sweep still knows what was measured and in which mode it died.

Failures it can see itself become results (``harness.isolation.classify``): ``UnsupportedCase``
-> unsupported, an out-of-memory error -> oom, a CUDA error that poisons the context (illegal
memory access, device-side assert) -> crash (and the worker stops with ``FATAL_EXIT_STATUS``,
since nothing after it can be trusted), anything else -> error. ``harness.isolation`` runs it.
A mode whose results do not match torch-eager's (``harness.sweep.verify``) is ``wrong``: its
timings are kept, with the mismatch as its reason. torch-eager itself, the reference, is not checked.
"""

from __future__ import annotations

import gc
import json
import sys

import torch

import harness  # noqa: F401  (sets TRITON_INTERPRET before anything imports triton)
from harness.isolation import FATAL_EXIT_STATUS, Report, child_report, classify
from harness.registry import resolve
from harness.results import BASELINE
from harness.case import make_inputs
from harness.machine_load import companion_processes
from harness.sweep.cases import SweepCase
from harness.environment import device_environment
from harness.sweep.measure import TimingSettings, matmul_routine_tflops, measure_mode, probe_tflops


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def send_probe(device: str, out: Report) -> None:
    """The load check's matmul rate, measured here before anything else (``harness.machine_load``)."""
    try:
        out.send({"event": "probe", "tflops": probe_tflops(device)})
    except Exception as exc:  # noqa: BLE001 - the job itself matters more than one reading of the load
        out.send({"event": "probe", "tflops": None, "reason": classify(exc)[1]})


def run_case(job: dict, out: Report) -> int:
    """The case's modes, measured beside its companions where they belong to the job's session
    (the runner starts those of a session of their own); the job's process group ends them."""
    sweep_case = SweepCase.from_json(job["case"])
    in_session = sweep_case.companions if sweep_case.companion_session == "job" else 0
    with companion_processes(in_session, own_session=False):
        return _measure_case(sweep_case.case, job, out)


def _measure_case(case, job: dict, out: Report) -> int:
    device = job["device"]
    timing = TimingSettings(**job["timing"])
    modes = job["modes"]
    impl = resolve(job["implementation"])
    if job.get("probe"):
        send_probe(device, out)

    def all_modes(status: str, reason: str) -> None:
        for mode in modes:
            out.send({"event": "result", "mode": mode, "status": status, "reason": reason})

    reason = case.unsupported_reason(impl, device)
    if reason is not None:
        all_modes("unsupported", reason)
        return 0
    try:
        inputs = make_inputs(case, device=device, draw_on_device=True)
    except Exception as exc:  # e.g. the inputs alone do not fit in memory
        status, reason, fatal = classify(exc)
        all_modes(status, f"while creating the inputs: {reason}")
        return FATAL_EXIT_STATUS if fatal else 0

    for mode in modes:
        out.send({"event": "started", "mode": mode})
        try:
            # torch-eager is the reference the others are checked against: nothing to check it with.
            measured = measure_mode(impl, inputs, mode, device, timing, check=impl.name != BASELINE)
        except Exception as exc:
            status, reason, fatal = classify(exc)
            out.send({"event": "result", "mode": mode, "status": status, "reason": reason})
            if fatal:
                return FATAL_EXIT_STATUS
            inputs.reset_grads()
            free_memory(device)
            continue
        status = "ok" if measured.verdict.ok else "wrong"
        note = "; ".join(n for n in (measured.warning, measured.note) if n)
        out.send({"event": "result", "mode": mode, "status": status, "reason": measured.verdict.reason,
                  "metrics": measured.metrics, "note": note})
        free_memory(device)
    return 0


def run_environment(job: dict, out: Report) -> int:
    device = job["device"]
    timing = TimingSettings(**job["timing"])
    environment = device_environment(device)
    rates, routines, failures = {}, {}, {}
    for dtype in job["dtypes"]:
        try:
            routines[dtype] = matmul_routine_tflops(dtype, device, timing)
        except Exception as exc:
            failures[dtype] = classify(exc)[1]
            continue
        rates[dtype] = max(routines[dtype].values())
    out.send({"event": "environment", "environment": environment, "matmul_tflops": rates,
              "matmul_routines": routines, "matmul_failures": failures})
    send_probe(device, out)
    return 0


def main(argv: list[str]) -> int:
    out = child_report(argv[1])
    job = json.load(sys.stdin)
    if job["kind"] == "environment":
        return run_environment(job, out)
    if job["kind"] == "probe":
        send_probe(job["device"], out)
        return 0
    return run_case(job, out)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
