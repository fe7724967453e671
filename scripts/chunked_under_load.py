"""Issue 31's in-process experiment: chunked's floor case (N = 4096, D = 512, V = 32000, float32,
forward and backward) with its workers pinned one per CPU and unpinned, beside torch-eager and an
ideal parallel job (two threads pinned one per CPU, each running one-thread oneDNN matmuls of
chunked's shapes drawn from one queue: no barrier, no imbalance; what no implementation beats);
quiet, beside one CPU-bound companion in a session of its own (another job's), and beside one
started by this process (a data loader's). Each repeat runs every implementation once in each of
the three, so that the host's drifts of speed hit all alike; medians over the repeats.

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
from concurrent.futures import ThreadPoolExecutor

import torch

import implementations.chunked as chunked
from harness.machine_load import companion_processes
from harness.onednn import onednn_linear
from harness.registry import resolve
from harness.spec import LossSpec

N, D, V = 4096, 512, 32000
IDEAL_TASKS = 400  # products of (256, 512) by (512, 2048): 215 GFLOP, about 1.5 s on two quiet cores


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


def ideal_parallel_job():
    """Two one-thread workers pinned one per CPU, taking oneDNN products of chunked's shapes from one queue."""
    linear, x, w = onednn_linear(), torch.randn(256, D), torch.randn(2048, D)
    workers = chunked.cpu_workers(torch.device("cpu"))
    cpus = iter(chunked._worker_cpus(workers) or [None] * workers)
    pool = ThreadPoolExecutor(workers, initializer=lambda: chunked._start_worker(next(cpus)))

    def run() -> None:
        for _ in pool.map(lambda _: linear(x, w, None, "none", [], ""), range(IDEAL_TASKS)):
            pass
    return run


def floor_case(repeats: int) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(N, D, requires_grad=True)
    weight = (torch.randn(V, D) * 0.02).requires_grad_()
    labels = torch.randint(0, V, (N,))
    pinned = chunked._worker_cpus

    def loss(impl, worker_cpus):
        def run() -> None:
            chunked._worker_cpus = worker_cpus
            hidden.grad = weight.grad = None
            impl.loss(hidden, weight, labels, LossSpec()).loss.backward()
            chunked._worker_cpus = pinned
        return run

    runs = {"chunked, pinned": loss(chunked.Chunked(), pinned),
            "chunked, unpinned": loss(chunked.Chunked(), lambda count: None),
            "torch-eager": loss(resolve("torch-eager"), pinned),
            "ideal parallel job": ideal_parallel_job()}

    scenarios = {"quiet": 0, "own session": 1, "this session": 1}
    times = {(scenario, name): [] for scenario in scenarios for name in runs}
    for run in runs.values():
        run()  # warm-up
    for _ in range(repeats):
        for scenario, count in scenarios.items():
            with companion_processes(count, own_session=scenario == "own session"):
                time.sleep(0.5)
                for name, run in runs.items():
                    start = time.perf_counter()
                    run()
                    times[scenario, name].append(time.perf_counter() - start)
    median = {key: statistics.median(values) for key, values in times.items()}
    print(f"{'':18s} {'quiet':>8s}  " + "  ".join(f"companion in {s}: ms, ratio" for s in list(scenarios)[1:]))
    for name in runs:
        quiet = median["quiet", name]
        print(f"{name:18s} {quiet * 1e3:6.0f} ms  " + "  ".join(
            f"{median[s, name] * 1e3:22.0f} {median[s, name] / quiet:5.2f}" for s in list(scenarios)[1:]))


if __name__ == "__main__":
    if "--cpus" in sys.argv:
        check_cpus()
    else:
        floor_case(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
