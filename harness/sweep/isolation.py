"""Run one job in a fresh child process, with a time limit and a resident-memory limit.

The child (``harness.sweep.worker``) gets its own session, so a Ctrl-C in the terminal reaches
only the sweep, and its whole process group (including any compile workers it started) can be
killed at once. While it runs, the parent polls it:

- past the time limit, the group is killed: ``timeout``;
- past the memory limit (resident set of the child, read from ``/proc``), the group is killed:
  ``oom``. This is a guard for CPU runs, where exhausting host memory would otherwise bring in
  the kernel's OOM killer or swap the machine to a halt; ``RLIMIT_AS`` is not used because
  torch, OpenMP and Triton reserve far more address space than they touch. A GPU's own memory
  needs no guard: PyTorch raises ``OutOfMemoryError``, which the worker reports as ``oom``;
- killed by a signal it did not get from us (abort, segfault, the kernel's OOM killer): ``crash``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

POLL_SECONDS = 0.05
LOG_TAIL_LINES = 200


@dataclass(frozen=True)
class ChildOutcome:
    """What came back from one child: its result lines, and how the process ended.

    ``failure`` is None when the process exited on its own with status 0; otherwise a
    (status, reason) pair describing the process-level failure (crash, timeout, oom, error).
    """

    messages: list[dict]
    failure: tuple[str, str] | None
    seconds: float
    log_tail: str


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


def _read_messages(path: Path) -> list[dict]:
    messages = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                messages.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by the process dying mid-write
                break
    return messages


def _crash_location(log: str) -> str:
    """Where a killed worker was, from the Python stack faulthandler printed: "file:line in function"."""
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
            return line[:300]
    return ""


def _gib(value: int) -> str:
    return f"{value / 2**30:.2f} GiB"


def run_isolated(
    job: dict,
    *,
    timeout_s: float,
    max_memory_bytes: int | None = None,
    env: dict[str, str] | None = None,
    launcher: list[str] | None = None,
) -> ChildOutcome:
    """Run ``job`` in ``python -m harness.sweep.worker``; never raises for anything the child does.

    ``launcher``: another command to run instead (``torchrun ... -m MODULE``, for the ranks of a
    distributed implementation), given RESULT_FILE and a file holding the job as its arguments.
    The memory limit then watches the launcher's own process only.
    ``KeyboardInterrupt`` (Ctrl-C) kills the child and is re-raised.
    """
    with tempfile.TemporaryDirectory(prefix="lmhead-sweep-") as tmp:
        result_path = Path(tmp) / "result.jsonl"
        log_path = Path(tmp) / "log.txt"
        command = [sys.executable, "-m", "harness.sweep.worker", str(result_path)]
        if launcher is not None:
            job_path = Path(tmp) / "job.json"
            job_path.write_text(json.dumps(job))
            command = [*launcher, str(result_path), str(job_path)]
        start = time.monotonic()
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                text=True,
            )
            failure = None
            try:
                process.stdin.write(json.dumps(job))
                process.stdin.close()
            except BrokenPipeError:  # the child died before reading its job; its exit status says why
                pass
            try:
                while not _has_exited(process):
                    time.sleep(POLL_SECONDS)
                    elapsed = time.monotonic() - start
                    if elapsed > timeout_s:
                        _kill_group(process)
                        failure = ("timeout", f"exceeded the time limit of {timeout_s:g} s")
                        break
                    resident = _resident_bytes(process.pid)
                    if max_memory_bytes and resident > max_memory_bytes:
                        _kill_group(process)
                        failure = (
                            "oom",
                            f"resident memory reached {_gib(resident)}, above the limit of "
                            f"{_gib(max_memory_bytes)} (--max-memory); the process was stopped",
                        )
                        break
            except BaseException:  # Ctrl-C (or anything else) in the sweep: leave no child behind
                _kill_group(process)
                process.wait()
                raise
            # Compile workers or other leftovers of the child's session go with it. The child is
            # not reaped yet, so its process group id cannot have been reused by anyone else.
            _kill_group(process)
            returncode = process.wait()
        seconds = time.monotonic() - start
        log_text = log_path.read_text(errors="replace")
        log_tail = "\n".join(log_text.splitlines()[-LOG_TAIL_LINES:])
        messages = _read_messages(result_path)

    if failure is None and returncode != 0:
        last_line = _last_meaningful_line(log_tail)
        if returncode < 0:
            try:
                name = signal.Signals(-returncode).name
            except ValueError:
                name = f"signal {-returncode}"
            hint = " (the kernel's out-of-memory killer sends SIGKILL)" if name == "SIGKILL" else ""
            where = _crash_location(log_tail)
            failure = ("crash", f"killed by {name}{hint}" + (f" at {where}" if where else ""))
        elif returncode == 3 and messages:  # the worker stopped after a fatal CUDA error it reported
            failure = ("crash", "not measured: the process stopped after a fatal error in an earlier mode")
        else:
            failure = ("error", f"worker exited with status {returncode}" + (f": {last_line}" if last_line else ""))
    return ChildOutcome(messages=messages, failure=failure, seconds=seconds, log_tail=log_tail)
