"""The summary tables shared by the HTML dashboard and the Markdown summary (plain DataFrames)."""

from __future__ import annotations

import pandas as pd

from harness.report.runs import format_bytes, format_ms, format_ratio
from harness.results import BASELINE


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


def precision_matrix(precision: pd.DataFrame) -> pd.DataFrame:
    """implementation x (dtype, tensor) -> its worst error as a multiple of torch-eager's, over every
    equivalence and precision property of a check run."""
    if precision.empty:
        return pd.DataFrame()
    data = precision.assign(ratio=pd.to_numeric(precision["ratio"], errors="coerce"))
    data = data.assign(column=data["dtype"] + " " + data["tensor"])
    matrix = data.pivot_table(index="implementation", columns="column", values="ratio", aggfunc="max")
    order = sorted(matrix.columns, key=lambda c: (("float32", "bfloat16", "float16").index(c.split()[0])
                                                   if c.split()[0] in ("float32", "bfloat16", "float16") else 9, c))
    return matrix[order].map(lambda v: "–" if pd.isna(v) else f"{v:.2f}")


def not_checked_table(not_checked: pd.DataFrame, properties: pd.DataFrame) -> pd.DataFrame:
    """Per implementation: what it does not support here, and how many cases it refused at run time."""
    rows = []
    refused = properties.assign(refused=pd.to_numeric(properties.get("refused", 0), errors="coerce").fillna(0))
    for implementation in dict.fromkeys(list(not_checked["implementation"]) + list(properties["implementation"])):
        declared = not_checked[not_checked["implementation"] == implementation]
        own = refused[(refused["implementation"] == implementation) & (refused["refused"] > 0)]
        if declared.empty and own.empty:
            continue
        rows.append({
            "implementation": implementation,
            "unsupported here": "; ".join(f"{w}: {r}" for w, r in zip(declared["what"], declared["reason"])) or "–",
            "cases refused at run time": ", ".join(f"{p} ({int(n)})" for p, n in zip(own["property"], own["refused"]))
            or "–",
        })
    return pd.DataFrame(rows, columns=["implementation", "unsupported here", "cases refused at run time"])


def behaviour_matrix(behaviour: pd.DataFrame) -> pd.DataFrame:
    """implementation x edge case -> what it does, from a check run's behaviour.csv."""
    if behaviour.empty:
        return pd.DataFrame()
    matrix = behaviour.pivot_table(index="implementation", columns="edge_case", values="behaviour", aggfunc="last")
    return matrix.fillna("–")
