"""The checks of several implementations in one gate run share the reference and the yardstick of a
case (harness.check.shared): computed once, loaded by the others, the same numbers either way."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from harness.case import parse_case
from harness.check.evaluation import run_reference
from harness.check.profiles import get_profile
from harness.check.properties import find_property
from harness.check.run_property import PASS, Target, run_property
from harness.check.shared import FLOOR_FILE, FOLDER_PREFIX, USABLE_FREE_FRACTION, SharedResults, new_folder
from harness.check.support_probe import discover_support
from harness.registry import resolve

CASE = parse_case("N=5,D=8,V=33,dtype=bfloat16,reduction=sum,bias=1,ignored=some,seed=3")


def test_a_result_saved_by_one_check_is_loaded_by_the_next_without_computing_it(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return run_reference(CASE)

    first = SharedResults(tmp_path).get("reference", CASE, "cpu", compute)
    again = SharedResults(tmp_path).get("reference", CASE, "cpu", compute)  # as another process would
    assert len(calls) == 1
    assert torch.equal(first.loss, again.loss) and torch.equal(first.grads["weight"], again.grads["weight"])
    assert torch.equal(first.magnitudes["grad_weight"], again.magnitudes["grad_weight"])
    assert not list(tmp_path.glob("*.partial")), "written under a temporary name, then renamed"


@pytest.mark.parametrize("other", [("yardstick", CASE, "cpu"), ("reference", CASE.replace(seed=4), "cpu"),
                                   ("reference", CASE, "cuda")])
def test_another_kind_case_or_device_is_not_taken_for_it(tmp_path, other):
    shared = SharedResults(tmp_path)
    shared.get("reference", CASE, "cpu", lambda: "reference of the case")
    assert shared.get(*other, lambda: "computed") == "computed"


def test_without_a_folder_everything_is_computed_in_place():
    calls = []
    for _ in range(2):
        SharedResults().get("reference", CASE, "cpu", lambda: calls.append(1))
    assert len(calls) == 2


def test_a_run_uses_at_most_half_the_free_space_it_started_with(tmp_path, monkeypatch):
    """Saved results only save time: a run over thousands of cases must not fill the disk."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with new_folder() as name:
        floor = int((Path(name) / FLOOR_FILE).read_text())
        assert floor == pytest.approx(shutil.disk_usage(name).free * (1 - USABLE_FREE_FRACTION), rel=0.01)
        (Path(name) / FLOOR_FILE).write_text(str(shutil.disk_usage(name).free))  # as if the share were used up
        calls = []
        for _ in range(2):
            SharedResults(Path(name)).get("reference", CASE, "cpu", lambda: calls.append(1) or run_reference(CASE))
        assert len(calls) == 2 and not list(Path(name).glob("*.pt"))


def test_a_new_run_removes_the_folders_of_runs_that_were_killed_but_not_of_live_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = tmp_path / f"{FOLDER_PREFIX}{dead.pid}-abc"
    live = tmp_path / f"{FOLDER_PREFIX}{os.getppid()}-def"
    for folder in (killed, live):
        folder.mkdir()
        (folder / "result.pt").write_bytes(b"x")
    with new_folder() as name:
        assert Path(name).name.startswith(f"{FOLDER_PREFIX}{os.getpid()}-")
    assert not killed.exists() and live.exists()


def test_drawn_cases_of_a_random_profile_are_not_saved_but_explicit_examples_are(tmp_path):
    """dev and thorough draw different cases for every implementation: saving them would only fill
    the folder (a dev run over 14 implementations wrote 22 GiB before this rule)."""
    equivalence = find_property("equivalence/float32")
    saving = dataclasses.replace(  # its explicit examples and draws, with a check that only saves
        equivalence, check=lambda impl, case, ctx: ctx.shared.get("reference", case, "cpu", lambda: torch.zeros(1)))
    target = Target("torch-eager", resolve("torch-eager"))
    support = discover_support(target.impl, "cpu")
    saved = {}
    for profile in ("ci", "dev"):
        folder = tmp_path / profile
        folder.mkdir()
        result = run_property(target, saving, support, get_profile(profile, 3), "cpu", shared=SharedResults(folder))
        assert result.status == PASS
        saved[profile] = len(list(folder.glob("*.pt")))
    assert saved["dev"] > 0 and saved["ci"] > saved["dev"]


def test_a_result_that_cannot_be_saved_is_still_returned(tmp_path, monkeypatch):
    """A disk that fills up during a run (it did, 2026-12-07) costs time, not verdicts."""
    def full_disk(obj, path):
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    assert SharedResults(tmp_path).get("reference", CASE, "cpu", lambda: "computed") == "computed"
    assert not list(tmp_path.iterdir())
