"""What a real sweep shows of its failures and of wrong results: in the summary, the plots and the
heatmaps, at the case where they happened, and never as a pick.

These sweeps start real worker processes (``tests/sweep_plugins.py`` misbehaves on purpose), one
of which runs into its time limit, so they are slow.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.cli import main
from harness.report import plots as plotting
from harness.report.command import build_report
from harness.report.runs import device_label, failures, load_run, measurements
from harness.report.tables import picks
from harness.results import list_runs, read_meta, read_rows

PLUGINS = "tests.sweep_plugins"
QUICK = ["--measure-time", "0.01", "--min-repeats", "1"]
# A worker's start (imports, a loaded machine) must fit well inside it: the hang is what runs into it.
TIMEOUT = "60"

pytestmark = pytest.mark.slow


def sweep(tmp_path: Path, tokens: list[int], impls: list[str], modes: list[str]) -> Path:
    cases = tmp_path / "tiny.toml"
    cases.write_text(f'dtypes = ["float32"]\n[[case]]\nname = "tiny"\nvocab = 256\ndim = 16\ntokens = {tokens}\n')
    argv = ["sweep", str(cases), "--out", str(tmp_path / "results"), "--timeout", TIMEOUT, *QUICK]
    for impl in impls:
        argv += ["--impl", impl]
    for mode in modes:
        argv += ["--mode", mode]
    assert main(argv) == 0
    [run_dir] = list_runs(tmp_path / "results")
    return run_dir


def test_a_timeout_on_one_case_is_shown_in_the_summary_the_plot_and_the_heatmap(tmp_path):
    run_dir = sweep(tmp_path, [32, 64], ["torch-eager", f"{PLUGINS}:HangsOnLargeCases"], ["forward_backward"])
    runs = [load_run(run_dir)]
    frame, failed = measurements(runs), failures(runs)

    summary = picks(frame, failed, "forward_backward").set_index("case")
    assert summary.loc["tiny/N=64/float32", "no numbers"] == "test-hangs-on-large: timeout"
    assert summary.loc["tiny/N=64/float32", "how sure"].startswith("only one with numbers")

    figures = {plot.name: plot for plot in plotting.draw_all(frame, device_label(runs), tmp_path, failed)}
    assert any(mark.startswith("test-hangs-on-large: timeout at N=64") for mark in figures["time_vs_tokens"].marked)
    heatmap = figures["speedup_heatmap"].cells["float32"]
    assert heatmap.loc["tiny/N=64/float32", "test-hangs-on-large"] == "timeout"
    assert heatmap.loc["tiny/N=32/float32", "test-hangs-on-large"] not in ("", "timeout"), "measured where it ran"

    page = build_report([run_dir], tmp_path / "report").read_text()
    assert "test-hangs-on-large: timeout" in page


def test_a_quick_wrong_loss_and_a_cached_answer_are_wrong_everywhere_and_never_the_pick(tmp_path, capsys):
    impls = ["torch-eager", f"{PLUGINS}:WrongFast", f"{PLUGINS}:CachesFirstAnswer"]
    run_dir = sweep(tmp_path, [32], impls, ["forward", "forward_backward"])
    closing = " ".join(capsys.readouterr().err.split())  # rich wraps lines at the terminal's width
    assert "2 measured and 4 wrong (did not match torch-eager)." in closing, "the closing sentence counts them"

    rows = read_rows(run_dir)
    status = {(row.implementation, row.mode): row.status for row in rows.itertuples()}
    for impl in ("test-wrong-fast", "test-caches-first-answer"):
        for mode in ("forward", "forward_backward"):
            assert status[(impl, mode)] == "wrong", (impl, mode)
    assert set(rows[rows["implementation"] == "test-wrong-fast"]["metric"]) >= {"time_median"}, "timings kept"
    reasons = " ".join(rows[rows["implementation"] == "test-caches-first-answer"]["reason"])
    assert "inputs changed in place" in reasons or "cached answer" in reasons

    runs = [load_run(run_dir)]
    frame, failed = measurements(runs), failures(runs)
    assert set(frame["implementation"]) == {"torch-eager"}, "wrong numbers never stand"
    for mode in ("forward", "forward_backward"):
        [pick] = picks(frame, failed, mode).to_dict("records")
        assert pick["pick"] == "torch-eager"
        assert pick["no numbers"] == "test-caches-first-answer: wrong; test-wrong-fast: wrong"
    assert read_meta(run_dir)["load"]["probes"], "the load check's readings are recorded"
