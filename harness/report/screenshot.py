"""Open a dashboard in headless Chromium, check that it renders, and save a screenshot.

``python -m harness.report.screenshot reports/RUN/index.html reports/screenshot-cpu.png``

Used by the browser test and to make the README's screenshot. It drives the system's Chromium
(Debian's ``chromium`` package; ``$CHROMIUM`` overrides the path) through Playwright, so no
browser is downloaded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import HarnessError

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]


@dataclass
class PageCheck:
    """What the browser saw: console errors, uncaught exceptions, requests, and each image's width."""

    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    image_widths: list[int] = field(default_factory=list)
    title: str = ""


def find_chromium() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def render(index_html: Path, screenshot: Path, *, width: int = 1400, height: int = 1800,
           full_page: bool = False) -> PageCheck:
    """Load ``index_html`` from disk in headless Chromium, record what happened, save a PNG screenshot."""
    chromium = find_chromium()
    if chromium is None:
        raise HarnessError("chromium not found: install Debian's chromium package or set $CHROMIUM")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise HarnessError("the playwright package is missing: pip install playwright") from None
    check = PageCheck()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("console", lambda m: check.console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda error: check.page_errors.append(str(error)))
            page.on("request", lambda request: check.requests.append(request.url))
            page.on("requestfailed", lambda request: check.failed_requests.append(request.url))
            page.goto(Path(index_html).resolve().as_uri(), wait_until="load")
            check.title = page.title()
            check.image_widths = page.evaluate(
                "Array.from(document.images).map(img => img.complete ? img.naturalWidth : 0)"
            )
            Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=full_page)
        finally:
            browser.close()
    return check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.report.screenshot", description=__doc__.splitlines()[0])
    parser.add_argument("index_html", type=Path)
    parser.add_argument("screenshot", type=Path)
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1800, help="viewport height (the visible top of the page)")
    parser.add_argument("--full-page", action="store_true", help="capture the whole page, not just the viewport")
    args = parser.parse_args(argv)
    try:
        check = render(args.index_html, args.screenshot, width=args.width, height=args.height,
                       full_page=args.full_page)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    problems = check.console_errors + check.page_errors + check.failed_requests
    broken = sum(1 for w in check.image_widths if w == 0)
    print(f"{args.screenshot}: {len(check.image_widths)} images ({broken} broken), {len(problems)} errors")
    for problem in problems:
        print(f"  {problem}")
    return 1 if problems or broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
