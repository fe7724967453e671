"""``index.html``: one self-contained static page (plots embedded as data URIs, no scripts, nothing fetched).

Every string that comes from a run (case names, reasons, environment, check details) goes through
``html.escape``: an error message is data, never markup.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
from pathlib import Path

import pandas as pd

from harness.report import tables
from harness.report.plots import Plot
from harness.report.runs import MODES_BY_PREFERENCE, CheckResults, Run
from harness.results import BASELINE

STATUS_CLASSES = {"pass": "good", "ok": "good", "fail": "bad", "failed": "bad", "error": "bad", "crash": "bad",
                  "oom": "bad", "timeout": "bad", "unsupported": "muted", "known-failure": "warn"}

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1400px;
       padding: 0 1rem; color: #222; }
h1 { margin-bottom: 0.2rem; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2rem; margin-top: 2.5rem; }
nav a { margin-right: 1rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.85rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.good { background: #e3f4e1; } td.bad { background: #f9dcdc; } td.warn { background: #fff1c9; }
td.muted { color: #777; }
figure { margin: 1rem 0 2rem; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-weight: 600; margin-bottom: 0.3rem; }
.note { color: #666; font-style: italic; }
pre { white-space: pre-wrap; margin: 0; font-size: 0.8rem; }
.scroll { overflow-x: auto; }
"""


def write_dashboard(
    path: Path,
    *,
    runs: list[Run],
    device: str,
    frame: pd.DataFrame,
    failures: pd.DataFrame,
    plots: list[Plot],
    check: CheckResults | None,
    mode: str | None,
) -> Path:
    run_names = ", ".join(run.name for run in runs) or "no sweep run"
    body = [
        f"<h1>lmhead-bench report: {_e(run_names)}</h1>",
        f"<p>measured on: <strong>{_e(device)}</strong>. Generated {_e(dt.datetime.now().isoformat(timespec='seconds'))}.</p>",
        '<nav><a href="#summary">Summary</a><a href="#plots">Plots</a><a href="#tables">Tables</a><a href="#correctness">Correctness</a>'
        '<a href="#failures">Failures</a><a href="#environment">Environment</a></nav>',
        _summary_section(frame, mode),
        _plots_section(plots),
        _tables_section(frame),
        _correctness_section(check),
        _failures_section(failures),
        _environment_section(runs, check),
    ]
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        # An empty icon, so that the browser does not go looking for /favicon.ico.
        '<link rel="icon" href="data:,">\n'
        f"<title>lmhead-bench report: {_e(run_names)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
    path.write_text(page, encoding="utf-8")
    return path


def _e(value) -> str:
    return html.escape("" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value))


def _table(frame: pd.DataFrame, *, index: str | None = None, status_columns=(), code_columns=("reproducer",)) -> str:
    """An HTML table of ``frame``.

    ``index`` names the index column (left out when None); cells of ``status_columns`` are coloured
    by status; ``code_columns`` (commands to copy, such as a reproducer) are shown preformatted.
    """
    header = ([index] if index is not None else []) + [str(c) for c in frame.columns]
    lines = ["<div class='scroll'><table>", "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"]
    for label, row in frame.iterrows():
        cells = [f"<th>{_e(label)}</th>"] if index is not None else []
        for column, value in row.items():
            css = STATUS_CLASSES.get(str(value).lower(), "") if column in status_columns else ""
            text = f"<pre>{_e(value)}</pre>" if column in code_columns and _e(value) else _e(value)
            cells.append(f"<td class='{css}'>{text}</td>" if css else f"<td>{text}</td>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines.append("</table></div>")
    return "\n".join(lines)


def _summary_section(frame: pd.DataFrame, mode: str | None) -> str:
    parts = ['<section id="summary"><h2>Summary</h2>']
    if frame.empty:
        parts.append("<p class='note'>No measurements in these runs.</p></section>")
        return "\n".join(parts)
    parts.append(
        f"<p>Per case, {_e(mode)}: the fastest implementation, its speed-up over {_e(BASELINE)} "
        "(same case, same device), and the implementation with the lowest peak memory. "
        "Every mode is in <a href='#tables'>the tables</a> below the plots.</p>"
    )
    parts.append(_table(tables.best_per_case(frame, mode).drop(columns="mode")))
    parts.append("</section>")
    return "\n".join(parts)


def _tables_section(frame: pd.DataFrame) -> str:
    parts = ['<section id="tables"><h2>All measurements</h2>']
    if frame.empty:
        parts.append("<p class='note'>No measurements in these runs.</p></section>")
        return "\n".join(parts)
    for mode in [m for m in MODES_BY_PREFERENCE if m in set(frame["mode"])]:
        for dtype in sorted(frame["dtype"].unique()):
            table = tables.case_by_implementation(frame, mode, dtype, tables.time_and_memory_cell)
            if table.empty:
                continue
            parts.append(f"<h3>{_e(dtype)}, {_e(mode)}: median time (speed-up over {_e(BASELINE)}), peak memory</h3>")
            parts.append(_table(table, index="case"))
    parts.append("</section>")
    return "\n".join(parts)


def _plots_section(plots: list[Plot]) -> str:
    parts = ['<section id="plots"><h2>Plots</h2>']
    for plot in plots:
        if plot.path is None:
            parts.append(f"<p class='note'>{_e(plot.title)}: {_e(plot.note)}</p>")
            continue
        data = base64.b64encode(plot.path.read_bytes()).decode("ascii")
        note = f"<p class='note'>{_e(plot.note)}</p>" if plot.note else ""
        parts.append(
            f"<figure id='{_e(plot.name)}'><figcaption>{_e(plot.title)}</figcaption>{note}"
            f"<img src='data:image/png;base64,{data}' alt='{_e(plot.title)}'></figure>"
        )
    parts.append("</section>")
    return "\n".join(parts)


def _correctness_section(check: CheckResults | None) -> str:
    parts = ['<section id="correctness"><h2>Correctness</h2>']
    if check is None:
        parts.append("<p class='note'>No check run found; run <code>python -m harness check</code> "
                     "to add the correctness gate's results here.</p></section>")
        return "\n".join(parts)
    parts.append(f"<p>From check run <code>{_e(check.run.name)}</code> "
                 f"(measured on: {_e(check.run.meta.get('device', 'unknown device'))}).</p>")
    matrix = tables.property_matrix(check.properties)
    if matrix.empty:
        parts.append("<p class='note'>This check run recorded no properties.</p>")
    else:
        parts.append("<h3>Properties against the float64 reference</h3>")
        parts.append(_table(matrix, index="implementation", status_columns=set(matrix.columns)))
    precision = tables.precision_matrix(check.precision)
    if not precision.empty:
        parts.append("<h3>Precision: error as a multiple of torch-eager's on the same inputs</h3>")
        parts.append("<p class='note'>Worst case over every equivalence and precision property, in the norm "
                     "(1.00: as accurate as torch-eager; below 1: more accurate).</p>")
        parts.append(_table(precision, index="implementation"))
    not_checked = tables.not_checked_table(check.not_checked, check.properties)
    if not not_checked.empty:
        parts.append("<h3>What was not checked</h3>")
        parts.append(_table(not_checked))
    not_passed = check.properties[~check.properties["status"].isin(["pass"])]
    if not not_passed.empty:
        parts.append("<h3>Properties that did not pass</h3>")
        details = not_passed[["implementation", "property", "status", "examples", "detail", "reproducer"]]
        parts.append(_table(details, status_columns={"status"}))
    behaviour = tables.behaviour_matrix(check.behaviour)
    if not behaviour.empty:
        parts.append("<h3>Behaviour on edge cases</h3>")
        parts.append(_table(behaviour, index="implementation"))
        described = check.behaviour[check.behaviour["detail"].astype(str) != ""]
        if not described.empty:
            parts.append(_table(described[["implementation", "edge_case", "behaviour", "detail"]]))
    parts.append("</section>")
    return "\n".join(parts)


def _failures_section(failures: pd.DataFrame) -> str:
    parts = ['<section id="failures"><h2>Failed, unsupported and out-of-memory cases</h2>']
    if failures.empty:
        parts.append("<p>Every case produced numbers.</p></section>")
        return "\n".join(parts)
    counts = failures["status"].value_counts()
    parts.append("<p>" + ", ".join(f"{_e(status)}: {count}" for status, count in counts.items()) + "</p>")
    parts.append(_table(failures, status_columns={"status"}))
    parts.append("</section>")
    return "\n".join(parts)


def _environment_section(runs: list[Run], check: CheckResults | None) -> str:
    parts = ['<section id="environment"><h2>Environment</h2>']
    for run in runs + ([check.run] if check is not None else []):
        items = pd.DataFrame(
            {"value": [_flat_value(v) for v in _flatten(run.meta).values()]}, index=list(_flatten(run.meta))
        )
        parts.append(f"<h3>{_e(run.kind)} run {_e(run.name)}</h3>")
        parts.append(_table(items, index="key"))
    parts.append("</section>")
    return "\n".join(parts)


def _flatten(meta: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in meta.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _flat_value(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
