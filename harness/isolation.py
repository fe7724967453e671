"""Run an implementation's code in child processes, so that what it does cannot take the run down.

Every command that runs implementations (``check``, its behaviour matrix, ``sweep``) runs them in
children: ``python -m MODULE REPORT_FILE ARGS...``. The child sends its results with
``child_report(REPORT_FILE).send(...)``: one JSON object a line, appended and flushed at once, so
that what it reported survives its death. Its stdout and stderr (kernels, compilers, the Python
stack that ``faulthandler`` prints on a fatal signal) go to a log, whose tail is kept.

Each child gets its own session: a Ctrl-C in the terminal reaches only the parent, and the child's
whole process group (compile workers included) can be killed at once. While it runs, the parent
polls it, and the child's fate becomes a (status, reason) failure:

- past the time limit, the group is killed: ``timeout``;
- past the memory limit (resident set of the child, read from ``/proc``), the group is killed:
  ``oom``. This is a guard for CPU runs, where exhausting host memory would otherwise bring in
  the kernel's OOM killer or swap the machine to a halt; ``RLIMIT_AS`` is not used because
  torch, OpenMP and Triton reserve far more address space than they touch. A GPU's own memory
  needs no guard: PyTorch raises ``OutOfMemoryError``, which ``classify`` calls ``oom``;
- killed by a signal it did not get from us (abort, segfault, the kernel's OOM killer): ``crash``,
  with the place it died (``file:line in function``) from the stack in the log;
- exit status ``FATAL_EXIT_STATUS``: the child reported a fatal CUDA error (illegal memory access,
  device-side assert: the context cannot be used again) and stopped itself: ``crash``;
- any other non-zero exit status: ``error``, with the log's last line.

Two ways to use it:

- ``run_child``: one child for one job, its messages all at the end (the sweep: one case x
  implementation; the time limit is for the whole job);
- ``run_items``: a list of items (``check``: one implementation's properties; the behaviour
  matrix: its edge cases) run one after another in a child that reports ``{"started": ITEM}``
  before each (the time limit is per item: the clock restarts there), ``{"case": CASE}`` before
  each case of it if it has cases, and ``{"item": ITEM, ...}`` when the item is done. When the
  child dies or is stopped, the item it was running is reported with the failure (and its last
  case), and the remaining items run in a fresh child; one that stopped itself after reporting a
  fatal error loses no item, the rest just run in a fresh child.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.errors import HarnessError, UnsupportedCase

POLL_SECONDS = 0.05
LOG_TAIL_LINES = 200
REASON_LIMIT = 300

# Messages after which the CUDA context cannot be used again in this process.
FATAL_CUDA_ERRORS = ("illegal memory access", "device-side assert", "unspecified launch failure", "misaligned address")
OUT_OF_MEMORY = ("out of memory", "not enough memory")
# A child exits with this status after reporting a fatal CUDA error: what follows needs a fresh process.
FATAL_EXIT_STATUS = 3
_STOPPED_AFTER_FATAL_ERROR = ("crash", "the process stopped after a fatal error")


# --- errors: what an exception means for the result and for the process ----------------------------


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return (first[:REASON_LIMIT] + "...") if len(first) > REASON_LIMIT else first


def is_fatal(message: str) -> bool:
    """Whether an error message says the process's CUDA context is unusable from now on."""
    lowered = message.lower()
    return any(text in lowered for text in FATAL_CUDA_ERRORS)


def classify(exc: BaseException) -> tuple[str, str, bool]:
    """(status, one-line reason, whether the process must stop) for an exception from an implementation."""
    message = one_line(exc)
    lowered = str(exc).lower()
    if isinstance(exc, UnsupportedCase):
        return "unsupported", message, False
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or any(text in lowered for text in OUT_OF_MEMORY):
        return "oom", f"{type(exc).__name__}: {message}", False
    if is_fatal(str(exc)):
        return "crash", f"{type(exc).__name__}: {message}", True
    if isinstance(exc, HarnessError):
        return "error", f"bad input: {message}", False
    return "error", f"{type(exc).__name__}: {message}", False


# --- the child's side -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    """Where a child sends its messages (see ``child_report``)."""

    path: str

    def send(self, message: dict) -> None:
        # Opened for every message: a message is one small write, and nothing is left buffered
        # when the process dies right after it.
        with open(self.path, "a") as handle:
            handle.write(json.dumps(message) + "\n")


def child_report(path: str) -> Report:
    """The first call of every child: have the kernel kill it if the parent dies, and its report."""
    _die_with_parent()
    return Report(path)


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies (even by SIGKILL), which
    its own session would otherwise let it survive."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


# --- the parent's side ------------------------------------------------------------------------------


# The default memory limit of the children of one run: this share of the memory available when
# it starts, divided among the processes that run children side by side (check's --jobs, the
# sweep's torchrun ranks), so that a runaway child is stopped before the machine swaps.
MEMORY_LIMIT_FRACTION = 0.9


@dataclass(frozen=True)
class Limits:
    """What a child may use before it is stopped."""

    timeout_s: float | None = None  # for the whole child (``run_child``) or for each item (``run_items``)
    max_memory_bytes: int | None = None  # resident set; None: no limit


@dataclass(frozen=True)
class ChildOutcome:
    """What came back from one child: its messages, and how the process ended.

    ``failure`` is None when the process exited on its own with status 0; otherwise a
    (status, reason) pair describing the process-level failure (crash, timeout, oom, error).
    """

    messages: list[dict]
    failure: tuple[str, str] | None
    seconds: float
    log_tail: str


@dataclass(frozen=True)
class ItemOutcome:
    """One item's report (``run_items``): the child's record, or the failure that took the item."""

    item: str
    record: dict | None
    failure: str = ""  # when record is None: "crash", "timeout", "oom" or "error"
    detail: str = ""
    last_case: str = ""  # the case the child said it was running when the failure came
    log_tail: str = ""  # when record is None: the end of the child's output (a crash's Python stack)


def child_environment(cuda_visible_devices: str | None = None, *, threads: int | None = None) -> dict[str, str]:
    """The parent's environment, with everything importable here importable in the child too (the
    project, and plugins such as ``tests.broken_impls`` from the current directory)."""
    env = dict(os.environ)
    harness_root = str(Path(__file__).resolve().parent.parent)  # the same harness as here, first
    paths = [harness_root, os.getcwd(), *(p for p in sys.path if p), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in dict.fromkeys(paths) if p)
    env["PYTHONUNBUFFERED"] = "1"  # the log is complete up to the moment the child dies
    if cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_child(
    module: str, args: list[str], *, limits: Limits, stdin: str | None = None, env: dict[str, str] | None = None,
) -> ChildOutcome:
    """Run ``python -m MODULE REPORT_FILE ARGS...`` to its end; never raises for anything the child does.

    ``KeyboardInterrupt`` (Ctrl-C) kills the child's group and is re-raised.
    """
    watching = _watch(module, args, limits=limits, stdin=stdin, env=env, restarts_clock=None, cancel=None)
    while True:
        try:
            next(watching)
        except StopIteration as end:
            return end.value


def run_items(
    module: str, args: list[str], items: list[str], *, limits: Limits, env: dict[str, str] | None = None,
    cancel: threading.Event | None = None, on_message: Callable[[dict], None] | None = None,
) -> Iterator[ItemOutcome]:
    """Yield an ``ItemOutcome`` per item as each finishes, running what remains in a fresh child
    after a failure. Once ``cancel`` is set, the child is killed and nothing more is yielded.
    ``on_message`` sees the child's progress messages (``started``, ``case``) as they come."""
    remaining = list(items)
    while remaining and not (cancel is not None and cancel.is_set()):
        watching = _watch(module, [*args, *remaining], limits=limits, stdin=None, env=env,
                          restarts_clock=lambda message: "started" in message, cancel=cancel)
        running, last_case, reported = None, "", 0
        try:
            while True:
                try:
                    message = next(watching)
                except StopIteration as end:
                    outcome: ChildOutcome = end.value
                    break
                if on_message is not None and ("started" in message or "case" in message):
                    on_message(message)
                if "started" in message:
                    running, last_case = message["started"], ""
                elif "case" in message:
                    last_case = message["case"]
                elif message.get("item") in remaining:
                    remaining.remove(message["item"])
                    running, reported = None, reported + 1
                    yield ItemOutcome(message["item"], message)
        finally:
            watching.close()  # kills the child when our caller stops listening early
        if cancel is not None and cancel.is_set():
            return
        if not remaining:
            return
        if running is None and reported and outcome.failure == _STOPPED_AFTER_FATAL_ERROR:
            continue  # it reported the item that poisoned it; the rest need a fresh process
        # The item that was running (or, if the child died between items, the next one) takes the
        # failure, so that every child started makes progress.
        item = running if running in remaining else remaining[0]
        remaining.remove(item)
        status, reason = outcome.failure or ("error", "the process ended without a result for it")
        yield ItemOutcome(item, None, status, reason, last_case, outcome.log_tail)


def _watch(
    module: str,
    args: list[str],
    *,
    limits: Limits,
    stdin: str | None,
    env: dict[str, str] | None,
    restarts_clock: Callable[[dict], bool] | None,
    cancel: threading.Event | None,
) -> Generator[dict, None, ChildOutcome]:
    """Start the child, yield its messages as they come, and return its ``ChildOutcome``.

    The time limit counts from the start, or from the last message ``restarts_clock`` accepts.
    The child's group is killed however this ends: a limit, the caller closing the generator,
    ``cancel``, or an exception here (Ctrl-C).
    """
    with tempfile.TemporaryDirectory(prefix="lmhead-child-") as tmp:
        report_path = Path(tmp) / "report.jsonl"
        log_path = Path(tmp) / "log.txt"
        report_path.touch()
        messages: list[dict] = []
        start = clock = time.monotonic()
        failure = None
        with open(log_path, "w") as log, open(report_path) as report:
            process = subprocess.Popen(
                [sys.executable, "-m", module, str(report_path), *args],
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # faulthandler: a child killed by a signal leaves its Python stack in the log.
                env={**(os.environ if env is None else env), "PYTHONFAULTHANDLER": "1"},
                text=True,
            )
            partial = ""  # a line the child is still writing

            def new_messages() -> list[dict]:
                nonlocal partial
                *lines, partial = (partial + report.read()).split("\n")
                return [message for message in map(_decode, lines) if message is not None]

            try:
                if stdin is not None:
                    try:
                        process.stdin.write(stdin)
                        process.stdin.close()
                    except BrokenPipeError:  # the child died before reading; its exit status says why
                        pass
                while True:
                    exited = _has_exited(process)
                    for message in new_messages():  # after the exit check: nothing it sent is missed
                        messages.append(message)
                        if restarts_clock is not None and restarts_clock(message):
                            clock = time.monotonic()
                        yield message
                    if exited:
                        break
                    if cancel is not None and cancel.is_set():
                        failure = ("cancelled", "stopped by the parent")
                        break
                    if limits.timeout_s is not None and time.monotonic() - clock > limits.timeout_s:
                        _kill_group(process)
                        failure = ("timeout", f"exceeded the time limit of {limits.timeout_s:g} s")
                        break
                    resident = _resident_bytes(process.pid)
                    if limits.max_memory_bytes and resident > limits.max_memory_bytes:
                        _kill_group(process)
                        failure = (
                            "oom",
                            f"resident memory reached {_gib(resident)}, above the limit of "
                            f"{_gib(limits.max_memory_bytes)} (--max-memory); the process was stopped",
                        )
                        break
                    time.sleep(POLL_SECONDS)
            finally:
                # Compile workers or other leftovers of the child's session go with it. The child is
                # not reaped yet, so its process group id cannot have been reused by anyone else.
                _kill_group(process)
                returncode = process.wait()
            for message in new_messages():  # what it sent just before a limit stopped it
                messages.append(message)
                yield message
        seconds = time.monotonic() - start
        log_tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
    if failure is None and returncode != 0:
        failure = _exit_failure(returncode, log_tail, messages)
    return ChildOutcome(messages=messages, failure=failure, seconds=seconds, log_tail=log_tail)


def _exit_failure(returncode: int, log_tail: str, messages: list[dict]) -> tuple[str, str]:
    """(status, reason) for a child that ended on its own with a non-zero status."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (the kernel's out-of-memory killer sends SIGKILL)" if name == "SIGKILL" else ""
        where = _crash_location(log_tail)
        return "crash", f"killed by {name}{hint}" + (f" at {where}" if where else "")
    if returncode == FATAL_EXIT_STATUS and messages:
        return _STOPPED_AFTER_FATAL_ERROR
    last_line = _last_meaningful_line(log_tail)
    return "error", f"worker exited with status {returncode}" + (f": {last_line}" if last_line else "")


def _decode(line: str) -> dict | None:
    """A message; None for a line that is not one (a subprocess of the child writing to the report)."""
    try:
        message = json.loads(line)
    except json.JSONDecodeError:
        return None
    return message if isinstance(message, dict) else None


def _resident_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _has_exited(process: subprocess.Popen) -> bool:
    """Whether the child has ended, without reaping it (WNOWAIT keeps its pid and group id taken)."""
    return os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the child's process group; call before reaping the child (see ``_has_exited``)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _crash_location(log: str) -> str:
    """Where a killed child was, from the Python stack faulthandler printed: "file:line in function"."""
    lines = log.splitlines()
    headers = [i for i, line in enumerate(lines) if "most recent call first" in line]
    current = [i for i in headers if lines[i].startswith("Current thread")]
    for index in current or headers:
        for frame in lines[index + 1:]:
            match = re.match(r'\s*File "(.+)", line (\d+) in (\S+)', frame)
            if match:
                path, number, function = match.groups()
                return f"{_short_path(path)}:{number} in {function}"
    return ""


def _short_path(path: str) -> str:
    for root in (os.getcwd(), sys.prefix):
        if path.startswith(root + os.sep):
            return os.path.relpath(path, root)
    return path


def _last_meaningful_line(log: str) -> str:
    for line in reversed(log.strip().splitlines()):
        line = line.strip()
        if line and not line.startswith(("File ", "^", "~")):
            return line[:REASON_LIMIT]
    return ""


def _gib(value: int) -> str:
    return f"{value / 2**30:.2f} GiB"
