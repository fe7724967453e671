"""The dashboard renders in a real browser: headless Chromium, as CI installs it (Debian's ``chromium``).

Without Chromium (or Playwright) the test is skipped on a developer's machine and fails under CI
(``CI`` set), where both are installed.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from harness.report.command import build_report
from harness.report.screenshot import find_chromium, render
from tests.report_fixtures import write_check_run, write_sweep_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def require_browser() -> None:
    missing = []
    if find_chromium() is None:
        missing.append("chromium (apt-get install chromium)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("playwright (pip install playwright)")
    if missing:
        message = "needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must install them")
        pytest.skip(message)


@pytest.mark.slow
def test_dashboard_renders_with_its_plots_and_no_console_errors(tmp_path):
    require_browser()
    results = tmp_path / "results"
    sweep = write_sweep_run(results, "20260101-120000")
    write_check_run(results, "20260101-130000")
    index = build_report([sweep], tmp_path / "report")

    screenshot = tmp_path / "dashboard.png"
    seen = render(index, screenshot, full_page=True)

    assert seen.title == "lmhead-bench report: 20260101-120000"
    assert seen.console_errors == [] and seen.page_errors == [] and seen.failed_requests == []
    assert len(seen.image_widths) == 6 and all(width > 0 for width in seen.image_widths), seen.image_widths
    assert [url for url in seen.requests if not url.startswith(("file:", "data:"))] == [], "nothing from the network"
    assert screenshot.read_bytes()[:8] == PNG_SIGNATURE
    print(f"screenshot: {screenshot}")
