"""``python -m harness check``: exit status, reproducers, one-line errors, the run folder, what
a terminal shows while it runs, and what a hang or a lost CUDA context does to the rest of the
check (nothing; through ``harness.check()``, the same engine).

Every deliberately broken plugin of ``tests/broken_impls.py`` makes the check exit non-zero
and print a reproducer that, run as printed, fails again on just that case. Correct
implementations pass. The full CI-profile run over every built-in is left to ``.ci/run``.
"""

import csv
import dataclasses
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
from harness.check import engine as engine_module
from harness.check.run_property import FAIL, PASS, PropertyResult, Target, run_property
from harness.check.profiles import get_profile
from harness.check.properties import find_property
from harness.check.support_probe import discover_support
from harness.check.worker import SUPPORT_ITEM
from harness.cli import build_parser, main
from harness.isolation import ItemOutcome
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
    assert meta["finished"], "a completed run is marked finished, for the report to pick it"
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
        (["--exclude", "no-such-kernel"], "error: --exclude takes built-in names; unknown: no-such-kernel"),
        (["--impl", "chunked", "--exclude", "torch-compile"], "error: --exclude narrows the default set"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(capsys, tmp_path, args, message):
    status, _, err = run_check(capsys, *args, "--out", str(tmp_path))
    assert status == 2
    assert err.strip().startswith(message) and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_after_an_illegal_memory_access_the_remaining_properties_run_in_a_fresh_process():
    """float16 raises the error; in that process every later call would too. float32 and bfloat16
    come after it, and pass: their worker is a fresh one."""
    report = check("tests.broken_impls:loses_its_cuda_context", max_examples=2,
                   properties=["equivalence/float16", "equivalence/float32", "equivalence/bfloat16"])
    assert {r.property: r.status for r in report.results} == {
        "equivalence/float16": "fail", "equivalence/float32": "pass", "equivalence/bfloat16": "pass"}, str(report)
    failure = report["equivalence/float16"]
    assert failure.detail.startswith("raised RuntimeError: CUDA error: an illegal memory access was encountered")
    assert "--property equivalence/float16 --case N=" in failure.reproducer


def test_a_property_that_times_out_fails_with_its_last_case_as_the_reproducer_and_the_rest_still_run(
        capsys, tmp_path, monkeypatch):
    """The check's side of a hang: ``harness.isolation`` stops the worker at the limit
    (``tests/test_isolation.py``) and reports the property it was running, with its last case; the
    rest run in a fresh worker. Here a stand-in for it reports exactly that, at once."""
    last_case = "N=7,D=5,V=9,dtype=float16,reduction=mean,seed=1"
    passed = PropertyResult("tests.broken_impls:wrong_mean_denominator", "equivalence/float32", PASS, 3, "", "", 0.5)
    support = discover_support(LosesItsCudaContext(), "cpu")

    def stopped_at_the_limit(module, args, items, *, limits, env, cancel, on_message=None):
        assert module == "harness.check.worker" and items == [SUPPORT_ITEM, "equivalence/float16",
                                                             "equivalence/float32"]
        yield ItemOutcome(SUPPORT_ITEM, {"item": SUPPORT_ITEM, "support": support.to_json()})
        yield ItemOutcome("equivalence/float16", None, "timeout",
                          f"exceeded the time limit of {limits.timeout_s:g} s", last_case)
        yield ItemOutcome("equivalence/float32", {"item": "equivalence/float32", **dataclasses.asdict(passed)})

    monkeypatch.setattr(engine_module, "run_items", stopped_at_the_limit)
    status, out, _ = run_check(capsys, "--timeout", "7", "--impl", "tests.broken_impls:wrong_mean_denominator",
                               "--property", "equivalence/float16", "--property", "equivalence/float32",
                               "--no-behaviour", "--out", str(tmp_path))
    assert status == 1
    assert "equivalence/float16: timeout: exceeded the time limit of 7 s" in out
    (reproducer,) = reproducers(out)
    assert check_arguments(reproducer) == ["--impl", "tests.broken_impls:wrong_mean_denominator", "--property",
                                           "equivalence/float16", "--case", last_case]
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
    assert result.reproducer.endswith(f"--case {shlex.quote(str(announced[-1]))}")


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


def test_a_failure_that_does_not_recur_says_what_its_first_call_raised():
    """Hypothesis reports a case that fails once and then passes as FlakyFailure; its message alone
    hides why (a full disk, a nondeterministic kernel's mismatch), so the detail names it."""
    from hypothesis.errors import FlakyFailure

    from harness.check.run_property import describe_failure

    flaky = FlakyFailure("Hypothesis body(case=...) produces unreliable results", [OSError(28, "No space left on device")])
    first_line = describe_failure(flaky).splitlines()[0]
    assert "FlakyFailure" in first_line and "its first call: raised OSError: [Errno 28] No space left on device" in first_line
