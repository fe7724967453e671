"""``index.html``: one self-contained static page (plots embedded as data URIs, no scripts, nothing fetched).

Its first screen answers "which implementation for which shape, and how sure": what the numbers
were measured on, the warnings that qualify all of them (a loaded machine, a CPU standing in for a
GPU, an interrupted sweep), what ran and what failed, then the pick per case with how sure it is
(``tables.picks``). Plots, every measurement, correctness, failures and the environment follow.

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
from harness.report.checks import CheckChoice, device_identity, short_commit
from harness.report.plots import Plot
from harness.report.runs import MODES_BY_PREFERENCE, CheckResults, Run
from harness.results import BASELINE, run_finished
from harness import machine_load as load

STATUS_CLASSES = {"pass": "good", "ok": "good", "fail": "bad", "failed": "bad", "error": "bad", "crash": "bad",
                  "oom": "bad", "timeout": "bad", "wrong": "bad", "unsupported": "muted", "known-failure": "warn"}
CPU_CAVEAT = ("Measured on a CPU (no GPU here): these times rank the implementations on this CPU only and say "
              "nothing about a GPU, for which the fused kernels are written (Triton kernels run here through "
              "its interpreter). What carries over is the memory: which implementations hold the N × V logits.")

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
.banner { padding: 0.5rem 0.8rem; margin: 0.5rem 0; border-radius: 4px; font-size: 0.95rem; }
.banner.bad { background: #f9dcdc; border-left: 5px solid #c62828; }
.banner.warn { background: #fff1c9; border-left: 5px solid #e0a800; }
.sub { color: #444; margin-top: 0.2rem; } .counts { font-size: 0.95rem; }
#summary table { font-size: 0.85rem; } #summary td { white-space: nowrap; }
#summary td.wrap { white-space: normal; min-width: 8rem; }
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
    check: CheckChoice,
    mode: str | None,
) -> Path:
    run_names = ", ".join(run.name for run in runs) or "no sweep run"
    body = [
        f"<h1>Which LM head for which shape: sweep {_e(run_names)}</h1>",
        _first_lines(runs, device, mode),
        *_banners(runs),
        _counts(runs, frame, failures, mode),
        '<nav><a href="#summary">Picks</a><a href="#plots">Plots</a><a href="#tables">All measurements</a>'
        '<a href="#correctness">Correctness</a><a href="#failures">Failures</a><a href="#environment">Environment</a></nav>',
        _summary_section(frame, failures, mode, "machine loaded" if any(load.warning(r.meta) for r in runs) else ""),
        _beside_companions_section(frame, runs),
        _plots_section(plots),
        _tables_section(frame, failures),
        _correctness_section(check),
        _failures_section(failures),
        _environment_section(runs, check.check),
    ]
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        # An empty icon, so that the browser does not go looking for /favicon.ico.
        '<link rel="icon" href="data:,">\n'
        f"<title>lmhead-bench report: {_e(run_names)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(part for part in body if part)
        + "\n</body>\n</html>\n"
    )
    path.write_text(page, encoding="utf-8")
    return path


def _first_lines(runs: list[Run], device: str, mode: str | None) -> str:
    """Where, from which code, in which mode, and the load check when it passed."""
    parts = [f"measured on <strong>{_e(device)}</strong>"]
    commits = sorted({short_commit(run.meta) for run in runs})
    if commits:
        parts.append("commit " + _e(", ".join(commits)))
    presets = sorted({str(run.meta["preset"]) for run in runs if run.meta.get("preset")})
    if presets:
        parts.append("preset " + _e(", ".join(presets)))
    if mode:
        parts.append(f"mode {_e(mode)}")
    parts.append("generated " + _e(dt.datetime.now().isoformat(timespec="minutes")))
    checks = [load.summary(run.meta) for run in runs if not load.warning(run.meta)]
    extra = f"<br>{_e('; '.join(dict.fromkeys(checks)))}." if checks else ""
    return f"<p class='sub'>{' · '.join(parts)}.{extra}</p>"


def _banners(runs: list[Run]) -> list[str]:
    """The warnings that qualify every number below: load, CPU, interrupted."""
    banners = []
    for run in runs:
        warning = load.warning(run.meta)
        if warning:
            banners.append(f"<div class='banner bad'><strong>Loaded machine.</strong> {_e(warning)}"
                           f"{' (' + _e(run.name) + ')' if len(runs) > 1 else ''}</div>")
    if any(run.meta.get("device_kind") == "cpu" for run in runs):
        banners.append(f"<div class='banner warn'><strong>CPU only.</strong> {_e(CPU_CAVEAT)}</div>")
    for run in runs:
        if run.kind == "sweep" and not run_finished(run.meta):
            banners.append(f"<div class='banner warn'><strong>Interrupted.</strong> Sweep {_e(run.name)} did not "
                           f"finish: finish it with <code>python -m harness sweep --resume {_e(run.name)}</code>."
                           "</div>")
    return banners


def _counts(runs: list[Run], frame: pd.DataFrame, failures: pd.DataFrame, mode: str | None) -> str:
    """What ran: cases, implementations, and how many of their modes gave numbers, failed, or were unsupported."""
    if frame.empty and failures.empty:
        return ""
    cases = set(frame["case"]) | set(failures["case"])
    implementations = set(frame["implementation"]) | set(failures["implementation"])
    statuses = failures["status"].value_counts()
    words = {"timeout": "timed out", "oom": "out of memory", "crash": "crashed", "error": "raised an error",
             "wrong": "wrong"}
    failed = ", ".join(f"{count} {words.get(status, status)}" for status, count in statuses.items()
                       if status != "unsupported")
    text = (f"{len(cases)} cases × {len(implementations)} implementations: {len(frame)} measurements stand"
            f"{', ' + failed if failed else ', none failed'}")
    if statuses.get("unsupported"):
        text += f", {statuses['unsupported']} unsupported here"
    excluded = {name: why for run in runs for name, why in (run.meta.get("excluded") or {}).items()}
    if excluded:
        text += ". Left out of the preset: " + "; ".join(f"{name} ({why})" for name, why in excluded.items())
    return f"<p class='counts'>{_e(text)}.</p>"


def _e(value) -> str:
    return html.escape("" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value))


def _table(frame: pd.DataFrame, *, index: str | None = None, status_columns=(), code_columns=("reproducer",),
           cell_class=None) -> str:
    """An HTML table of ``frame``.

    ``index`` names the index column (left out when None); cells of ``status_columns`` are coloured
    by status; ``code_columns`` (commands to copy, such as a reproducer) are shown preformatted;
    ``cell_class(column, value)`` gives any other cell its CSS class.
    """
    header = ([index] if index is not None else []) + [str(c) for c in frame.columns]
    lines = ["<div class='scroll'><table>", "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"]
    for label, row in frame.iterrows():
        cells = [f"<th>{_e(label)}</th>"] if index is not None else []
        for column, value in row.items():
            css = STATUS_CLASSES.get(str(value).lower(), "") if column in status_columns else ""
            if not css and cell_class is not None:
                css = cell_class(column, str(value))
            text = f"<pre>{_e(value)}</pre>" if column in code_columns and _e(value) else _e(value)
            cells.append(f"<td class='{css}'>{text}</td>" if css else f"<td>{text}</td>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines.append("</table></div>")
    return "\n".join(lines)


def _summary_section(frame: pd.DataFrame, failures: pd.DataFrame, mode: str | None, caveat: str) -> str:
    parts = ['<section id="summary"><h2>Which implementation for which shape, and how sure</h2>']
    picks = tables.picks(frame, failures, mode, caveat)
    if picks.empty:
        parts.append("<p class='note'>No measurements in these runs.</p></section>")
        return "\n".join(parts)
    if picks["dtype"].nunique() == 1:
        picks = picks.drop(columns="dtype")
    parts.append(_table(picks, cell_class=_pick_class))
    parts.append(
        f"<p class='note'>Per case, {_e(mode)}. The pick has the lowest median time; it is named alone only "
        "when it is faster than every other implementation beyond both measured spreads (p20–p80 of the "
        "repetitions, the rule <code>compare</code> uses), else <em>a ≈ b</em>: within noise. An implementation "
        "without numbers for a case (timeout, out of memory, crash, error, or <em>wrong</em>: a result that did "
        "not match torch-eager's on the inputs it timed) is listed under <em>no numbers</em> and is never a pick. "
        "V, D, N: vocabulary, hidden size, tokens.</p>"
    )
    parts.append("</section>")
    return "\n".join(parts)


def _beside_companions_section(frame: pd.DataFrame, runs: list[Run]) -> str:
    table = tables.beside_companions(frame, {run.name: run.meta for run in runs})
    if table.empty:
        return ""
    return "\n".join([
        '<section id="beside"><h2>Beside busy processes</h2>',
        _table(table),
        "<p class='note'>Cases measured beside CPU-bound companion processes (the case file's "
        "<code>companions</code>), each against the same case measured without them in the same run. The "
        "scheduler shares the cores with a companion in a session of its own as with another job, and with "
        "one in the job's session as with the job's own data loader (<code>companion_session</code>; "
        "docs/case-files.md says what each leaves a job).</p>",
        "</section>",
    ])


def _pick_class(column: str, value: str) -> str:
    if column == "how sure":
        if value.startswith("clear") and "machine loaded" not in value:
            return "good wrap"
        unsure = value.startswith(("clear", "within noise", "medians only"))
        return "warn wrap" if unsure else "muted wrap"
    if column == "pick":
        return "warn wrap" if " ≈ " in value else "wrap"
    if column in ("no numbers", "leanest (peak memory)"):
        failed = column == "no numbers" and any(": " in part for part in value.split("; "))
        return "bad wrap" if failed else "wrap"
    return ""


def _tables_section(frame: pd.DataFrame, failures: pd.DataFrame) -> str:
    parts = ['<section id="tables"><h2>All measurements</h2>']
    if frame.empty and failures.empty:
        parts.append("<p class='note'>No measurements in these runs.</p></section>")
        return "\n".join(parts)
    modes = set(frame["mode"]) | set(failures["mode"])
    dtypes = sorted(set(frame["dtype"]) | set(failures["dtype"]))
    parts.append("<p class='note'>A cell without numbers shows why: timeout, oom, crash, error, wrong (numbers "
                 "that did not match torch-eager's), unsupported; – where the case file does not run it.</p>")
    for mode in [m for m in MODES_BY_PREFERENCE if m in modes]:
        for dtype in dtypes:
            table = tables.case_by_implementation(frame, mode, dtype, tables.time_and_memory_cell, failures)
            if table.empty:
                continue
            parts.append(f"<h3>{_e(dtype)}, {_e(mode)}: median time (speed-up over {_e(BASELINE)}), peak memory</h3>")
            parts.append(_table(table, index="case", status_columns=set(table.columns)))
    parts.append("</section>")
    return "\n".join(parts)


def _plots_section(plots: list[Plot]) -> str:
    parts = ['<section id="plots"><h2>Plots</h2>']
    for plot in plots:
        if plot.path is None:
            parts.append(f"<p class='note'>{_e(plot.title)}: {_e(plot.note)}</p>")
            continue
        data = base64.b64encode(plot.path.read_bytes()).decode("ascii")
        notes = [plot.note] if plot.note else []
        if plot.marked and plot.name.startswith(("time_", "memory_vs")):
            notes.append("No numbers (the cross at the top): " + "; ".join(plot.marked))
        note = "".join(f"<p class='note'>{_e(n)}</p>" for n in notes)
        parts.append(
            f"<figure id='{_e(plot.name)}'><figcaption>{_e(plot.title)}</figcaption>{note}"
            f"<img src='data:image/png;base64,{data}' alt='{_e(plot.title)}'></figure>"
        )
    parts.append("</section>")
    return "\n".join(parts)


def _correctness_section(choice: CheckChoice) -> str:
    parts = ['<section id="correctness"><h2>Correctness</h2>']
    check = choice.check
    if check is None:
        parts.append(f"<p class='note'>{_e(choice.missing)}</p></section>")
        return "\n".join(parts)
    meta = check.run.meta
    parts.append(f"<p>From check run <code>{_e(check.run.name)}</code>: commit {_e(short_commit(meta))}, "
                 f"{_e(device_identity(meta))}, profile {_e(meta.get('profile', '–'))}.</p>")
    parts += [f"<div class='banner bad'>{_e(w)}</div>" for w in choice.warnings]
    parts += [f"<p class='note'>{_e(n)}</p>" for n in choice.notes]
    matrix = tables.property_matrix(check.properties)
    if matrix.empty:
        parts.append("<p class='note'>This check run recorded no properties.</p>")
    else:
        parts.append("<h3>Properties against the float64 reference</h3>")
        parts.append(_table(matrix, index="implementation", status_columns=set(matrix.columns)))
    parts.append(_precision(check))
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


def _precision(check: CheckResults) -> str:
    """The precision tables: each error against the gate's allowance, then against torch-eager's."""
    parts = []
    allowance = tables.precision_matrix(check.precision, "budget_ratio")
    if not allowance.empty:
        parts.append("<h3>Precision: error as a share of what the gate allows</h3>")
        parts.append("<p class='note'>Worst case over every equivalence and precision property: the error "
                     "against the float64 reference divided by the gate's allowance for that case (100%: at "
                     "the limit; above: the property fails).</p>")
        parts.append(_table(allowance, index="implementation", cell_class=_allowance_class))
    elif not check.precision.empty:
        parts.append("<p class='note'>This check run predates the record of each error against the gate's "
                     "allowance (the budget_ratio column of precision.csv); a check run of the current code "
                     "shows it.</p>")
    against_eager = tables.precision_matrix(check.precision, "ratio")
    if not against_eager.empty:
        parts.append("<h3>Precision: error as a multiple of torch-eager's on the same inputs</h3>")
        parts.append("<p class='note'>Worst case, in the norm (1.00: as accurate as torch-eager; below 1: more "
                     "accurate). A large multiple of a tiny error is not a failure: torch-eager can be exact by "
                     "luck on a case, and the allowance also covers one rounding of the output and the order of "
                     "float32 sums, whatever torch-eager's error.</p>")
        parts.append(_table(against_eager, index="implementation"))
    return "\n".join(parts)


def _allowance_class(column: str, value: str) -> str:
    if not value.endswith("%"):
        return ""
    share = float(value.rstrip("%"))
    return "bad" if share > 100 else ("warn" if share > 50 else "good")


def _failures_section(failures: pd.DataFrame) -> str:
    parts = ['<section id="failures"><h2>Cases without numbers: failed, wrong, unsupported</h2>']
    if failures.empty:
        parts.append("<p>Every case produced numbers.</p></section>")
        return "\n".join(parts)
    counts = failures["status"].value_counts()
    parts.append("<p>" + ", ".join(f"{_e(status)}: {count}" for status, count in counts.items()) + "</p>")
    columns = ["run"] if failures["run"].nunique() > 1 else []
    columns += ["case", "implementation", "mode", "status", "reason"]
    parts.append(_table(failures[columns], status_columns={"status"}))
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
