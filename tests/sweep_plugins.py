"""Implementations that misbehave on purpose, to show what the sweep makes of them.

Loaded by the sweep as ``tests.sweep_plugins:NAME``, each in its own worker process. When the
environment variable ``LMHEAD_TEST_CALL_LOG`` names a file, every call appends
``<implementation> <tokens> <worker pid> <sweep pid>`` to it, so tests can count how many worker
processes ran a case, and under which sweep process.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from pathlib import Path

import torch

from harness.adapter import Implementation
from harness.spec import LossOutput
from implementations.torch_native import eager_loss


def _log_call(name: str, hidden: torch.Tensor) -> None:
    path = os.environ.get("LMHEAD_TEST_CALL_LOG")
    if path:
        with open(path, "a") as log:
            log.write(f"{name} {hidden.shape[0]} {os.getpid()} {os.getppid()}\n")


def companions_running() -> list[int]:
    """The pids of the sweep's companion processes running now (``harness.machine_load``)."""
    from harness.machine_load import COMPANION_PROGRAM

    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and COMPANION_PROGRAM in (entry / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(entry.name))
        except OSError:  # the process ended while we looked
            continue
    return pids


def in_my_session(pids: list[int]) -> list[int]:
    """Those of ``pids`` that run in this process's session."""
    mine = []
    for pid in pids:
        try:
            if os.getsid(pid) == os.getsid(0):
                mine.append(pid)
        except ProcessLookupError:
            continue
    return mine


class CountsCompanions(Implementation):
    """The eager loss; logs its token count, how many companion processes run beside it, and how
    many of them run in its own session."""

    name = "test-counts-companions"
    family = "plugin"

    def compute(self, hidden, weight, labels, spec, bias):
        path = os.environ.get("LMHEAD_TEST_CALL_LOG")
        if path:
            with open(path, "a") as log:
                companions = companions_running()
                log.write(f"tokens {hidden.shape[0]} companions {len(companions)} "
                          f"in-session {len(in_my_session(companions))}\n")
        return eager_loss(hidden, weight, labels, spec, bias)


class Aborting(Implementation):
    """Kills its own process with SIGABRT, as a failed assertion in a C++ extension does."""

    name = "test-abort"
    family = "plugin"

    def compute(self, hidden, weight, labels, spec, bias):
        _log_call(self.name, hidden)
        os.abort()


class Segfaulting(Implementation):
    """Reads address 0: SIGSEGV, as a kernel with a bad pointer would."""

    name = "test-segfault"
    family = "plugin"

    def compute(self, hidden, weight, labels, spec, bias):
        _log_call(self.name, hidden)
        ctypes.string_at(0)


class Hanging(Implementation):
    """Never returns, as a deadlocked kernel launch would."""

    name = "test-hang"
    family = "plugin"

    def compute(self, hidden, weight, labels, spec, bias):
        _log_call(self.name, hidden)
        time.sleep(3600)


class HangsOnLargeCases(Implementation):
    """The eager loss up to 48 tokens; beyond, never returns (as a kernel that deadlocks at some size)."""

    name = "test-hangs-on-large"
    family = "plugin"

    def compute(self, hidden, weight, labels, spec, bias):
        _log_call(self.name, hidden)
        if hidden.shape[0] > 48:
            time.sleep(3600)
        return eager_loss(hidden, weight, labels, spec, bias)


class OutOfMemory(Implementation):
    """Raises the error PyTorch raises when a GPU allocation fails."""

    name = "test-oom"
    family = "plugin"

    def compute(self, hidden, weight, labels, spec, bias):
        _log_call(self.name, hidden)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB (test plugin)")


class IllegalMemoryAccess(Implementation):
    """Raises the error a CUDA kernel's illegal memory access surfaces as (the context is then unusable)."""

    name = "test-illegal-access"
    family = "plugin"

    def compute(self, hidden, weight, labels, spec, bias):
        _log_call(self.name, hidden)
        raise RuntimeError("CUDA error: an illegal memory access was encountered (test plugin)")


class HostMemoryHog(Implementation):
    """Touches ever more host memory, 128 MiB at a time, up to 4 GiB; the sweep's memory guard should stop it."""

    name = "test-memory-hog"
    family = "plugin"

    def compute(self, hidden, weight, labels, spec, bias):
        _log_call(self.name, hidden)
        held = []
        for _ in range(32):
            held.append(torch.ones(32 * 2**20))  # 128 MiB, written, so resident
            time.sleep(0.05)
        raise RuntimeError("the memory guard did not stop this process")


class Counting(Implementation):
    """The eager loss, logging every call; interrupts its sweep once, at one token count, if asked.

    With ``LMHEAD_TEST_INTERRUPT_TOKENS=N`` and ``LMHEAD_TEST_INTERRUPT_MARKER=PATH``, the first
    call on a case with N tokens creates PATH, sends SIGINT to the sweep process (as Ctrl-C in
    its terminal would) and waits to be stopped. Later runs find PATH and compute normally.
    """

    name = "test-counting"
    family = "plugin"

    def compute(self, hidden, weight, labels, spec, bias):
        _log_call(self.name, hidden)
        interrupt_at = os.environ.get("LMHEAD_TEST_INTERRUPT_TOKENS")
        marker = os.environ.get("LMHEAD_TEST_INTERRUPT_MARKER")
        if interrupt_at and marker and hidden.shape[0] == int(interrupt_at) and not Path(marker).exists():
            Path(marker).touch()
            os.kill(os.getppid(), signal.SIGINT)
            time.sleep(60)
        return eager_loss(hidden, weight, labels, spec, bias)


def not_implemented(hidden, weight, labels, **options):
    """A plain loss function that supports nothing: every case is unsupported."""
    raise NotImplementedError("this test function implements no loss")


class ReportsCompileCaches(Implementation):
    """Refuses every case, naming the compile caches its process was given, and whether they were empty."""

    name = "test-compile-caches"
    family = "plugin"

    def compute(self, hidden, weight, labels, spec, bias):
        from harness.errors import UnsupportedCase

        caches = [os.environ.get(key, "") for key in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")]
        empty = not any(Path(cache).exists() and any(Path(cache).iterdir()) for cache in caches)
        Path(caches[1]).mkdir(parents=True, exist_ok=True)
        (Path(caches[1]) / "compiled").write_text("as a compiler would leave it")
        raise UnsupportedCase(f"caches {' '.join(caches)} empty={empty}")


class WrongFast(Implementation):
    """Quick and wrong: the eager loss of the first eight tokens only, as a kernel that stops early would."""

    name = "test-wrong-fast"
    family = "plugin"

    def compute(self, hidden, weight, labels, spec, bias):
        _log_call(self.name, hidden)
        return eager_loss(hidden[:8], weight, labels[:8], spec, None if bias is None else bias)


class _Replay(torch.autograd.Function):
    """Returns a stored loss, and the stored gradients in backward, whatever the inputs hold now."""

    @staticmethod
    def forward(ctx, hidden, weight, loss, grad_hidden, grad_weight):
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None


class CachesFirstAnswer(Implementation):
    """Computes the loss and its gradients once, then replays them for any inputs of the same shape:
    correct on the inputs it first saw, instant, and stale as soon as they change in place."""

    name = "test-caches-first-answer"
    family = "plugin"

    def __init__(self) -> None:
        self._cache = {}

    def compute(self, hidden, weight, labels, spec, bias):
        _log_call(self.name, hidden)
        key = (tuple(hidden.shape), tuple(weight.shape), spec.reduction)
        if key not in self._cache:
            with torch.enable_grad():
                h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
                loss = eager_loss(h, w, labels, spec, bias).loss
                grad_hidden, grad_weight = torch.autograd.grad(loss.sum(), (h, w))
            self._cache[key] = (loss.detach(), grad_hidden, grad_weight)
        loss, grad_hidden, grad_weight = self._cache[key]
        return LossOutput(_Replay.apply(hidden, weight, loss, grad_hidden, grad_weight), None)
