"""What a report tells a reader first: which implementation to pick for each case, and how sure.

A pick is named alone only beyond both measured spreads (the rule ``compare`` uses); a failure is
shown in its case's row, never skipped so that the next implementation looks like the winner; a
correctness section comes only from a check run of the sweep's own commit and device; a loaded
machine is said before anything else. The runs are written in the real results format by hand.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from harness.report.checks import choose_check
from harness.report.dashboard import write_dashboard
from harness.report.noise import clearly_faster, judge_time
from harness.report.runs import device_label, failures, load_run, measurements, primary_mode
from harness.report.tables import beside_companions, picks
from harness.results import PROPERTY_COLUMNS, RowWriter, mark_run_finished, read_meta, run_finished, write_json_atomic
from harness.machine_load import busy_cores, judge, probe_record, warning
from tests.report_fixtures import SWEEP_COMMIT, SYNTHETIC_DEVICE, write_check_run, write_sweep_run

CASE = dict(case="head/N=512/float32", shape="head", vocab=4096, hidden=256, tokens=512, dtype="float32",
            tied=False, options="mean", logits="random", mode="forward_backward", device=SYNTHETIC_DEVICE)


def write_run(results: Path, run_id: str, timings: dict[str, tuple[float, float, float]],
              failed: dict[str, str] | None = None, meta: dict | None = None) -> Path:
    """One case, each implementation with (median, p20, p80) in ms, or a failure status."""
    run_dir = results / run_id
    write_json_atomic(run_dir / "meta.json", {"kind": "sweep", "device": SYNTHETIC_DEVICE, "git_commit": SWEEP_COMMIT,
                                              "finished": "2026-01-01T12:00:00+00:00", **(meta or {})})
    writer = RowWriter(run_dir / "rows.csv")
    for impl, (median, p20, p80) in timings.items():
        writer.append([dict(CASE, run_id=run_id, implementation=impl, metric=metric, value=value, unit="ms",
                            status="ok") for metric, value in (("time_median", median), ("time_p20", p20),
                                                               ("time_p80", p80))])
    for impl, status in (failed or {}).items():
        writer.append([dict(CASE, run_id=run_id, implementation=impl, metric="status", status=status,
                            reason=f"{status} (synthetic)")])
    return run_dir


def page(sweep_dir: Path, out: Path) -> str:
    """The dashboard of one sweep as ``harness report`` writes it, without drawing its figures."""
    runs = [load_run(sweep_dir)]
    frame, failed = measurements(runs), failures(runs)
    path = write_dashboard(out / "index.html", runs=runs, device=device_label(runs), frame=frame, failures=failed,
                           plots=[], check=choose_check(runs, sweep_dir.parent), mode=primary_mode(frame))
    return path.read_text()


def the_pick(results: Path, run_dir: Path) -> pd.Series:
    run = load_run(run_dir)
    table = picks(measurements([run]), failures([run]), "forward_backward")
    assert len(table) == 1
    return table.iloc[0]


def test_two_implementations_within_each_others_spread_are_reported_as_within_noise(tmp_path):
    run = write_run(tmp_path, "noisy", {"torch-eager": (10.0, 9.0, 11.5), "chunked": (10.8, 9.5, 12.0)})
    pick = the_pick(tmp_path, run)
    assert pick["pick"] == "torch-eager ≈ chunked"
    assert pick["how sure"] == "within noise: p20–p80 ranges overlap"


def test_a_pick_beyond_both_spreads_is_named_alone_with_how_much_faster(tmp_path):
    run = write_run(tmp_path, "clear", {"torch-eager": (20.0, 19.0, 21.0), "chunked": (10.0, 9.5, 10.5)})
    pick = the_pick(tmp_path, run)
    assert pick["pick"] == "chunked"
    assert pick["how sure"] == "clear: 2.00× faster than torch-eager"
    assert pick["speed-up over torch-eager"] == "2.00×"


def test_the_pick_and_compare_share_one_rule():
    fast = pd.Series({"time_median": 10.0, "time_p20": 9.5, "time_p80": 10.5})
    overlapping = pd.Series({"time_median": 10.8, "time_p20": 10.2, "time_p80": 11.5})
    assert judge_time(overlapping, fast, 0.05).verdict == "within noise"
    assert not clearly_faster(fast, overlapping)
    apart = pd.Series({"time_median": 12.0, "time_p20": 11.0, "time_p80": 13.0})
    assert judge_time(apart, fast, 0.05).verdict == "faster" and clearly_faster(fast, apart)


def test_a_failure_stays_in_its_row_and_does_not_make_the_next_one_the_pick(tmp_path):
    run = write_run(tmp_path, "timeout", {"torch-eager": (1500.0, 1450.0, 1550.0)},
                    failed={"chunked": "timeout", "liger": "unsupported", "test-bad": "wrong"})
    pick = the_pick(tmp_path, run)
    assert pick["pick"] == "torch-eager"
    assert pick["how sure"] == "only one with numbers"
    assert pick["no numbers"] == "chunked: timeout; test-bad: wrong; 1 unsupported"


def test_a_check_run_of_another_commit_is_not_attached_and_the_report_says_how_to_make_one(tmp_path):
    results = tmp_path / "results"
    sweep = write_sweep_run(results, "20260101-120000")
    write_check_run(results, "20260101-130000-check", commit="fedcba9876")
    html = page(sweep, tmp_path)
    assert "python -m harness check --impl chunked --seed 7" not in html, "the other commit's failure is not shown"
    assert "No check run in" in html and "matches this sweep (commit 0123abc on" in html
    assert "The latest, 20260101-130000-check, is from commit fedcba9876" in html
    assert "To make a matching one, run `python -m harness check" in html


def test_a_check_run_of_the_same_commit_and_device_is_attached_narrowed_to_the_sweep(tmp_path):
    results = tmp_path / "results"
    sweep = write_sweep_run(results, "20260101-120000")
    write_check_run(results, "20260101-110000-check", commit="fedcba9876")
    check = write_check_run(results, "20260101-130000-check")
    RowWriter(check / "properties.csv", PROPERTY_COLUMNS).append([
        dict(implementation="my-buggy-plugin", property="equivalence/float32", status="fail", examples=3,
             detail="gated on its own", reproducer="python -m harness check --impl my.plugin:loss")])
    html = page(sweep, tmp_path)
    assert "From check run <code>20260101-130000-check</code>" in html
    assert "python -m harness check --impl chunked --seed 7" in html
    assert "gated on its own" not in html, "a plugin checked beside the built-ins is not in their benchmark's report"
    assert "Left out here (checked, but not in this sweep): my-buggy-plugin." in html


def test_a_check_run_without_the_finished_mark_is_shown_as_interrupted(tmp_path):
    results = tmp_path / "results"
    sweep = write_sweep_run(results, "20260101-120000")
    check = write_check_run(results, "20260101-130000-check", finished=False)
    assert not run_finished(read_meta(check))
    html = page(sweep, tmp_path)
    assert "is not marked finished in its meta.json: it was interrupted" in html
    mark_run_finished(check)
    assert run_finished(read_meta(check))
    assert "not marked finished" not in page(sweep, tmp_path)


def test_precision_is_shown_against_the_allowance_and_against_torch_eager(tmp_path):
    results = tmp_path / "results"
    sweep = write_sweep_run(results, "20260101-120000")
    row = dict(implementation="chunked", property="equivalence/float32", dtype="float32", tensor="grad_hidden",
               ratio=70.8, error=3e-8, eager_error=4e-10, case="N=1,D=1,V=2,dtype=float32,seed=0")
    write_check_run(results, "20260101-130000-check", precision=[dict(row, budget_ratio=0.31)])
    html = page(sweep, tmp_path)
    assert "error as a share of what the gate allows" in html and "<td class='good'>31%</td>" in html
    assert "error as a multiple of torch-eager" in html and "70.80" in html

    older = tmp_path / "older"
    sweep = write_sweep_run(older, "20260101-120000")
    write_check_run(older, "20260101-130000-check", precision=[row])
    html = page(sweep, tmp_path)
    assert "predates the record of each error against the gate's allowance" in html and "70.80" in html


def test_a_loaded_machine_is_said_on_the_first_screen(tmp_path):
    probes = [probe_record("start", 0.20, [0.1, 0.1, 0.1]), probe_record("end", 0.01, [5.0, 4.0, 3.0])]
    load = judge(probes, device_kind="cpu", cpu_count=2)
    assert load["loaded"] and "moved by 95%" in warning({"load": load})
    run = write_run(tmp_path, "loaded", {"torch-eager": (10.0, 9.0, 11.0)}, meta={"load": load, "device_kind": "cpu"})
    html = page(run, tmp_path)
    first_screen = html[:html.index('<section id="summary">')]
    assert "Loaded machine." in first_screen and "timings are unreliable" in first_screen
    assert "CPU only." in first_screen


def test_the_load_check_passes_a_steady_rate_and_flags_a_busy_start():
    steady = [probe_record("start", 0.20, [0.2, 0.2, 0.2]), probe_record("job", 0.19), probe_record("end", 0.21)]
    assert not judge(steady, device_kind="cpu", cpu_count=2)["loaded"]
    busy = [probe_record("start", 0.20, [3.1, 2.0, 1.0]), probe_record("end", 0.20)]
    verdict = judge(busy, device_kind="cpu", cpu_count=2)
    assert verdict["loaded"] and "load average was 3.1 on 2 cores" in verdict["reasons"][0]
    assert not judge(busy, device_kind="cuda", cpu_count=2)["loaded"], "a GPU's rate alone decides"


def test_a_busy_start_is_read_from_the_cores_in_use_not_the_lagging_load_average():
    """The 1-minute load average still counts a job that ended a minute before the sweep began."""
    after_a_job = [probe_record("start", 0.20, [1.6, 1.7, 2.3], busy=0.1), probe_record("end", 0.20)]
    assert not judge(after_a_job, device_kind="cpu", cpu_count=2)["loaded"]
    beside_one = [probe_record("start", 0.20, [0.3, 0.3, 0.3], busy=1.4), probe_record("end", 0.20)]
    verdict = judge(beside_one, device_kind="cpu", cpu_count=2)
    assert verdict["loaded"] and "kept 1.4 of 2 cores busy" in verdict["reasons"][0]


def test_the_cores_in_use_are_measured_where_proc_stat_exists():
    busy = busy_cores(0.2)
    if busy is None:
        pytest.skip("no /proc/stat here")
    assert 0.0 <= busy <= (os.cpu_count() or 1)


def test_readings_beside_a_cases_own_companion_processes_are_kept_but_not_judged():
    probes = [probe_record("start", 0.20, [0.2, 0.2, 0.2]), probe_record("beside companions", 0.09, companions=1),
              probe_record("end", 0.21)]
    verdict = judge(probes, device_kind="cpu", cpu_count=2)
    assert not verdict["loaded"], "the load the case asked for is no sign of an unreliable run"
    assert [p.get("companions", 0) for p in verdict["probes"]] == [0, 1, 0]


def test_a_case_measured_beside_companions_is_shown_against_the_same_case_measured_quietly(tmp_path):
    run_dir = write_run(tmp_path, "shared", {"chunked": (100.0, 99.0, 101.0), "torch-eager": (120.0, 119.0, 121.0)},
                        meta={"companions": {"head-loaded/N=512/float32": 1},
                              "companion_sessions": {"head-loaded/N=512/float32": "job"}})
    loaded = dict(CASE, case="head-loaded/N=512/float32")
    writer = RowWriter(run_dir / "rows.csv")
    for impl, median in (("chunked", 150.0), ("torch-eager", 240.0)):
        writer.append([dict(loaded, run_id="shared", implementation=impl, metric="time_median", value=median,
                            unit="ms", status="ok")])
    run = load_run(run_dir)
    table = beside_companions(measurements([run]), {run.name: run.meta}).set_index("implementation")
    assert list(table["slow-down"]) == ["1.50×", "2.00×"]
    assert set(table["beside"]) == {"1 process, in the job's session"}
    assert "Beside busy processes" in page(run_dir, tmp_path)


def test_without_companions_there_is_no_beside_table(tmp_path):
    run = load_run(write_run(tmp_path, "quiet", {"chunked": (100.0, 99.0, 101.0)}))
    assert beside_companions(measurements([run]), {run.name: run.meta}).empty
    assert "Beside busy processes" not in page(run.path, tmp_path)
