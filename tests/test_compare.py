"""``python -m harness compare BASE NEW``: the regression gate between two runs.

It fails on a real slowdown or memory growth, not on noise, and lists (never fails) cases that
only one of the runs has.
"""

from __future__ import annotations

import pytest

from harness.cli import main
from harness.errors import HarnessError
from harness.report.compare import compare_runs, parse_threshold
from harness.report.runs import load_run
from harness.results import RowWriter
from tests.report_fixtures import write_sweep_run

MISSING_CASE = "vocab-sweep/V=8192/N=2048/float32"


@pytest.fixture
def results(tmp_path):
    write_sweep_run(tmp_path, "base", seed=1)
    return tmp_path


def compare(results, new: str, *extra: str) -> int:
    return main(["compare", "base", new, "--results-dir", str(results), *extra])


def test_a_20_percent_slowdown_fails(results, capsys):
    write_sweep_run(results, "slower", seed=2, slowdown={"chunked": 1.2})
    assert compare(results, "slower") == 1
    out = capsys.readouterr().out
    assert "FAIL" in out
    comparison = compare_runs(load_run(results / "base"), load_run(results / "slower"), 0.05)
    assert set(comparison.regressions["implementation"]) == {"chunked"}
    assert len(comparison.regressions) == 24  # every chunked case (12) in both modes


def test_two_runs_of_the_same_code_pass_even_when_noise_exceeds_the_threshold(results, capsys):
    """Run-to-run jitter of up to 3.5 % per run moves some medians by more than 5 %, yet the
    p20–p80 ranges overlap, so the gate does not fail."""
    write_sweep_run(results, "base-noisy", seed=1, noise=0.035)
    write_sweep_run(results, "same", seed=2, noise=0.035)
    assert main(["compare", "base-noisy", "same", "--results-dir", str(results)]) == 0
    assert "OK" in capsys.readouterr().out
    comparison = compare_runs(load_run(results / "base-noisy"), load_run(results / "same"), 0.05)
    noisy = comparison.changes[comparison.changes["verdicts"].apply(lambda v: "within noise" in v)]
    assert not noisy.empty, "some medians moved beyond the threshold: the spread is what passed them"
    assert (noisy["time_change"].abs() > 0.05).all()
    assert comparison.regressions.empty


def test_a_case_missing_from_one_run_is_listed_not_failed(results, capsys):
    write_sweep_run(results, "fewer", seed=1, drop_cases=(MISSING_CASE,))
    assert compare(results, "fewer") == 0
    out = capsys.readouterr().out
    assert "Cases only in BASE" in out and MISSING_CASE in out
    comparison = compare_runs(load_run(results / "base"), load_run(results / "fewer"), 0.05)
    assert set(comparison.only_in_base["case"]) == {MISSING_CASE}
    assert comparison.only_in_new.empty


def test_more_peak_memory_beyond_the_threshold_fails(results):
    write_sweep_run(results, "hungrier", seed=1, memory_growth={"liger": 1.10})
    comparison = compare_runs(load_run(results / "base"), load_run(results / "hungrier"), 0.05)
    assert set(comparison.regressions["implementation"]) == {"liger"}
    assert all("more memory" in v for v in comparison.regressions["verdicts"])
    assert compare_runs(load_run(results / "base"), load_run(results / "hungrier"), 0.15).regressions.empty


def run_where_chunked_has_no_numbers(results, name: str, status: str):
    """A copy of the base run in which chunked did not produce numbers for MISSING_CASE."""
    new = write_sweep_run(results, name, seed=1, drop_cases=(MISSING_CASE,))
    RowWriter(new / "rows.csv").append([
        dict(run_id=name, case=MISSING_CASE, shape="vocab-sweep", vocab=8192, hidden=1024, tokens=2048,
             dtype="float32", tied=False, options="mean", implementation="chunked", mode=mode,
             metric="status", status=status, reason=f"{status} in the new run", device="test")
        for mode in ("forward", "forward_backward")
    ])
    return compare_runs(load_run(results / "base"), load_run(new), 0.05)


def test_a_case_that_now_runs_out_of_memory_fails(results):
    """A case measured in BASE that is out of memory in NEW has certainly grown hungrier."""
    regressed = run_where_chunked_has_no_numbers(results, "oom", "oom").regressions
    assert set(zip(regressed["case"], regressed["implementation"])) == {(MISSING_CASE, "chunked")}
    assert all(v == ["more memory"] for v in regressed["verdicts"])


def test_a_case_that_became_unsupported_is_listed_but_does_not_fail(results):
    comparison = run_where_chunked_has_no_numbers(results, "unsupported", "unsupported")
    assert comparison.regressions.empty
    listed = comparison.changes[comparison.changes["verdicts"].apply(lambda v: v == ["now unsupported"])]
    assert set(listed["note"]) == {"unsupported: unsupported in the new run"}


def test_a_faster_run_is_an_improvement_not_a_failure(results):
    write_sweep_run(results, "faster", seed=1, slowdown={"torch-compile": 0.8})
    comparison = compare_runs(load_run(results / "base"), load_run(results / "faster"), 0.05)
    assert comparison.regressions.empty
    faster = comparison.changes[comparison.changes["verdicts"].apply(lambda v: "faster" in v)]
    assert set(faster["implementation"]) == {"torch-compile"}


@pytest.mark.parametrize("text, value", [("5%", 0.05), ("12.5%", 0.125), ("0.05", 0.05), ("0%", 0.0)])
def test_threshold_is_a_percentage_or_a_fraction(text, value):
    assert parse_threshold(text) == pytest.approx(value)


@pytest.mark.parametrize("text, message", [("5x", "bad threshold"), ("-5%", "bad threshold"), ("5", "ambiguous")])
def test_bad_threshold_is_a_clear_error(text, message):
    with pytest.raises(HarnessError, match=message):
        parse_threshold(text)


def test_bad_input_on_the_command_line_is_a_one_line_error(results, capsys):
    assert compare(results, "no-such-run") == 2
    assert capsys.readouterr().err == f"error: run 'no-such-run' not found (neither a folder nor a run id in {results}/)\n"
    assert compare(results, "base", "--threshold", "5x") == 2
    assert capsys.readouterr().err.startswith("error: bad threshold '5x'")


def test_a_case_whose_result_is_now_wrong_fails_as_broken(results):
    """Numbers that did not match torch-eager's are no numbers at all for the gate."""
    regressed = run_where_chunked_has_no_numbers(results, "wrong", "wrong").regressions
    assert set(zip(regressed["case"], regressed["implementation"])) == {(MISSING_CASE, "chunked")}
    assert all(v == ["broken"] for v in regressed["verdicts"])
