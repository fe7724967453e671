"""Was the machine loaded while the sweep measured? The load check that meta.json, the sweep's last
lines and the dashboard's first screen report.

The sweep times one fixed square matmul (``measure.probe_tflops``: torch.mm, 1024 x 1024 in
float32 on a CPU, 4096 x 4096 in bfloat16 on a GPU) at its start, in each job's process before the
case (where a job starts a process at all), and at its end, and records the load average
(``os.getloadavg``) with each. The machine was **loaded**, and the timings are unreliable, when

- the probe's rate moved by more than ``RATE_TOLERANCE`` between its slowest and its fastest
  reading: on the project's CPU machine (AMD EPYC, 2 cores) quiet runs repeat the matmul rate
  within about 10 % (torch.mm float32: 0.198-0.216 TFLOP/s over five committed runs of
  2026-11-24, 0.175-0.197 over five of 2026-12-02), while one other busy process on its two cores
  halves it (about 50 %); 25 % lies between the two. On a GPU, clocks and temperature move a
  sustained matmul rate by up to about 10 % too;
- or, on a CPU, other processes kept more than ``BUSY_CORES_FRACTION`` of the cores busy at the
  start (a load that stays the same all along does not move the rate, yet it slows and disturbs
  every timing). That is read from the CPU time the whole machine spent over ``BUSY_WINDOW_S``
  while the sweep waited (``/proc/stat``), not from the 1-minute load average, which still counts
  a job that ended a minute before (it flagged run 20261207-110656 so); where there is no
  ``/proc/stat``, the load average decides.

A case may also be measured under a load of its own choosing (the case file's ``companions``):
``companion_processes`` starts that many CPU-bound processes beside its jobs, so that how an
implementation degrades on a shared machine is measured, not met by chance. Readings taken while
they run are recorded with their count and left out of the judgement above.

Where a companion runs decides how much of the machine a job can have. Linux's scheduler shares
the CPUs between sessions first where autogroup scheduling is on (the default of most
distributions; cgroups do the same between containers): a companion in a session of its own
(``COMPANION_SESSIONS``' "own": another user's job, a shared CI runner) keeps two thirds of a CPU
against a two-thread job on two cores, one started by the job's process ("job": a DataLoader's
worker) a half. On the project's CPU machine two pinned threads of one-thread matmuls drawn from
one queue, with no barrier at all, took 1.52x their quiet time beside the first and 1.37x beside
the second (median of 5; docs/measurements/2026-12-07-chunked-under-load.md): no implementation
does better.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import subprocess
import sys
import time
from collections.abc import Iterator

# What a companion runs: a pure-Python busy loop, one core's worth of work that allocates nothing
# and does no I/O (a data loader's or another training process's CPU share, reduced to its load).
COMPANION_PROGRAM = "while True: pass"

# Where a case's companions run (the case file's ``companion_session``): in a session of their own,
# or in the job's (started by the job's process). See the module's docstring.
COMPANION_SESSIONS = ("own", "job")

RATE_TOLERANCE = 0.25
BUSY_CORES_FRACTION = 0.5
BUSY_WINDOW_S = 2.0


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages, or None where the system has none."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def busy_cores(window_s: float = BUSY_WINDOW_S) -> float | None:
    """How many cores' worth of CPU time the machine spent over the next ``window_s`` seconds (this
    process sleeps through them), from ``/proc/stat``; None where there is none."""
    def spent() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle and iowait
        return sum(fields[:8]) - idle, sum(fields[:8])  # guest time is already in user time
    try:
        busy_before, total_before = spent()
        time.sleep(window_s)
        busy_after, total_after = spent()
    except (OSError, ValueError, IndexError):
        return None
    elapsed = total_after - total_before
    return round((busy_after - busy_before) / elapsed * (os.cpu_count() or 1), 2) if elapsed > 0 else None


def probe_record(where: str, tflops: float | None, load: list[float] | None = None, companions: int = 0,
                 busy: float | None = None) -> dict:
    """One reading of the probe, with the time and the load average (``load``: read earlier, before
    the sweep's own processes ran), the busy cores (``busy_cores``, where read), and the companion
    processes running beside it, if any."""
    record = {"where": where, "time": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
              "tflops": tflops, "load_average": load or load_average()}
    if busy is not None:
        record["busy_cores"] = busy
    return {**record, "companions": companions} if companions else record


@contextlib.contextmanager
def companion_processes(count: int, *, own_session: bool = True) -> Iterator[list[subprocess.Popen]]:
    """``count`` CPU-bound processes running for the duration of the block, then killed; each in a
    session of its own, or (``own_session=False``) in this process's, as its own workers would be."""
    companions = [subprocess.Popen([sys.executable, "-c", COMPANION_PROGRAM], stdin=subprocess.DEVNULL,
                                   start_new_session=own_session) for _ in range(count)]
    try:
        yield companions
    finally:
        for companion in companions:
            companion.kill()
        for companion in companions:
            companion.wait()


def judge(probes: list[dict], *, device_kind: str, cpu_count: int | None) -> dict:
    """``meta.json``'s ``load`` section: the readings, the limits, and whether the machine was loaded.
    Readings taken beside a case's own companion processes are kept but not judged."""
    rates = [p["tflops"] for p in probes if p.get("tflops") and not p.get("companions")]
    moved = 1 - min(rates) / max(rates) if len(rates) >= 2 else None
    reasons = []
    if moved is not None and moved > RATE_TOLERANCE:
        reasons.append(f"the device's matmul rate moved by {moved:.0%} during the sweep ({min(rates):.3g} to "
                       f"{max(rates):.3g} TFLOP/s; beyond {RATE_TOLERANCE:.0%} it is load, not noise)")
    start = next((p for p in probes if p.get("where") == "start"), None) or {}
    busy, start_load = start.get("busy_cores"), start.get("load_average")
    if device_kind == "cpu" and cpu_count:
        if busy is not None and busy > BUSY_CORES_FRACTION * cpu_count:
            reasons.append(f"other processes kept {busy:.1f} of {cpu_count} cores busy at the start")
        elif busy is None and start_load and start_load[0] > BUSY_CORES_FRACTION * cpu_count:
            reasons.append(f"the load average was {start_load[0]:.1f} on {cpu_count} cores at the start")
    return {
        "loaded": bool(reasons),
        "reasons": reasons,
        "rate_moved": moved,
        "rate_tolerance": RATE_TOLERANCE,
        "busy_cores_fraction": BUSY_CORES_FRACTION,
        "probes": probes,
    }


def warning(meta: dict) -> str | None:
    """The one-sentence warning for a run whose machine was loaded (None: not loaded, or not checked)."""
    load = meta.get("load") or {}
    if not load.get("loaded"):
        return None
    return ("The machine was loaded while this sweep ran, so its timings are unreliable: "
            + "; ".join(load.get("reasons") or ["see meta.json's load section"])
            + ". Rerun it on a quiet machine before drawing conclusions.")


def summary(meta: dict) -> str:
    """One line on the load check for a run that passed it (or that predates it)."""
    load = meta.get("load")
    if not load:
        return "no load check recorded (a run from before the check existed)"
    moved = load.get("rate_moved")
    rates = [p["tflops"] for p in load.get("probes", []) if p.get("tflops")]
    if moved is None:
        return "load check: too few matmul-rate readings to judge"
    return (f"load check passed: the matmul rate stayed within {moved:.0%} over {len(rates)} readings "
            f"(limit {load.get('rate_tolerance', RATE_TOLERANCE):.0%})")
