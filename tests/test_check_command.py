"""``python -m harness check``: exit status, reproducers, one-line errors, the run folder, and
what a hang or a lost CUDA context does to the rest of the check (nothing).

Every deliberately broken plugin of ``tests/broken_impls.py`` makes the check exit non-zero
and print a reproducer that, run as printed, fails again on just that case. Correct
implementations pass. The full CI-profile run over every built-in is left to ``.ci/run``.
"""

import csv
import json
import shlex

import pytest

from harness.check import run_property as run_property_module
from harness.check.run_property import FAIL, Target, run_property
from harness.check.profiles import get_profile
from harness.check.properties import find_property
from harness.check.support_probe import discover_support
from harness.cli import main
from harness.results import BEHAVIOUR_COLUMNS, PROPERTY_COLUMNS
from tests.broken_impls import LosesItsCudaContext


def run_check(capsys, *args):
    status = main(["check", "--profile", "ci", *args])
    out, err = capsys.readouterr()
    return status, out, err


def reproducers(output: str) -> list[str]:
    return [line.split("reproduce: ", 1)[1] for line in output.splitlines() if "reproduce: " in line]


# The property each bug is checked against here (the full default check is in the slow test below).
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
    assert f"{name}  {property_id}" in out and "fail" in out


@pytest.mark.slow
@pytest.mark.parametrize("plugin", BROKEN_PLUGINS)
def test_a_broken_plugin_fails_the_full_default_check(capsys, tmp_path, plugin):
    status, out, _ = run_check(capsys, "--impl", f"tests.broken_impls:{plugin}", "--no-behaviour", "--out", str(tmp_path))
    assert status == 1 and reproducers(out)
    assert "properties failed" in out


@pytest.mark.parametrize("name", ["torch-eager", "chunked", "tests.plugin_examples:plain_eager"])
def test_a_correct_implementation_passes_every_property(capsys, tmp_path, name):
    status, out, _ = run_check(
        capsys, "--impl", name, "--no-behaviour", "--in-process", "--max-examples", "4", "--out", str(tmp_path)
    )
    assert status == 0, out
    assert "all properties hold" in out and "fail" not in out.split("Properties")[1]


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


def test_a_property_that_hangs_times_out_with_its_last_case_and_the_rest_still_run(capsys, tmp_path):
    # The limit also covers the fresh worker's start (its imports) for equivalence/float32: about
    # 4 s on the idle CPU machine, but past 30 s once when three other jobs shared its 2 cores.
    status = main(["check", "--profile", "ci", "--max-examples", "2", "--timeout", "60", "--impl",
                   "tests.broken_impls:hangs_on_float16", "--property", "equivalence/float16",
                   "--property", "equivalence/float32", "--no-behaviour", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 1
    assert "equivalence/float16: timeout: exceeded the time limit of 60 s" in out
    assert "--property equivalence/float16 --case 'N=" in out and "dtype=float16" in out
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
