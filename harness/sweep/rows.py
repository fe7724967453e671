"""One job's outcome as rows of the results table (``harness.results.ROW_COLUMNS``).

A mode that produced numbers gives one row per metric, the measured ones (time, first call,
peak memory) and the derived ones:

- ``tflops``: matmul work (2*N*D*V forward, 6*N*D*V forward+backward) over the median time. Not
  for ``backward`` alone: fused implementations do that work in the forward, so a rate computed
  from 4*N*D*V would be meaningless for them;
- ``matmul_fraction``: that rate over the device's own matmul rate in the same dtype, measured
  once per run: the fastest of the square matmuls torch offers there (``meta.json``:
  ``matmul_tflops``, and each routine's in ``matmul_routines``: on a CPU, torch.mm and oneDNN's);
- ``memory_over_lower_bound``: peak memory over the bytes of the gradients of hidden and weight
  (the lower bound of the Cut Cross-Entropy paper);
- ``memory_over_logits``: peak memory over the bytes of the N x V logits in the input dtype.

A mode that did not gets a single row with ``metric = "status"``, its status and its reason. A
mode whose result did not match torch-eager's (``harness.sweep.verify``) keeps its metric rows,
with status ``wrong`` and the mismatch as their reason. ``note`` carries what qualifies numbers
that stand (the CPU timer's noise warning, a verification that could not run).
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.isolation import ChildOutcome
from harness.results import METRICS
from harness.case import Case
from harness.sweep.cases import SweepCase


RATED_MODES = ("forward", "forward_backward")  # modes whose matmul work is well defined


@dataclass(frozen=True)
class Job:
    """One (case, implementation) pair; ``reference`` is what the registry resolves (a name or module:attr)."""

    case: SweepCase
    implementation: str
    reference: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.case.name, self.implementation)


def mode_results(outcome: ChildOutcome, modes: list[str]) -> dict[str, dict]:
    """Each mode's result: ``{"status", "metrics"}`` or ``{"status", "reason"}``.

    A mode the child reported keeps its own result. A mode it did not (the process died, was
    stopped at a limit, or stopped itself) takes the process-level failure, saying in which
    mode it happened and, for the modes after it, that they were not measured.
    """
    reported = {m["mode"]: m for m in outcome.messages if m.get("event") == "result"}
    started = [m["mode"] for m in outcome.messages if m.get("event") == "started"]
    running = next((mode for mode in reversed(started) if mode not in reported), None)
    results: dict[str, dict] = {}
    for mode in modes:
        if mode in reported:
            results[mode] = reported[mode]
            continue
        if outcome.failure is None:
            status, reason = "error", "the worker ended without a result for this mode"
        else:
            status, reason = outcome.failure
        if running is not None and mode != running:
            reason = f"not measured: {reason} during {running}"
        elif running is not None:
            reason = f"{reason} during {mode}"
        elif started and outcome.failure is not None:  # it ended between modes: it stopped itself
            reason = f"not measured: {reason} in an earlier mode"
        results[mode] = {"status": status, "reason": reason}
    return results


def derived_metrics(case: Case, mode: str, metrics: dict, matmul_tflops: dict[str, float]) -> dict:
    derived = {}
    median_ms = metrics.get("time_median")
    if mode in RATED_MODES and median_ms and median_ms > 0:
        derived["tflops"] = case.matmul_flops(mode) / (median_ms / 1000) / 1e12
        rate = matmul_tflops.get(case.dtype)
        if rate:
            derived["matmul_fraction"] = derived["tflops"] / rate
    peak = metrics.get("peak_memory")
    if peak is not None:
        derived["memory_over_lower_bound"] = peak / case.gradient_bytes
        derived["memory_over_logits"] = peak / case.logits_bytes
    return derived


def job_rows(
    job: Job,
    results: dict[str, dict],
    *,
    run_id: str,
    device: str,
    matmul_tflops: dict[str, float],
) -> list[dict]:
    case = job.case.case
    common = {
        "run_id": run_id,
        "case": job.case.name,
        "shape": job.case.entry,
        "vocab": case.vocab,
        "hidden": case.dim,
        "tokens": case.num_tokens,
        "dtype": case.dtype,
        "tied": job.case.tied,
        "options": case.describe_options(),
        "logits": case.logits,
        "implementation": job.implementation,
        "device": device,
    }
    rows = []
    for mode, result in results.items():
        if "metrics" not in result:
            rows.append({**common, "mode": mode, "metric": "status", "status": result["status"],
                         "reason": result.get("reason", "")})
            continue
        metrics = dict(result["metrics"])
        metrics.update(derived_metrics(case, mode, metrics, matmul_tflops))
        for metric, unit in METRICS.items():
            if metric in metrics:
                rows.append({**common, "mode": mode, "metric": metric, "value": metrics[metric], "unit": unit,
                             "status": result["status"], "reason": result.get("reason", ""),
                             "note": result.get("note", "")})
    return rows
