"""``python -m harness check``: exit status, reproducers, one-line errors, the run folder, what
a terminal shows while it runs, and what a hang or a lost CUDA context does to the rest of the
check (nothing; through ``harness.check()``, the same engine).

Every deliberately broken plugin of ``tests/broken_impls.py`` makes the check exit non-zero
and print a reproducer that, run as printed, fails again on just that case. Correct
implementations pass. The full CI-profile run over every built-in is left to ``.ci/run``.
"""

import csv
import io
import json
import os
import re
import shlex
import subprocess

import pytest
from rich.console import Console

from harness import check
from harness.check import command
from harness.check import run_property as run_property_module
from harness.check.run_property import FAIL, PropertyResult, Target, run_property
from harness.check.profiles import get_profile
from harness.check.properties import find_property
from harness.check.support_probe import discover_support
from harness.cli import build_parser, main
from harness.results import BEHAVIOUR_COLUMNS, PROPERTY_COLUMNS
from tests.broken_impls import LosesItsCudaContext


def run_check(capsys, *args):
    status = main(["check", "--profile", "ci", *args])
    out, err = capsys.readouterr()
    return status, out, err


def reproducers(output: str) -> list[str]:
    return [line.split("reproduce: ", 1)[1] for line in output.splitlines() if "reproduce: " in line]


def check_arguments(reproducer: str) -> list[str]:
    """The arguments after ``python -m harness check`` of a reproducer (after its environment and
    interpreter: ``PYTHONPATH=... /path/to/python -m harness check ...``)."""
    argv = shlex.split(reproducer)
    while re.fullmatch(r"[A-Z_]+=.*", argv[0]):
        argv.pop(0)
    assert argv[1:4] == ["-m", "harness", "check"] and "python" in argv[0], reproducer
    return argv[4:]


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
    (reproducer,) = reproducers(out)
    argv = check_arguments(reproducer)
    assert "--case" in argv

    status, out, _ = run_check(capsys, *argv)
    assert status == 1
    assert f"{name}  {property_id}" in out and "fail" in out


@pytest.mark.slow
@pytest.mark.parametrize("plugin", BROKEN_PLUGINS)
def test_a_broken_plugin_fails_the_full_default_check(plugin):
    report = check(f"tests.broken_impls:{plugin}")
    assert report.failures and all(failure.reproducer for failure in report.failures), str(report)


@pytest.mark.parametrize("name", ["torch-eager", "chunked", "tests.plugin_examples:plain_eager"])
def test_a_correct_implementation_passes_every_property(name):
    report = check(name, max_examples=4, in_process=True)
    assert report.passed, str(report)


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
    assert check_arguments(by_impl["tests.broken_impls:missing_bias_gradient"]["reproducer"])[:2] == \
        ["--impl", "tests.broken_impls:missing_bias_gradient"]
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


def test_after_an_illegal_memory_access_the_remaining_properties_run_in_a_fresh_process():
    """float16 raises the error; in that process every later call would too. float32 and bfloat16
    come after it, and pass: their worker is a fresh one."""
    report = check("tests.broken_impls:loses_its_cuda_context", max_examples=2,
                   properties=["equivalence/float16", "equivalence/float32", "equivalence/bfloat16"])
    assert {r.property: r.status for r in report.results} == {
        "equivalence/float16": "fail", "equivalence/float32": "pass", "equivalence/bfloat16": "pass"}, str(report)
    failure = report["equivalence/float16"]
    assert failure.detail.startswith("raised RuntimeError: CUDA error: an illegal memory access was encountered")
    assert "--property equivalence/float16 --case 'N=" in failure.reproducer


def test_a_property_that_hangs_times_out_with_its_last_case_and_the_rest_still_run():
    # The limit also covers the fresh worker's start (its imports) for equivalence/float32: about
    # 4 s on the idle CPU machine, but past 30 s once when three other jobs shared its 2 cores.
    report = check("tests.broken_impls:hangs_on_float16", max_examples=2, timeout=60,
                   properties=["equivalence/float16", "equivalence/float32"])
    assert {r.property: r.status for r in report.results} == {"equivalence/float16": "fail",
                                                               "equivalence/float32": "pass"}, str(report)
    hung = report["equivalence/float16"]
    assert hung.detail == "timeout: exceeded the time limit of 60 s"
    assert "--property equivalence/float16 --case 'N=" in hung.reproducer and "dtype=float16" in hung.reproducer


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


# --- what the terminal shows ----------------------------------------------------------------------


@pytest.mark.slow
def test_an_error_the_kernel_raised_is_recorded_with_its_traceback_and_printed_with_verbose(capsys, tmp_path):
    name = "tests.broken_impls:raises_past_64_tokens"
    args = ["--impl", name, "--property", "equivalence/float32", "--max-examples", "0", "--no-behaviour"]
    status, out, _ = run_check(capsys, *args, "--out", str(tmp_path / "quiet"))
    assert status == 1
    assert f"- {name} equivalence/float32: raised ValueError: this kernel's tile holds 64 tokens, got 65" in out
    assert "Traceback" not in out and "--verbose prints the traceback" in out
    (run_dir,) = (tmp_path / "quiet").iterdir()
    with open(run_dir / "properties.csv") as handle:
        (row,) = csv.DictReader(handle)
    assert row["detail"] == "raised ValueError: this kernel's tile holds 64 tokens, got 65"
    assert row["traceback"].startswith("Traceback (most recent call last):")
    assert "in raises_past_64_tokens" in row["traceback"] and "in _check_token_count" in row["traceback"]
    assert "hypothesis" not in row["traceback"] and "run_property.py" not in row["traceback"]

    for flag in ("--verbose", "--in-process"):
        status, out, _ = run_check(capsys, *args, flag, "--out", str(tmp_path / flag))
        assert status == 1
        assert "    Traceback (most recent call last):" in out and 'broken_impls.py", line' in out, flag


def test_the_properties_table_fits_80_columns_and_keeps_its_caption():
    names = [f"tests.plugin_examples:kernel_number_{i}" for i in range(6)]
    results = [PropertyResult(name, "equivalence/float32", "pass", 120, "", "", 1.0, refused=3) for name in names]
    console = Console(file=io.StringIO(), width=80)
    command.print_property_table(console, results, names)
    text = console.file.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "Properties (cases that ran; [cases refused at run time]), in 6 parts:" in text
    assert all(name in text for name in names) and "pass (120) [3 refused]" in text


@pytest.mark.slow
def test_a_terminal_shows_each_implementations_property_and_cases_while_it_runs(tmp_path):
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    args = build_parser("check").parse_args(
        ["check", "--profile", "ci", "--impl", "tests.plugin_examples:plain_eager", "--property", "equivalence/float32",
         "--max-examples", "0", "--no-behaviour", "--in-process", "--out", str(tmp_path)])
    assert command.run(args, console) == 0
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", console.file.getvalue())  # without colours and cursor moves
    finished = shown.index("all properties hold")
    live = re.search(r"tests\.plugin_examples:plain_eager\s+equivalence/float32\s+case (\d+)\s+\d+ s", shown)
    assert live is not None and live.start() < finished, shown[:2000]
    assert int(live.group(1)) >= 1


def test_check_help_has_examples_and_the_exit_statuses(capsys):
    with pytest.raises(SystemExit):
        main(["check", "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "python -m harness check --impl my_kernels.lce:linear_ce" in out
    assert "exit status: 0 every property holds" in out


@pytest.mark.slow
def test_a_reproducer_runs_as_printed_in_a_new_shell_from_another_directory(capsys, tmp_path):
    """No PYTHONPATH, no CI, another working directory: the line names what it needs itself."""
    status, out, _ = run_check(capsys, "--impl", "tests.broken_impls:missing_bias_gradient", "--property",
                               "equivalence/float32", "--max-examples", "0", "--no-behaviour", "--in-process",
                               "--out", str(tmp_path))
    assert status == 1
    (reproducer,) = reproducers(out)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "CI")}
    done = subprocess.run(["bash", "-c", reproducer], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 1, done.stderr
    assert "tests.broken_impls:missing_bias_gradient  equivalence/float32  fail" in done.stdout
    assert "grad_bias: no gradient arrived although the input requires grad" in done.stdout
