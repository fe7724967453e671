"""``summary.md``: a pull-request-comment-sized summary (one table per dtype, then the failures)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.report import tables
from harness.report.dashboard import CPU_CAVEAT
from harness.report.runs import Run
from harness.results import BASELINE
from harness import machine_load as load

MAX_CASES_PER_DTYPE = 30  # keeps the comment readable (and far below GitHub's comment size limit)
MAX_FAILURES = 20


def escape(text) -> str:
    """Plain text for a Markdown table cell: no column breaks, line breaks or HTML."""
    text = "" if text is None or (isinstance(text, float) and pd.isna(text)) else str(text)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return " ".join(text.replace("|", "\\|").split())


def _table(frame: pd.DataFrame, index: str) -> list[str]:
    header = [index, *map(str, frame.columns)]
    lines = ["| " + " | ".join(escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    for label, row in frame.iterrows():
        lines.append("| " + " | ".join(escape(v) for v in [label, *row]) + " |")
    return lines


def write_summary(
    path: Path, *, runs: list[Run], device: str, frame: pd.DataFrame, failures: pd.DataFrame,
    mode: str | None, dashboard: Path,
) -> Path:
    names = ", ".join(run.name for run in runs)
    lines = [
        f"## lmhead-bench: {escape(names)}",
        "",
        f"measured on: **{escape(device)}**; mode: {escape(mode or '–')}; "
        f"full dashboard: `{escape(dashboard)}`",
        "",
    ]
    for run in runs:
        warning = load.warning(run.meta)
        if warning:
            lines += [f"> **Loaded machine** ({escape(run.name)}): {escape(warning)}", ""]
    if any(run.meta.get("device_kind") == "cpu" for run in runs):
        lines += [f"> **CPU only.** {escape(CPU_CAVEAT)}", ""]
    rates = [rate for run in runs for rate in [matmul_rate_line(run.name, run.meta)] if rate]
    if rates:
        lines += ["matmul rate (what `matmul_fraction` divides by): " + "; ".join(rates), ""]
    if frame.empty and failures.empty:
        lines += ["No measurements in these runs.", ""]
    loaded = any(load.warning(run.meta) for run in runs)
    picks = tables.picks(frame, failures, mode, "machine loaded" if loaded else "")
    if not picks.empty:
        lines += ["### Which implementation for which shape, and how sure", "",
                  "The pick is named alone only when it is faster than every other beyond both measured "
                  "spreads (p20–p80); a case without numbers for an implementation lists it under *no numbers*.", ""]
        lines += _table(picks.head(MAX_CASES_PER_DTYPE * 2).set_index("case"), index="case")
        if len(picks) > MAX_CASES_PER_DTYPE * 2:
            lines.append(f"\n…and {len(picks) - MAX_CASES_PER_DTYPE * 2} more cases in the dashboard.")
        lines.append("")
    lines += _beside_companions(frame, runs)
    dtypes = sorted(set(frame["dtype"]) | set(failures["dtype"])) if not (frame.empty and failures.empty) else []
    for dtype in dtypes:
        table = tables.case_by_implementation(frame, mode, dtype, tables.time_and_memory_cell, failures)
        if table.empty:
            continue
        lines += [f"### {escape(dtype)}: median time (speed-up over {BASELINE}), peak memory", ""]
        lines += _table(table.head(MAX_CASES_PER_DTYPE), index="case")
        if len(table) > MAX_CASES_PER_DTYPE:
            lines.append(f"\n…and {len(table) - MAX_CASES_PER_DTYPE} more cases in the dashboard.")
        lines.append("")
    lines += _failures(failures)
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path


def _beside_companions(frame: pd.DataFrame, runs: list[Run]) -> list[str]:
    table = tables.beside_companions(frame, {run.name: run.meta for run in runs})
    if table.empty:
        return []
    return ["### Beside busy processes: time against the same case measured quietly", "",
            *_table(table.set_index("case"), index="case"), ""]


def matmul_rate_line(name: str, meta: dict) -> str:
    """The run's matmul rate per dtype, with the routine that reached it and the others', as
    "RUN float32 0.40 TFLOP/s (onednn; torch.mm 0.19)"; empty for a run that measured none."""
    parts = []
    for dtype, rate in sorted((meta.get("matmul_tflops") or {}).items()):
        routines = (meta.get("matmul_routines") or {}).get(dtype, {})
        fastest = max(routines, key=routines.get) if routines else None
        others = ", ".join(f"{n} {r:.2f}" for n, r in routines.items() if n != fastest)
        detail = f" ({escape(fastest)}{'; ' + escape(others) if others else ''})" if fastest else ""
        parts.append(f"{escape(dtype)} {rate:.2f} TFLOP/s{detail}")
    return f"{escape(name)}: " + ", ".join(parts) if parts else ""


def _failures(failures: pd.DataFrame) -> list[str]:
    if failures.empty:
        return ["Every case produced numbers."]
    counts = ", ".join(f"{status}: {count}" for status, count in failures["status"].value_counts().items())
    lines = [f"### Cases without numbers ({escape(counts)})", ""]
    for _, row in failures.head(MAX_FAILURES).iterrows():
        lines.append(
            f"- {escape(row['case'])} · {escape(row['implementation'])} · {escape(row['mode'])}: "
            f"**{escape(row['status'])}**, {escape(row['reason'])}"
        )
    if len(failures) > MAX_FAILURES:
        lines.append(f"- …and {len(failures) - MAX_FAILURES} more in the dashboard.")
    return lines
