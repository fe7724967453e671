"""``python -m harness report``: plots, the self-contained dashboard and the Markdown summary.

The runs are synthetic (``tests/report_fixtures.py``) but written in the real results format.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.cli import main
from harness.errors import HarnessError
from harness.report.command import build_report
from harness.report.runs import load_run, measurements
from tests.report_fixtures import SYNTHETIC_DEVICE, XSS, write_check_run, write_sweep_run

PLOTS = ("time_vs_vocab", "time_vs_tokens", "memory_vs_tokens", "speedup_heatmap",
         "memory_over_lower_bound", "matmul_fraction")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """A full report over one synthetic sweep, with a check run beside it in the results folder."""
    results = tmp_path_factory.mktemp("results")
    sweep = write_sweep_run(results, "20260101-120000")
    write_check_run(results, "20260101-130000")
    return build_report([sweep], tmp_path_factory.mktemp("report"))


def test_every_figure_is_written_as_a_png(report):
    for name in PLOTS:
        png = report.parent / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_dashboard_has_every_section(report):
    page = report.read_text()
    for section in ("summary", "plots", "tables", "correctness", "failures", "environment"):
        assert f'<section id="{section}">' in page
    assert SYNTHETIC_DEVICE in page, "the page names the device the numbers were measured on"
    assert "python -m harness check --impl chunked --seed 7" in page, "a failing property shows its reproducer"
    assert "CUDA out of memory (synthetic)" in page, "out-of-memory cases are listed with their reason"


def test_dashboard_embeds_its_plots_and_fetches_nothing(report):
    page = report.read_text()
    images = re.findall(r"<img src='([^']*)'", page)
    assert len(images) == len(PLOTS)
    assert all(src.startswith("data:image/png;base64,") for src in images)
    references = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]*)""", page)
    assert references, "the page has links and images"
    assert not [r for r in references if not r.startswith(("data:", "#"))], "only data URIs and in-page anchors"
    assert "http://" not in page and "https://" not in page


def test_strings_from_results_are_escaped(report):
    """A reason or detail containing markup is shown as text, never run as a script."""
    page = report.read_text()
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&#x27;xss&#x27;)&lt;/script&gt;" in page


def test_markdown_summary_is_pull_request_sized(report):
    summary = (report.parent / "summary.md").read_text()
    assert summary.startswith("## lmhead-bench: 20260101-120000")
    assert f"measured on: **{SYNTHETIC_DEVICE}**" in summary
    assert "### bfloat16" in summary and "### float32" in summary
    assert "| case | dtype | V, D, N | pick | how sure |" in summary
    assert ("matmul rate (what `matmul_fraction` divides by): 20260101-120000: bfloat16 1.00 TFLOP/s (torch.mm), "
            "float32 2.00 TFLOP/s (onednn; torch.mm 1.00)") in summary, "the rate, the routine that reached it and the others'"
    assert "**oom**, CUDA out of memory (synthetic)" in summary
    assert XSS not in summary and "&lt;script&gt;" in summary
    assert len(summary) < 65536, "fits in one GitHub comment"


def test_speedup_is_relative_to_torch_eager_on_the_same_case(tmp_path):
    frame = measurements([load_run(write_sweep_run(tmp_path, "run", noise=0.0))])
    eager = frame[frame["implementation"] == "torch-eager"]
    assert (eager["speedup"] == 1.0).all()
    liger = frame[(frame["implementation"] == "liger") & (frame["case"] == "vocab-sweep/V=8192/N=2048/bfloat16")]
    assert liger["speedup"].tolist() == pytest.approx([1.6, 1.6])  # the fixture's cost model makes liger 1.6x


def test_figures_without_data_are_skipped_with_a_note(tmp_path):
    """A run without a vocabulary sweep or a token sweep still gets a report; the dashboard says what is missing."""
    only_one_size = tuple(
        f"{shape}/V={v}/N={n}/{dtype}"
        for dtype in ("float32", "bfloat16")
        for shape, v, n in [("vocab-sweep", 32768, 2048), ("vocab-sweep", 131072, 2048),
                            ("llama3-8b", 128256, 4096), ("llama3-8b", 128256, 16384)]
    )
    sweep = write_sweep_run(tmp_path / "results", "20260102-000000", drop_cases=only_one_size)
    out = tmp_path / "report"
    out.mkdir()
    (out / "time_vs_vocab.png").write_bytes(b"stale figure from an earlier report")
    index = build_report([sweep], out)
    page = index.read_text()
    assert "Time vs vocabulary size V: skipped: no set of cases that differs only in its vocabulary sizes" in page
    assert "Time vs number of tokens N: skipped" in page
    assert not (out / "time_vs_vocab.png").exists(), "a figure skipped now does not leave an old one behind"
    assert (out / "speedup_heatmap.png").exists()
    assert "No check run in" in page and "matches this sweep" in page


def test_cli_reports_the_latest_sweep_by_default(tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    write_sweep_run(results, "20260101-000000")
    write_sweep_run(results, "20260103-000000")
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--results-dir", str(results)]) == 0
    assert "dashboard: reports/20260103-000000/index.html" in capsys.readouterr().out
    assert (tmp_path / "reports" / "20260103-000000" / "summary.md").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["report", "no-such-run"], "run 'no-such-run' not found"),
        (["report"], "no sweep run in"),
    ],
)
def test_cli_bad_input_is_a_one_line_error(tmp_path, capsys, argv, message):
    assert main([*argv, "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_a_folder_without_meta_json_is_not_a_run(tmp_path, capsys):
    (tmp_path / "stray").mkdir()
    assert main(["report", str(tmp_path / "stray")]) == 2
    assert "is not a run folder (it has no meta.json)" in capsys.readouterr().err


def test_a_sweep_run_is_not_accepted_as_the_check_run(tmp_path):
    sweep = write_sweep_run(tmp_path, "20260101-000000")
    with pytest.raises(HarnessError, match="is a sweep run, not a check run"):
        build_report([sweep], tmp_path / "out", check_dir=sweep)
