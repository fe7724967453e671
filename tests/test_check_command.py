"""``python -m harness check``: exit status, reproducers, one-line errors, the run folder, and
what a hang or a lost CUDA context does to the rest of the check (nothing).

Every deliberately broken plugin of ``tests/broken_impls.py`` makes the check exit non-zero on the
property that exists to catch it, and print a reproducer that, run as printed, fails again on just
that case. A correct plugin passes. The whole ci gate runs end to end in ``tests/test_subtle_bugs.py``;
the ci gate over every built-in is left to ``.ci/run``.
"""

import csv
import dataclasses
import json
import shlex

import pytest

from harness.check import command as command_module
from harness.check import run_property as run_property_module
from harness.check.run_property import FAIL, PASS, PropertyResult, Target, run_property
from harness.check.profiles import get_profile
from harness.check.properties import find_property
from harness.check.support_probe import discover_support
from harness.check.worker import SUPPORT_ITEM
from harness.cli import main
from harness.isolation import ItemOutcome
from harness.results import BEHAVIOUR_COLUMNS, PROPERTY_COLUMNS
from tests.broken_impls import LosesItsCudaContext


def run_check(capsys, *args):
    status = main(["check", "--profile", "ci", *args])
    out, err = capsys.readouterr()
    return status, out, err


def reproducers(output: str) -> list[str]:
    return [line.split("reproduce: ", 1)[1] for line in output.splitlines() if "reproduce: " in line]


# The property each bug exists for: its explicit examples and drawn cases reject it.
BROKEN_PLUGINS = {
    "wrong_mean_denominator": "equivalence/float32",
    "dropped_vocabulary_tail": "equivalence/bfloat16",
    "smoothing_on_ignored_tokens": "equivalence/float16",
    "dropped_last_chunk": "invariance/chunk-size",
    "missing_bias_gradient": "equivalence/float32",
    "z_loss_without_gradient": "equivalence/float32",
    "ignores_upstream_gradient": "autograd/scaled-loss",
    "scales_saved_gradient_in_place": "autograd/retain-graph",
    "reuses_input_buffer": "autograd/inputs-unchanged",
}


@pytest.mark.parametrize("plugin, property_id", BROKEN_PLUGINS.items())
def test_a_broken_plugin_fails_with_a_reproducer_that_reruns_just_that_case(capsys, tmp_path, plugin, property_id):
    name = f"tests.broken_impls:{plugin}"
    status, out, _ = run_check(
        capsys, "--impl", name, "--property", property_id, "--no-behaviour", "--in-process", "--out", str(tmp_path)
    )
    assert status == 1
    (command,) = reproducers(out)
    argv = shlex.split(command)
    assert argv[:4] == ["python", "-m", "harness", "check"] and "--case" in argv

    status, out, _ = run_check(capsys, *argv[4:])
    assert status == 1
    assert f"{name}  {property_id}  fail  " in out  # the rerun's one line: implementation, property, status


def test_a_correct_plugin_passes_and_what_does_not_apply_to_it_is_said(capsys, tmp_path):
    """A plain function has no chunk size and no logits path: those properties are n/a, not failed.
    (The correct kernels pass every property in tests/test_subtle_bugs.py.)"""
    properties = ["autograd/tied-weights", "invariance/permutation", "invariance/chunk-size", "logits/keep-last"]
    status, out, _ = run_check(capsys, "--impl", "tests.plugin_examples:plain_eager", "--no-behaviour", "--in-process",
                               "--max-examples", "2", *[arg for p in properties for arg in ("--property", p)],
                               "--out", str(tmp_path))
    assert status == 0, out
    assert "all properties hold" in out
    assert _statuses(tmp_path) == {"autograd/tied-weights": "pass", "invariance/permutation": "pass",
                                   "invariance/chunk-size": "n/a", "logits/keep-last": "n/a"}


@pytest.mark.slow
def test_the_run_folder_holds_meta_properties_and_behaviour(capsys, tmp_path):
    """The default run: each implementation in child processes, rows written as they come."""
    status, _, _ = run_check(
        capsys, "--impl", "torch-eager", "--impl", "tests.broken_impls:missing_bias_gradient",
        "--property", "equivalence/float32", "--out", str(tmp_path),
    )
    assert status == 1
    (run_dir,) = tmp_path.iterdir()
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["kind"] == "check" and meta["profile"] == "ci"
    assert {"torch", "triton", "liger-kernel", "cut-cross-entropy", "hypothesis"} <= set(meta["packages"])
    assert meta["device_kind"] in ("cpu", "cuda") and "git_commit" in meta
    assert meta["implementations"] == ["torch-eager", "tests.broken_impls:missing_bias_gradient"]
    with open(run_dir / "properties.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == PROPERTY_COLUMNS
    by_impl = {r["implementation"]: r for r in rows}  # in the order they finished
    assert by_impl["torch-eager"]["status"] == "pass"
    assert by_impl["tests.broken_impls:missing_bias_gradient"]["status"] == "fail"
    assert by_impl["tests.broken_impls:missing_bias_gradient"]["reproducer"].startswith("python -m harness check")
    with open(run_dir / "behaviour.csv") as handle:
        behaviour = list(csv.DictReader(handle))
    assert tuple(behaviour[0]) == BEHAVIOUR_COLUMNS
    eager = {r["edge_case"]: r["behaviour"] for r in behaviour if r["implementation"] == "torch-eager"}
    assert eager["all-ignored-mean"] == "loss nan; grads 0"
    assert eager["label-equals-vocab"] == "error (IndexError)"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--impl", "no-such-kernel"], "error: unknown implementation 'no-such-kernel'"),
        (["--impl", "no_such_module:attr"], "error: cannot import plugin module 'no_such_module'"),
        (["--impl", "torch-eager", "--case", "N=7,D=5"], "error: --case needs V"),
        (["--impl", "torch-eager", "--case", "N=7,D=5,V=9,colour=red"], "error: unknown --case key 'colour'"),
        (["--impl", "torch-eager", "--property", "equivalence/float64"], "error: unknown property"),
        (["--case", "N=7,D=5,V=9"], "error: --case needs --impl"),
        (["--impl", "torch-eager", "--property", "invariance/chunk-size", "--case", "N=7,D=5,V=9,chunk=2"],
         "error: torch-eager has no chunk size"),
        (["--impl", "torch-eager", "--timeout", "0"], "error: --timeout must be > 0 seconds"),
        (["--impl", "torch-eager", "--max-memory", "-1"], "error: --max-memory must be >= 0 GiB"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(capsys, tmp_path, args, message):
    status, _, err = run_check(capsys, *args, "--out", str(tmp_path))
    assert status == 2
    assert err.strip().startswith(message) and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_after_an_illegal_memory_access_the_remaining_properties_run_in_a_fresh_process(capsys, tmp_path):
    """float16 raises the error; in that process every later call would too. float32 and bfloat16
    come after it, and pass: their worker is a fresh one."""
    status = main(["check", "--profile", "ci", "--max-examples", "2", "--impl",
                   "tests.broken_impls:loses_its_cuda_context", "--property", "equivalence/float16",
                   "--property", "equivalence/float32", "--property", "equivalence/bfloat16",
                   "--no-behaviour", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 1 and "1 properties failed" in out
    assert "- tests.broken_impls:loses_its_cuda_context equivalence/float16: raised RuntimeError: CUDA error: an " \
           "illegal memory access was encountered" in out
    assert "--property equivalence/float16 --case 'N=" in out
    assert _statuses(tmp_path) == {"equivalence/float16": "fail", "equivalence/float32": "pass",
                                   "equivalence/bfloat16": "pass"}


def test_a_property_that_times_out_fails_with_its_last_case_as_the_reproducer_and_the_rest_still_run(
        capsys, tmp_path, monkeypatch):
    """The check's side of a hang: ``harness.isolation`` stops the worker at the limit
    (``tests/test_isolation.py``) and reports the property it was running, with its last case; the
    rest run in a fresh worker. Here a stand-in for it reports exactly that, at once."""
    last_case = "N=7,D=5,V=9,dtype=float16,reduction=mean,seed=1"
    passed = PropertyResult("tests.broken_impls:wrong_mean_denominator", "equivalence/float32", PASS, 3, "", "", 0.5)
    support = discover_support(LosesItsCudaContext(), "cpu")

    def stopped_at_the_limit(module, args, items, *, limits, env, cancel):
        assert module == "harness.check.worker" and items == [SUPPORT_ITEM, "equivalence/float16",
                                                             "equivalence/float32"]
        yield ItemOutcome(SUPPORT_ITEM, {"item": SUPPORT_ITEM, "support": support.to_json()})
        yield ItemOutcome("equivalence/float16", None, "timeout",
                          f"exceeded the time limit of {limits.timeout_s:g} s", last_case)
        yield ItemOutcome("equivalence/float32", {"item": "equivalence/float32", **dataclasses.asdict(passed)})

    monkeypatch.setattr(command_module, "run_items", stopped_at_the_limit)
    status, out, _ = run_check(capsys, "--timeout", "7", "--impl", "tests.broken_impls:wrong_mean_denominator",
                               "--property", "equivalence/float16", "--property", "equivalence/float32",
                               "--no-behaviour", "--out", str(tmp_path))
    assert status == 1
    assert "equivalence/float16: timeout: exceeded the time limit of 7 s" in out
    assert (f"reproduce: python -m harness check --impl tests.broken_impls:wrong_mean_denominator "
            f"--property equivalence/float16 --case '{last_case}'") in out
    assert _statuses(tmp_path) == {"equivalence/float16": "fail", "equivalence/float32": "pass"}


def _statuses(out_dir) -> dict[str, str]:
    (run_dir,) = out_dir.iterdir()
    with open(run_dir / "properties.csv") as handle:
        return {row["property"]: row["status"] for row in csv.DictReader(handle)}


def test_a_drawn_case_that_loses_the_cuda_context_is_the_reproducer_and_nothing_runs_after_it(monkeypatch):
    """Hypothesis would shrink the failure, on a context where every case now fails the same way,
    and print a case that never failed on its own; the check stops at the first one instead."""
    monkeypatch.setattr(run_property_module, "fitted_examples", lambda *args: [])  # drawn cases only
    impl = LosesItsCudaContext()  # its own, so that the plugin's lost context stays in this test
    announced = []
    result = run_property(Target("lost", impl), find_property("equivalence/float16"), discover_support(impl, "cpu"),
                          get_profile("ci", max_examples=50), "cpu", on_case=announced.append)
    assert result.status == FAIL and "illegal memory access" in result.detail
    first_failing = next(i for i, case in enumerate(announced) if case.num_tokens > 3)
    assert first_failing == len(announced) - 1, "no case ran after it"
    assert result.reproducer.endswith(f"--case '{announced[-1]}'")
