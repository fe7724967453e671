"""``python -m harness check``: exit status, reproducers, one-line errors and the run folder.

Every deliberately broken plugin of ``tests/broken_impls.py`` makes the check exit non-zero
and print a reproducer that, run as printed, fails again on just that case. Correct
implementations pass. The full CI-profile run over every built-in is left to ``.ci/run``.
"""

import csv
import json
import shlex

import pytest

from harness.cli import main
from harness.results import BEHAVIOUR_COLUMNS, PROPERTY_COLUMNS


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
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(capsys, tmp_path, args, message):
    status, _, err = run_check(capsys, *args, "--out", str(tmp_path))
    assert status == 2
    assert err.strip().startswith(message) and len(err.strip().splitlines()) == 1
