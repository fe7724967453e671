"""The sweep's job for a vocab-parallel implementation, one process per rank under torchrun.

    python -m implementations.vocab_parallel.torchrun REPORT_FILE --nproc-per-node=P   (job on stdin)

``harness.sweep.runner`` starts it, as a child of ``harness.isolation``, instead of
``harness.sweep.worker`` for an implementation of the ``distributed`` family. It writes the job
beside REPORT_FILE and becomes (``exec``) ``torchrun --standalone --nproc-per-node P -m
implementations.vocab_parallel.torchrun REPORT_FILE JOB_FILE`` in the same process, so the
sweep's time limit and group kill reach every rank. The job is the worker's
(``harness.sweep.worker``), plus ``world_size``; rank 0 sends the same events to REPORT_FILE, so
a job's rows look like any other's. Every rank builds the case's inputs from the
same seed, keeps its own shard of the head and frees the rest before anything is measured. Then,
per mode, the ranks run the rank-side computation (``vocab_parallel.ranks``) directly, without
the pool and the autograd wrapper the gate uses:

- ``forward``: the loss alone (no gradient); ``forward_backward``: the loss and the gradients of
  hidden, weight and bias (upstream 1, or ones per token with reduction ``none``); ``backward``
  alone is unsupported, since each rank computes its gradients in the same call as its loss;
- time: wall clock from a barrier to the next barrier after the call, i.e. until the slowest rank
  is done (median, p20, p80 of at least ``min_repeats`` calls and ``measure_time`` seconds);
- ``peak_memory_rank{r}``: rank r's peak above its inputs (CPU: resident-set high-water mark;
  GPU: allocator peak), and ``peak_memory``: the largest of them (what one device must hold);
- ``comm_bytes``: the bytes the busiest rank handed to collectives in one call (see
  ``ranks.CommCounter``), ``comm_calls``: how many collectives it issued, ``world_size``: P.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import harness  # noqa: F401  (sets TRITON_INTERPRET before anything imports triton)
from harness.registry import resolve
from harness.case import Case, make_inputs
from harness.sweep.cases import SweepCase
from harness.sweep.measure import QUANTILES, TimingSettings, peak_memory
from harness.isolation import Report, child_report, classify
from implementations.vocab_parallel.ranks import CommCounter, Group, Request, compute

GROUP_TIMEOUT = dt.timedelta(minutes=30)  # a large case's first call may take minutes on a CPU


class _NoGradients:
    """What ``measure.peak_memory`` resets between calls: nothing, the ranks return fresh gradients."""

    def reset_grads(self) -> None:
        pass


def _request(impl, case: Case, rank: int, world_size: int, device: str) -> tuple[Request, Request]:
    """This rank's (forward, forward_backward) requests, built from the case's seeded inputs."""
    inputs = make_inputs(case, device=str(device), draw_on_device=True)
    shard = impl.shards(case.vocab, world_size)[rank]
    rows = slice(shard.start, shard.stop)
    spec = inputs.spec
    class_weight = spec.class_weight
    if class_weight is not None and not impl.full_class_weight():
        class_weight = class_weight[rows].clone()
    common = dict(
        family=impl.rank_family, hidden=inputs.hidden.detach(), labels=inputs.labels,
        weight=inputs.weight.detach()[rows].clone(),
        bias=None if inputs.bias is None else inputs.bias.detach()[rows].clone(),
        class_weight=class_weight, spec=spec.replace(class_weight=None), vocab=case.vocab, start=shard.start,
        needs=(True, True, inputs.bias is not None), chunk_size=None,
    )
    upstream = torch.ones((), device=device) if inputs.upstream is None else inputs.upstream.to(device, torch.float32)
    return Request(upstream=None, **common), Request(upstream=upstream, **common)


def _time(fn, where: Group, timing: TimingSettings, first_seconds: float) -> list[float]:
    """(median, p20, p80) in ms of ``fn`` from a barrier to the barrier after it, on every rank alike."""
    # Every rank must run the same number of calls: sized by the slowest rank's first call.
    slowest = torch.tensor([first_seconds], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    repeats = max(timing.min_repeats, int(timing.measure_time / max(float(slowest), 1e-6)))
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        _synchronize(where.device)
        dist.barrier()
        times.append(time.perf_counter() - start)
    return [float(q) * 1000 for q in np.quantile(times, QUANTILES)]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(request: Request, where: Group, timing: TimingSettings) -> dict:
    """This rank's metrics of one mode (time and communication are the same on every rank)."""

    def call():
        compute(request, where)

    dist.barrier()
    start = time.perf_counter()
    call()
    _synchronize(where.device)
    first = time.perf_counter() - start
    peak, _ = peak_memory(call, _NoGradients(), where.device.type)
    counter = CommCounter()
    with counter:
        call()
    median, p20, p80 = _time(call, where, timing, first)
    return {"first_call": first * 1000, "time_median": median, "time_p20": p20, "time_p80": p80,
            "peak_memory": peak, "comm_bytes": counter.bytes, "comm_calls": counter.calls}


def combine(per_rank: list[dict], world_size: int) -> dict:
    """One result from every rank's: time as rank 0 saw it, per-rank and largest peak memory,
    the busiest rank's communication."""
    metrics = {key: per_rank[0][key] for key in ("time_median", "time_p20", "time_p80")}
    metrics["first_call"] = max(r["first_call"] for r in per_rank)
    peaks = [r["peak_memory"] for r in per_rank]
    if all(p is not None for p in peaks):
        metrics["peak_memory"] = max(peaks)
        metrics.update({f"peak_memory_rank{rank}": peak for rank, peak in enumerate(peaks)})
    metrics["comm_bytes"] = max(r["comm_bytes"] for r in per_rank)
    metrics["comm_calls"] = max(r["comm_calls"] for r in per_rank)
    metrics["world_size"] = world_size
    return metrics


def run(job: dict, out: Report | None) -> int:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if job["device"] == "cuda" else torch.device("cpu")
    where = Group(rank, world_size, dist.group.WORLD, device)
    case = SweepCase.from_json(job["case"]).case
    impl = resolve(job["implementation"])
    timing = TimingSettings(**job["timing"])

    def emit(**message) -> None:
        if out is not None:
            out.send(message)

    try:
        forward, forward_backward = _request(impl, case, rank, world_size, device.type)
    except Exception as exc:  # noqa: BLE001 - the same on every rank (same seed, same case)
        status, reason, _ = classify(exc)
        for mode in job["modes"]:
            emit(event="result", mode=mode, status=status, reason=f"while creating the inputs: {reason}")
        return 0
    gc.collect()  # the full head each rank built its shard from goes before anything is measured
    requests = {"forward": forward, "forward_backward": forward_backward}
    for mode in job["modes"]:
        emit(event="started", mode=mode)
        if mode not in requests:
            emit(event="result", mode=mode, status="unsupported",
                 reason="each rank computes its gradients in the same call as its loss: backward alone is not separable")
            continue
        try:
            mine = measure(requests[mode], where, timing)
            error = None
        except Exception as exc:  # noqa: BLE001 - reported; the other ranks learn of it below
            mine, error = None, classify(exc)
        everyone = [None] * world_size
        dist.all_gather_object(everyone, (mine, error))
        failed = [e for _, e in everyone if e is not None]
        if failed:
            status, reason, _ = failed[0]
            emit(event="result", mode=mode, status=status, reason=reason)
            if any(m is None for m, _ in everyone):
                return 0  # a rank that raised mid-call may be out of step in its collectives
            continue
        emit(event="result", mode=mode, status="ok", metrics=combine([m for m, _ in everyone], world_size))
    return 0


def _become_torchrun(report_path: str, world_size: int) -> None:
    """The sweep's child (job on stdin) hands over to torchrun, in this same process."""
    child_report(report_path)  # die with the sweep, as every child does
    job_path = f"{report_path}.job.json"
    with open(job_path, "w") as handle:
        handle.write(sys.stdin.read())
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc-per-node={world_size}", "-m", __spec__.name, report_path, job_path])


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[2].startswith("--nproc-per-node="):
        _become_torchrun(argv[1], int(argv[2].partition("=")[2]))
    if len(argv) != 3:
        print("usage: python -m implementations.vocab_parallel.torchrun REPORT_FILE --nproc-per-node=P (job on stdin)",
              file=sys.stderr)
        return 2
    with open(argv[2]) as handle:
        job = json.load(handle)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("WORLD_SIZE", "1"))))
    backend = "nccl" if job["device"] == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=GROUP_TIMEOUT)
    try:
        return run(job, Report(argv[1]) if dist.get_rank() == 0 else None)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
