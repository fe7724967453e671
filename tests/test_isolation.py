"""``harness.isolation``: what a parent learns from children that misbehave, and what it does next.

The child here (``tests/isolation_child.py``) does with each item what the item's name says, so
each test reads as the list of items it runs and what came back for each. It starts in a tenth of
a second, so a time limit of 2 s tells a hang from a slow start with room to spare.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from harness.isolation import FATAL_EXIT_STATUS, Limits, child_environment, run_items
from tests import isolation_child

pytestmark = pytest.mark.slow  # child processes

CHILD = "tests.isolation_child"
ENV = child_environment()
HANG_LIMIT = Limits(timeout_s=2)


def outcomes(items: list[str], limits: Limits = Limits(timeout_s=60), **options) -> dict:
    return {outcome.item: outcome for outcome in run_items(CHILD, [], items, limits=limits, env=ENV, **options)}


def is_gone(pid: int) -> bool:
    """Whether a process has ended (a zombie waiting for its reaper counts as ended)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                         if line.startswith("State:"))
        except (FileNotFoundError, ProcessLookupError):
            return True
        if "Z" in state.split()[1]:
            return True
        time.sleep(0.05)
    return False


def test_the_child_speaks_the_harness_protocol():
    assert isolation_child.FATAL_EXIT_STATUS == FATAL_EXIT_STATUS
    assert isolation_child.HANG_S > 10 * HANG_LIMIT.timeout_s


def test_items_run_one_after_another_in_one_child():
    got = outcomes(["ok-1", "ok-2"])
    assert list(got) == ["ok-1", "ok-2"]
    assert got["ok-1"].record["pid"] == got["ok-2"].record["pid"]
    assert not got["ok-1"].failure and not got["ok-2"].failure


def test_a_hang_fails_its_item_as_a_timeout_with_its_case_and_the_rest_run_in_a_fresh_child():
    got = outcomes(["ok-1", "hang", "ok-2"], HANG_LIMIT)
    assert got["hang"].record is None
    assert (got["hang"].failure, got["hang"].detail) == ("timeout", "exceeded the time limit of 2 s")
    assert got["hang"].last_case == "hang-case"
    assert got["ok-2"].record["pid"] != got["ok-1"].record["pid"]


def test_a_crash_names_the_signal_and_where_the_child_died():
    got = outcomes(["abort", "ok-1"])
    assert got["abort"].failure == "crash"
    assert got["abort"].detail.startswith("killed by SIGABRT at tests/isolation_child.py:")
    assert got["abort"].detail.endswith(" in main") and got["abort"].last_case == "abort-case"
    assert got["ok-1"].record is not None


def test_a_child_that_stops_after_reporting_a_fatal_error_loses_no_item_and_the_rest_run_in_a_fresh_one():
    got = outcomes(["ok-1", "fatal", "ok-2"])
    assert got["fatal"].record["error"].endswith("illegal memory access was encountered")
    assert not any(outcome.failure for outcome in got.values())
    assert got["ok-2"].record["pid"] != got["ok-1"].record["pid"]


def test_a_child_holding_more_memory_than_the_limit_is_stopped_as_oom():
    got = outcomes(["hog", "ok-1"], Limits(timeout_s=60, max_memory_bytes=2**30))
    assert got["hog"].failure == "oom"
    assert got["hog"].detail.startswith("resident memory reached ")
    assert "above the limit of 1.00 GiB" in got["hog"].detail
    assert got["ok-1"].record is not None


def test_a_stopped_child_takes_the_processes_it_started_with_it():
    got = outcomes(["grandchild"], HANG_LIMIT)
    assert got["grandchild"].failure == "timeout"
    assert is_gone(int(got["grandchild"].last_case))


def test_cancelling_kills_the_child_and_reports_nothing_more():
    cancel = threading.Event()
    got = []
    for outcome in run_items(CHILD, [], ["ok-1", "hang", "ok-2"], limits=Limits(timeout_s=60), env=ENV,
                             cancel=cancel):
        got.append(outcome)
        cancel.set()  # as the check does on Ctrl-C
    assert [outcome.item for outcome in got] == ["ok-1"]
    assert is_gone(got[0].record["pid"])
