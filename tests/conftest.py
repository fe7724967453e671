"""Shared test setup: the two tiers, the gate's Hypothesis profiles (``ci`` when ``CI`` is set), and
one thread per test process when pytest-xdist runs two of them.

``pytest`` runs the quick tier; ``pytest --full`` adds the tests marked ``slow`` (child processes,
torchrun, the browser, torch.compile and Triton's interpreter, whole runs of the gate): see
docs/testing.md.
"""

import os

import pytest
import torch
from hypothesis import settings

import harness  # noqa: F401 - sets TRITON_INTERPRET before any test imports triton
from harness.check.profiles import register_profiles

register_profiles()
if os.environ.get("CI"):
    settings.load_profile("ci")

# pytest-xdist's workers share the machine's cores: each gets its share for torch's threads, and so
# do the processes its tests start (a check sets its own children's from the machine's cores).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _THREADS = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
    torch.set_num_threads(_THREADS)


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help="run the full tier: the quick tests and those marked slow (what CI runs)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
