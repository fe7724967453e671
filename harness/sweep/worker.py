"""The child process that measures one job: ``python -m harness.sweep.worker RESULT_FILE`` (job on stdin).

A job is JSON: ``{"kind": "case", "case": {...}, "implementation": ..., "modes": [...],
"device": ..., "timing": {...}}`` or ``{"kind": "environment", "device": ..., "dtypes": [...],
"timing": {...}}``. The worker appends one JSON line to RESULT_FILE as each step starts and ends,
flushed at once, so that when the process dies (abort, segfault, killed at its time limit) the
sweep still knows what was measured and in which mode it died.

Failures it can see itself become results: ``UnsupportedCase`` -> unsupported, an out-of-memory
error -> oom, a CUDA error that poisons the context (illegal memory access, device-side assert)
-> crash (and the worker stops, since nothing after it can be trusted), anything else -> error.
"""

from __future__ import annotations

import ctypes
import faulthandler
import gc
import json
import os
import signal
import sys

import torch

import harness  # noqa: F401  (sets TRITON_INTERPRET before anything imports triton)
from harness.errors import HarnessError, UnsupportedCase
from harness.registry import resolve
from harness.case import make_inputs
from harness.sweep.cases import SweepCase
from harness.environment import device_environment
from harness.sweep.measure import TimingSettings, matmul_tflops, measure_mode

# Messages after which the CUDA context cannot be used again in this process.
FATAL_CUDA_ERRORS = ("illegal memory access", "device-side assert", "unspecified launch failure", "misaligned address")
OUT_OF_MEMORY = ("out of memory", "not enough memory")
REASON_LIMIT = 300


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return (first[:REASON_LIMIT] + "...") if len(first) > REASON_LIMIT else first


def classify(exc: BaseException) -> tuple[str, str, bool]:
    """(status, one-line reason, whether the process must stop) for an exception from a case."""
    message = one_line(exc)
    lowered = str(exc).lower()
    if isinstance(exc, UnsupportedCase):
        return "unsupported", message, False
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or any(text in lowered for text in OUT_OF_MEMORY):
        return "oom", f"{type(exc).__name__}: {message}", False
    if any(text in lowered for text in FATAL_CUDA_ERRORS):
        return "crash", f"{type(exc).__name__}: {message}", True
    if isinstance(exc, HarnessError):
        return "error", f"bad input: {message}", False
    return "error", f"{type(exc).__name__}: {message}", False


class ResultFile:
    def __init__(self, path: str):
        self.handle = open(path, "a")

    def emit(self, **message) -> None:
        self.handle.write(json.dumps(message) + "\n")
        self.handle.flush()


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def run_case(job: dict, out: ResultFile) -> int:
    case = SweepCase.from_json(job["case"]).case
    device = job["device"]
    timing = TimingSettings(**job["timing"])
    modes = job["modes"]
    impl = resolve(job["implementation"])

    def all_modes(status: str, reason: str) -> None:
        for mode in modes:
            out.emit(event="result", mode=mode, status=status, reason=reason)

    reason = case.unsupported_reason(impl, device)
    if reason is not None:
        all_modes("unsupported", reason)
        return 0
    try:
        inputs = make_inputs(case, device=device, draw_on_device=True)
    except Exception as exc:  # e.g. the inputs alone do not fit in memory
        status, reason, fatal = classify(exc)
        all_modes(status, f"while creating the inputs: {reason}")
        return 3 if fatal else 0

    for mode in modes:
        out.emit(event="started", mode=mode)
        try:
            metrics = measure_mode(impl, inputs, mode, device, timing)
        except Exception as exc:
            status, reason, fatal = classify(exc)
            out.emit(event="result", mode=mode, status=status, reason=reason)
            if fatal:
                return 3
            inputs.reset_grads()
            free_memory(device)
            continue
        out.emit(event="result", mode=mode, status="ok", metrics=metrics)
        free_memory(device)
    return 0


def run_environment(job: dict, out: ResultFile) -> int:
    device = job["device"]
    timing = TimingSettings(**job["timing"])
    environment = device_environment(device)
    rates, failures = {}, {}
    for dtype in job["dtypes"]:
        try:
            rates[dtype] = matmul_tflops(dtype, device, timing)
        except Exception as exc:
            failures[dtype] = classify(exc)[1]
    out.emit(event="environment", environment=environment, matmul_tflops=rates, matmul_failures=failures)
    return 0


def die_with_parent() -> None:
    """Linux: have the kernel kill this process if the sweep that started it dies (even by SIGKILL)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def main(argv: list[str]) -> int:
    die_with_parent()
    faulthandler.enable()  # a crash leaves its Python stack in the log
    out = ResultFile(argv[1])
    job = json.load(sys.stdin)
    if job["kind"] == "environment":
        return run_environment(job, out)
    return run_case(job, out)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
