"""Issue 31's in-process experiment: chunked's floor case (N = 4096, D = 512, V = 32000, float32,
forward and backward) with its workers pinned one per CPU and unpinned, beside torch-eager; quiet,
then beside one CPU-bound companion. Calls are interleaved so that drifts of load hit all alike.

    PYTHONPATH=. python scripts/chunked_under_load.py [REPEATS]

``--cpus`` first checks whether a busy CPU slows the other (a one-thread matmul pinned to CPU 0,
alone, beside a busy loop pinned to CPU 1, and beside one pinned to CPU 0). Linux only.
Results: docs/measurements/2026-12-07-chunked-under-load.md.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import torch

import implementations.chunked as chunked
from harness.machine_load import companion_processes
from harness.registry import resolve
from harness.spec import LossSpec

N, D, V = 4096, 512, 32000


def matmul_gflops(seconds: float = 4.0) -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        calls += 1
    return calls * 2 * 1024**3 / (time.perf_counter() - start) / 1e9


def busy_loop_on(cpu: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"])


def check_cpus() -> None:
    torch.set_num_threads(1)
    os.sched_setaffinity(0, {0})
    matmul_gflops(1)
    print(f"one-thread matmul on CPU 0, alone: {matmul_gflops():.1f} GFLOP/s")
    for cpu in (1, 0):
        busy = busy_loop_on(cpu)
        time.sleep(0.5)
        print(f"  beside a busy loop pinned to CPU {cpu}: {matmul_gflops():.1f} GFLOP/s")
        busy.kill()


def floor_case(repeats: int) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(N, D, requires_grad=True)
    weight = (torch.randn(V, D) * 0.02).requires_grad_()
    labels = torch.randint(0, V, (N,))
    pinned = chunked._worker_cpus
    runs = {"chunked, pinned": (chunked.Chunked(), pinned),
            "chunked, unpinned": (chunked.Chunked(), lambda count: None),
            "torch-eager": (resolve("torch-eager"), pinned)}

    def once(impl, worker_cpus) -> float:
        chunked._worker_cpus = worker_cpus
        hidden.grad = weight.grad = None
        start = time.perf_counter()
        impl.loss(hidden, weight, labels, LossSpec()).loss.backward()
        return time.perf_counter() - start

    def medians() -> dict[str, float]:
        times = {name: [] for name in runs}
        for run in runs.values():
            once(*run)  # warm-up
        for _ in range(repeats):
            for name, run in runs.items():
                times[name].append(once(*run))
        return {name: statistics.median(t) for name, t in times.items()}

    quiet = medians()
    with companion_processes(1):
        time.sleep(1)
        loaded = medians()
    chunked._worker_cpus = pinned
    for name in runs:
        print(f"{name:18s} quiet {quiet[name] * 1e3:6.0f} ms  beside one companion {loaded[name] * 1e3:6.0f} ms  "
              f"ratio {loaded[name] / quiet[name]:.2f}")


if __name__ == "__main__":
    if "--cpus" in sys.argv:
        check_cpus()
    else:
        floor_case(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
