"""The summary tables shared by the HTML dashboard and the Markdown summary (plain DataFrames)."""

from __future__ import annotations

import pandas as pd

from harness.report.runs import BASELINE, format_bytes, format_ms, format_ratio


def _case_order(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(["dtype", "shape", "vocab", "hidden", "tokens", "case", "mode"], kind="stable")


def best_per_case(frame: pd.DataFrame, mode: str | None = None) -> pd.DataFrame:
    """Per case (and mode): the fastest implementation, its speed-up over the baseline, and the leanest one."""
    columns = ["dtype", "case", "mode", "fastest", "time", f"{BASELINE} time", "speed-up",
               "peak memory (fastest)", "leanest", "peak memory (leanest)"]
    data = frame if mode is None else frame[frame["mode"] == mode]
    data = data.dropna(subset=["time_median"])
    rows = []
    for _, group in _case_order(data).groupby(["dtype", "case", "mode"], sort=False):
        fastest = group.loc[group["time_median"].idxmin()]
        baseline = group[group["implementation"] == BASELINE]["time_median"]
        memory = group.dropna(subset=["peak_memory"])
        leanest = memory.loc[memory["peak_memory"].idxmin()] if not memory.empty else None
        rows.append({
            "dtype": fastest["dtype"],
            "case": fastest["case"],
            "mode": fastest["mode"],
            "fastest": fastest["series"],
            "time": format_ms(fastest["time_median"]),
            f"{BASELINE} time": format_ms(baseline.iloc[-1]) if not baseline.empty else "–",
            "speed-up": format_ratio(fastest["speedup"]),
            "peak memory (fastest)": format_bytes(fastest["peak_memory"]),
            "leanest": leanest["series"] if leanest is not None else "–",
            "peak memory (leanest)": format_bytes(leanest["peak_memory"]) if leanest is not None else "–",
        })
    return pd.DataFrame(rows, columns=columns)


def case_by_implementation(frame: pd.DataFrame, mode: str, dtype: str, cell) -> pd.DataFrame:
    """case x implementation table of ``cell(row) -> str`` for one mode and dtype ("–" where not measured)."""
    data = _case_order(frame[(frame["mode"] == mode) & (frame["dtype"] == dtype)])
    if data.empty:
        return pd.DataFrame()
    data = data.assign(cell=[cell(row) for _, row in data.iterrows()])
    table = data.pivot_table(index="case", columns="series", values="cell", aggfunc="last")
    table = table.reindex(index=data["case"].unique(), columns=sorted(data["series"].unique()))
    return table.fillna("–")


def time_cell(row: pd.Series) -> str:
    speedup = "" if pd.isna(row["speedup"]) else f" (×{row['speedup']:.2f})"
    return format_ms(row["time_median"]) + speedup


def time_and_memory_cell(row: pd.Series) -> str:
    return f"{time_cell(row)}, {format_bytes(row['peak_memory'])}"


def property_matrix(properties: pd.DataFrame) -> pd.DataFrame:
    """implementation x property -> status, from a check run's properties.csv."""
    if properties.empty:
        return pd.DataFrame()
    matrix = properties.pivot_table(index="implementation", columns="property", values="status", aggfunc="last")
    return matrix.fillna("–")


def behaviour_matrix(behaviour: pd.DataFrame) -> pd.DataFrame:
    """implementation x edge case -> what it does, from a check run's behaviour.csv."""
    if behaviour.empty:
        return pd.DataFrame()
    matrix = behaviour.pivot_table(index="implementation", columns="edge_case", values="behaviour", aggfunc="last")
    return matrix.fillna("–")
