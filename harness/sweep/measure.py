"""Timing and peak memory of one implementation on one case, inside the case's own process.

Modes (what one timed call does):

- ``forward``: the loss with autograd enabled, as in training. Fused implementations (chunked,
  Liger, PyTorch's chunked ``linear_cross_entropy``) compute the gradients here, so this is not
  "inference"; the graph and whatever the forward saved stay alive until the call returns.
- ``forward_backward``: the loss and ``backward()`` into freshly allocated gradients (as after
  ``zero_grad(set_to_none=True)``): the one figure comparable across all implementations.
- ``backward``: ``backward(retain_graph=True)`` on one forward's graph, repeated. Implementations
  that refuse a retained graph (PyTorch's chunked path, Cut Cross-Entropy's compiled path) get
  ``unsupported`` for this mode with their own message as the reason.

Time: on a GPU, CUDA events around each repetition, the L2 cache flushed before each, as
``triton.testing.do_bench`` does, but with the number of repetitions decided here
(``repetitions``): do_bench's ``rep`` is a time, which gives a slow case one or two repetitions
and so no spread (p20 = p80 = median). On a CPU ``torch.utils.benchmark.Timer.blocked_autorange``
(wall clock, all of torch's threads). Both time at least ``min_repeats`` repetitions. Gradients are reset to None between
repetitions, outside the timed region. The first call of each mode in the process, which pays
for compilation and autotuning, is timed on its own as ``first_call``.

Peak memory, in a call of its own after the first call: on a GPU the peak allocated by PyTorch's
allocator above what was allocated before the call; on a CPU the peak resident set size of this
process above its resident size before the call (Linux: the high-water mark VmHWM, reset through
``/proc/self/clear_refs``, after returning freed heap pages to the system with ``malloc_trim``).
"Before the call" holds the inputs (and, for ``backward``, the forward's graph and what it saved),
so the figure is what the call itself adds: the logits, the gradients, any workspace.
"""

from __future__ import annotations

import ctypes
import gc
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harness.adapter import Implementation
from harness.case import Inputs
from harness.errors import UnsupportedCase
from harness.isolation import one_line
from harness.onednn import onednn_linear
from harness.spec import DTYPES
from harness.sweep import verify

QUANTILES = (0.5, 0.2, 0.8)  # median, p20, p80
L2_FLUSH_BYTES = 256 * 2**20  # more than any GPU's L2 (H100: 50 MB), as triton.testing.do_bench
MIN_CALL_SECONDS = 1e-6  # a call's estimated time is at least this (a timer can read 0)


@dataclass(frozen=True)
class TimingSettings:
    """How long to time each mode.

    ``measure_time``: seconds of timed repetitions.
    ``min_repeats``: time at least this many repetitions however long a call takes.
    ``gpu_warmup``: seconds of untimed warm-up on a GPU (after the separately timed first call).
    """

    measure_time: float = 1.0
    min_repeats: int = 5
    gpu_warmup: float = 0.025

    def to_json(self) -> dict:
        return {"measure_time": self.measure_time, "min_repeats": self.min_repeats, "gpu_warmup": self.gpu_warmup}


def mode_function(impl: Implementation, inputs: Inputs, mode: str):
    """The callable one repetition of ``mode`` runs."""
    grad_output = None  # reduction "none": the per-token upstream gradient, on the device
    if inputs.upstream is not None:
        grad_output = inputs.upstream.to(inputs.hidden.device, torch.float32)

    def forward():
        return impl.loss(inputs.hidden, inputs.weight, inputs.labels, inputs.spec, bias=inputs.bias, validate=False)

    if mode == "forward":
        return forward
    if mode == "forward_backward":

        def forward_backward():
            out = forward()
            loss = out.loss if grad_output is None else out.loss.float()
            loss.backward(grad_output)
            return out  # what the sweep's verification compares (harness.sweep.verify)

        return forward_backward
    if mode == "backward":
        out = forward()
        loss = out.loss if grad_output is None else out.loss.float()

        def backward():
            loss.backward(grad_output, retain_graph=True)

        return backward
    raise ValueError(f"unknown mode {mode!r}")


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_first_call(fn, device: str) -> float:
    """Seconds of one call, compilation and autotuning included when this is the first."""
    return timed_call(fn, device)[0]


def timed_call(fn, device: str) -> tuple[float, object]:
    """(Seconds of one call, what it returned)."""
    synchronize(device)
    start = time.perf_counter()
    output = fn()
    synchronize(device)
    return time.perf_counter() - start, output


def repetitions(call_seconds: float, seconds: float, minimum: int) -> int:
    """How many calls of ``call_seconds`` to time: enough to fill ``seconds``, never fewer than ``minimum``."""
    return max(minimum, math.ceil(seconds / max(call_seconds, MIN_CALL_SECONDS)))


def quantiles(times_ms: list[float]) -> list[float]:
    """Median, p20 and p80 of the repetitions' times."""
    return [float(q) for q in np.quantile(times_ms, QUANTILES)]


def time_with_events(fn, reset, count: int, *, event, before=lambda: None, synchronize=lambda: None) -> list[float]:
    """Milliseconds of ``count`` calls, each between two events from ``event()`` (CUDA events on a
    GPU), with the gradients in ``reset`` set to None and ``before()`` run ahead of each, untimed."""
    pairs = [(event(), event()) for _ in range(count)]
    for start, end in pairs:
        for tensor in reset:
            tensor.grad = None
        before()
        start.record()
        fn()
        end.record()
    synchronize()
    return [start.elapsed_time(end) for start, end in pairs]


def _time_cuda(fn, reset, timing: TimingSettings, call_seconds: float) -> list[float]:
    # Every repetition reads its operands from memory, not from an L2 left warm by the previous one.
    l2_flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")

    def event():
        return torch.cuda.Event(enable_timing=True)

    time_with_events(fn, reset, repetitions(call_seconds, timing.gpu_warmup, 0), event=event,
                     before=l2_flush.zero_, synchronize=torch.cuda.synchronize)
    count = repetitions(call_seconds, timing.measure_time, timing.min_repeats)
    return time_with_events(fn, reset, count, event=event, before=l2_flush.zero_, synchronize=torch.cuda.synchronize)


@dataclass(frozen=True)
class Timed:
    """Median, p20 and p80 of one call in milliseconds, and the timer's own warnings (CPU only:
    ``torch.utils.benchmark`` flags an interquartile range that is large against the median)."""

    median: float
    p20: float
    p80: float
    warning: str = ""


def time_repeated(fn, reset, device: str, timing: TimingSettings, call_seconds: float) -> Timed:
    """Median, p20 and p80 of one call, in milliseconds (warm: the first call is already done)."""
    if device.startswith("cuda"):
        return Timed(*quantiles(_time_cuda(fn, reset, timing, call_seconds)))
    from torch.utils.benchmark import Timer

    leaves = reset

    def reset_grads():
        for tensor in leaves:
            tensor.grad = None

    # Every repetition starts from gradients set to None, never accumulating into the previous
    # ones (an implementation may have handed its own saved buffer over as .grad). `setup` does it
    # outside the timed region before each block; slow calls get blocks of one repetition, and
    # within the blocks of fast calls setting a few small gradients to None costs microseconds.
    timer = Timer(
        stmt="reset_grads(); fn()",
        setup="reset_grads()",
        globals={"fn": fn, "reset_grads": reset_grads},
        num_threads=torch.get_num_threads(),
    )
    min_run_time = max(timing.measure_time, timing.min_repeats * call_seconds)
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    return Timed(*quantiles([t * 1000 for t in measurement.times]), warning=_timer_warning(measurement))


def _timer_warning(measurement) -> str:
    """The timer's own noise warnings as one line ("" when it has none)."""
    if not measurement.has_warnings:
        return ""
    return " ".join(" ".join(w.split()) for w in measurement._warnings)  # noqa: SLF001 - only its repr shows them


class _ResidentMemory:
    """Linux resident-set high-water mark of this process, resettable between calls."""

    def __init__(self) -> None:
        try:
            self._libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self._libc = None

    @staticmethod
    def available() -> bool:
        path = Path("/proc/self/clear_refs")
        return path.exists() and Path("/proc/self/status").exists()

    @staticmethod
    def _status_bytes(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} missing from /proc/self/status")

    def reset(self) -> int | None:
        """Give freed heap pages back, reset the high-water mark; the resident bytes now (None: cannot reset)."""
        gc.collect()
        if self._libc is not None:
            self._libc.malloc_trim(0)
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:  # e.g. a sandbox that forbids it: no trustworthy peak, so none is reported
            return None
        return self._status_bytes("VmRSS")

    def peak(self) -> int:
        return self._status_bytes("VmHWM")


def peak_memory(fn, inputs: Inputs, device: str) -> tuple[int | None, float]:
    """(Peak bytes above the baseline during one call or None where unmeasurable, the call's seconds)."""
    inputs.reset_grads()
    if device.startswith("cuda"):
        gc.collect()
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        seconds = time_first_call(fn, device)
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        resident = _ResidentMemory() if _ResidentMemory.available() else None
        baseline = resident.reset() if resident else None
        seconds = time_first_call(fn, device)
        if baseline is None:
            inputs.reset_grads()
            return None, seconds
        peak = resident.peak() - baseline
    inputs.reset_grads()
    return max(0, int(peak)), seconds


@dataclass(frozen=True)
class Measured:
    """One mode's raw metrics (first_call, peak_memory, time_median, time_p20, time_p80), the timer's
    noise warning, and whether its results matched torch-eager's (``verify.Verdict``)."""

    metrics: dict
    warning: str = ""
    verdict: verify.Verdict = verify.Verdict()
    note: str = ""  # e.g. why it was not verified


def measure_mode(impl: Implementation, inputs: Inputs, mode: str, device: str, timing: TimingSettings,
                 *, check: bool = True) -> Measured:
    """Time one mode; with ``check``, verify its first call's result and, after timing, its result on
    inputs changed in place, against torch-eager's (``harness.sweep.verify``), outside the timed region."""
    fn = mode_function(impl, inputs, mode)
    inputs.reset_grads()
    if mode == "backward":
        fn = _retained_backward_or_unsupported(fn)
    first_call, output = timed_call(fn, device)
    checker = _Checker(inputs, mode, device) if check else None
    verdict, note = (checker.first(output) if checker else (verify.Verdict(), ""))
    del output  # a forward's graph (torch-eager's: its logits) is not kept alive while measuring
    inputs.reset_grads()
    peak, call_seconds = peak_memory(fn, inputs, device)
    timed = time_repeated(fn, list(inputs.gradient_inputs.values()), device, timing, call_seconds)
    inputs.reset_grads()
    if checker and verdict.ok and not note and mode != "backward":  # backward replays one forward's graph
        verdict, note = checker.after_change(fn)
        inputs.reset_grads()
    metrics = {"first_call": first_call * 1000, "time_median": timed.median, "time_p20": timed.p20,
               "time_p80": timed.p80}
    if peak is not None:
        metrics["peak_memory"] = peak
    return Measured(metrics, timed.warning, verdict, note)


class _Checker:
    """The verification of one mode's results (``harness.sweep.verify``), freeing what it holds."""

    def __init__(self, inputs: Inputs, mode: str, device: str) -> None:
        from harness.registry import resolve
        from harness.results import BASELINE

        self.inputs, self.mode, self.device = inputs, mode, device
        self.eager = resolve(BASELINE)
        self.first_result: verify.Result | None = None
        self.first_reference: verify.Reference | None = None

    def _compare(self, result: verify.Result, what: str = "") -> tuple[verify.Verdict, verify.Reference]:
        inputs = self.inputs
        expected = verify.reference(self.eager, inputs, gradients=self.mode != "forward")
        verdict = verify.compare(result, expected, dtype=inputs.hidden.dtype, dim=inputs.weight.shape[1],
                                 vocab=inputs.weight.shape[0], tokens=inputs.labels.numel(), what=what)
        return verdict, expected

    def first(self, output) -> tuple[verify.Verdict, str]:
        try:
            result = verify.result_of(output, self.inputs, self.mode)
            verdict, expected = self._compare(result)
        except Exception as exc:  # noqa: BLE001 - e.g. torch-eager's chunk out of memory: the timing stands
            return verify.Verdict(), f"not verified: {type(exc).__name__}: {one_line(exc)}"
        # Kept for the cached-answer check: the loss and one number per gradient, not the tensors.
        self.first_result = verify.Result(None if result.loss is None else result.loss.clone(),
                                          {name: _summed(g) for name, g in result.grads.items()})
        self.first_reference = verify.Reference(expected.loss, expected.loss_terms, {})
        del expected
        free_device_memory(self.device)
        return verdict, ""

    def after_change(self, fn) -> tuple[verify.Verdict, str]:
        try:
            with verify.changed_inputs(self.inputs):
                result = verify.result_of(fn(), self.inputs, self.mode)
                verdict, expected = self._compare(result, what="on inputs changed in place")
                summary = verify.Result(result.loss, {name: _summed(g) for name, g in result.grads.items()})
                if verdict.ok:
                    verdict = verify.cached_answer(self.first_result, summary, self.first_reference, expected)
        except Exception as exc:  # noqa: BLE001
            return verify.Verdict(), f"not verified on changed inputs: {type(exc).__name__}: {one_line(exc)}"
        finally:
            free_device_memory(self.device)
        return verdict, ""


def _summed(grad: torch.Tensor | None) -> torch.Tensor | None:
    return None if grad is None else grad.detach().double().sum().reshape(1)


def free_device_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _retained_backward_or_unsupported(fn):
    """Wrap the retained-graph backward so that a refusal of retain_graph reads as unsupported."""

    def backward():
        try:
            fn()
        except RuntimeError as exc:
            if "retain_graph" in str(exc):
                first_line = str(exc).strip().splitlines()[0]
                raise UnsupportedCase(
                    f"backward alone is timed on a retained graph, which this implementation refuses: {first_line}"
                ) from None
            raise

    # Every call is wrapped, not just the first: some implementations accept one retained
    # backward and refuse the next one.
    return backward


def matmul_routine_tflops(dtype_name: str, device: str, timing: TimingSettings) -> dict[str, float]:
    """The device's matmul rate in this dtype through each routine torch offers for it: TFLOP/s of a
    square matmul (median time), ``torch.mm`` and, on a CPU whose torch has it, oneDNN's
    (``harness.onednn``; on the project's AMD CPU machine about twice torch.mm's in float32). A
    routine that fails on this dtype is left out; torch.mm's failure propagates.

    On a GPU the matrices are 8192 x 8192, large enough to reach the peak of its tensor cores. On a
    CPU the size grows from 512 until one call takes 50 ms (at most 4096), because some CPUs are
    a hundred times slower in bfloat16 than in float32.
    """
    dtype = DTYPES[dtype_name]
    generator = torch.Generator(device=device).manual_seed(0)
    size = 8192 if device.startswith("cuda") else 512
    while True:
        a = torch.randn(size, size, generator=generator, device=device).to(dtype)
        b = torch.randn(size, size, generator=generator, device=device).to(dtype)

        def matmul():
            torch.mm(a, b)

        call_seconds = time_first_call(matmul, device)
        if device.startswith("cuda") or size >= 4096:
            break
        call_seconds = time_first_call(matmul, device)  # warm
        if call_seconds >= 0.05:
            break
        size *= 2
    routines = {"torch.mm": (matmul, call_seconds)}
    linear = None if device.startswith("cuda") else onednn_linear()
    if linear is not None:
        def onednn_matmul():
            linear(a, b, None, "none", [], "")  # a @ b.T: the same work

        try:
            routines["onednn"] = (onednn_matmul, time_first_call(onednn_matmul, device))
        except RuntimeError:  # e.g. a dtype this CPU's oneDNN does not take
            pass
    rates = {}
    for name, (fn, seconds) in routines.items():
        median_ms = time_repeated(fn, [], device, timing, seconds).median
        rates[name] = 2 * size**3 / (median_ms / 1000) / 1e12
    return rates



PROBE_SIZES = {"cpu": (1024, "float32"), "cuda": (4096, "bfloat16")}  # a call of about 10 ms on a CPU
PROBE_TIMING = TimingSettings(measure_time=0.1, min_repeats=5, gpu_warmup=0.01)


def probe_tflops(device: str) -> float:
    """The load check's fixed matmul (``harness.machine_load``): TFLOP/s of torch.mm at one size and
    dtype per kind of device, median of about 0.1 s of calls after a warm one."""
    size, dtype_name = PROBE_SIZES["cuda" if device.startswith("cuda") else "cpu"]
    generator = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator, device=device).to(DTYPES[dtype_name]) for _ in range(2))

    def matmul():
        torch.mm(a, b)

    time_first_call(matmul, device)
    seconds = time_first_call(matmul, device)
    median_ms = time_repeated(matmul, [], device, PROBE_TIMING, seconds).median
    return 2 * size**3 / (median_ms / 1000) / 1e12
