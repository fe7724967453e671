"""The summary tables shared by the HTML dashboard and the Markdown summary (plain DataFrames)."""

from __future__ import annotations

import pandas as pd

from harness.report import noise
from harness.report.runs import MEASUREMENT_KEY, format_bytes, format_ms, format_ratio
from harness.results import BASELINE


def _case_order(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(["dtype", "shape", "vocab", "hidden", "tokens", "case", "mode"], kind="stable")


# Statuses that are a statement about what an implementation supports, not a failure of it.
NOT_A_FAILURE = ("unsupported",)
PICK_COLUMNS = ["dtype", "case", "V, D, N", "pick", "how sure", "time (p20–p80)", f"speed-up over {BASELINE}",
                "leanest (peak memory)", "no numbers"]


def picks(frame: pd.DataFrame, failed: pd.DataFrame, mode: str | None, caveat: str = "") -> pd.DataFrame:
    """Per case: which implementation to pick and how sure that is, its time, its speed-up over the
    baseline, the leanest, and every implementation without numbers (timeout, error, wrong, ...).

    The pick is the lowest median time; it is named alone only when it is faster than every other
    implementation beyond both measured spreads (``harness.report.noise``), otherwise the
    implementations within noise of it are named with it ("a ≈ b"). An implementation whose numbers are
    ``wrong`` or missing is never the pick: it is listed under "no numbers" in its case's row.
    ``caveat`` qualifies every pick's "how sure" (e.g. "machine loaded").
    """
    data = frame if mode is None else frame[frame["mode"] == mode]
    data = data.dropna(subset=["time_median"])
    bad = failed if mode is None else failed[failed["mode"] == mode]
    cases = pd.concat([data[_ORDER_COLUMNS], bad[_ORDER_COLUMNS]], ignore_index=True)
    cases = _case_order(cases.assign(mode=mode or "")).drop_duplicates(subset=["dtype", "case"])
    rows = []
    for _, case in cases.iterrows():
        group = data[(data["case"] == case["case"]) & (data["dtype"] == case["dtype"])].sort_values("time_median")
        pick = _pick(group)
        if caveat and not group.empty:
            pick["how sure"] += f"; {caveat}"
        rows.append({
            "dtype": case["dtype"],
            "case": case["case"],
            "V, D, N": _shape(case),
            **pick,
            "no numbers": _no_numbers(bad[(bad["case"] == case["case"]) & (bad["dtype"] == case["dtype"])]),
        })
    return pd.DataFrame(rows, columns=PICK_COLUMNS)


_ORDER_COLUMNS = ["dtype", "shape", "vocab", "hidden", "tokens", "case"]


def _shape(case: pd.Series) -> str:
    values = [case["vocab"], case["hidden"], case["tokens"]]
    return "–" if any(pd.isna(v) for v in values) else ", ".join(f"{int(v):,}" for v in values)


def _pick(group: pd.DataFrame) -> dict:
    """The pick among one case's measured implementations (sorted by median time) and how sure."""
    empty = {"pick": "–", "how sure": "no implementation has numbers", "time (p20–p80)": "–",
             f"speed-up over {BASELINE}": "–", "leanest (peak memory)": "–"}
    if group.empty:
        return empty
    leader = group.iloc[0]
    others = group.iloc[1:]
    tied = [row["series"] for _, row in others.iterrows() if not noise.clearly_faster(leader, row)]
    if others.empty:
        pick, sure = leader["series"], "only one with numbers"
    elif tied:
        pick = " ≈ ".join([leader["series"], *tied])
        sure = "within noise: p20–p80 ranges overlap"
    else:
        runner_up = others.iloc[0]
        ratio = runner_up["time_median"] / leader["time_median"]
        sure = f"clear: {ratio:.2f}× faster than {runner_up['series']}"
        if pd.isna([leader["time_p20"], leader["time_p80"], runner_up["time_p20"], runner_up["time_p80"]]).any():
            sure = f"medians only (no p20/p80): {ratio:.2f}× faster than {runner_up['series']}"
        pick = leader["series"]
    if "Interquartile" in str(leader.get("note", "")):
        sure += "; its timer flagged noise"
    if "not verified" in str(leader.get("note", "")):
        sure += "; its result was not verified against torch-eager"
    memory = group.dropna(subset=["peak_memory"])
    leanest = memory.loc[memory["peak_memory"].idxmin()] if not memory.empty else None
    return {
        "pick": pick,
        "how sure": sure,
        "time (p20–p80)": _time_with_spread(leader),
        f"speed-up over {BASELINE}": format_ratio(leader["speedup"]),
        "leanest (peak memory)": "–" if leanest is None
        else f"{leanest['series']} ({format_bytes(leanest['peak_memory'])})",
    }


def _time_with_spread(row: pd.Series) -> str:
    """"46.08 ms (45.72–49.63)": the median, and p20–p80 in its unit where they share it."""
    median = format_ms(row["time_median"])
    if pd.isna(row["time_p20"]) or pd.isna(row["time_p80"]):
        return median
    low, high = format_ms(row["time_p20"]), format_ms(row["time_p80"])
    unit = median.split()[-1]
    if low.endswith(f" {unit}") and high.endswith(f" {unit}"):
        low, high = low[: -len(unit) - 1], high[: -len(unit) - 1]
    return f"{median} ({low}–{high})"


def _no_numbers(bad: pd.DataFrame) -> str:
    """The failures of one case, by implementation ("chunked: timeout"), then how many were unsupported."""
    failed = bad[~bad["status"].isin(NOT_A_FAILURE)].sort_values("series")
    parts = [f"{series}: {status}" for series, status in zip(failed["series"], failed["status"])]
    unsupported = bad["status"].isin(NOT_A_FAILURE).sum()
    if unsupported:
        parts.append(f"{unsupported} unsupported")
    return "; ".join(parts) or "–"


def case_by_implementation(frame: pd.DataFrame, mode: str, dtype: str, cell,
                           failed: pd.DataFrame | None = None) -> pd.DataFrame:
    """case x implementation table of ``cell(row) -> str`` for one mode and dtype; a case an
    implementation has no numbers for shows its status (timeout, wrong, ...), "–" where not run."""
    data = _case_order(frame[(frame["mode"] == mode) & (frame["dtype"] == dtype)])
    bad = pd.DataFrame(columns=["case", "series", "status"]) if failed is None else \
        failed[(failed["mode"] == mode) & (failed["dtype"] == dtype)]
    if data.empty and bad.empty:
        return pd.DataFrame()
    cells = pd.concat([
        data.assign(cell=[cell(row) for _, row in data.iterrows()])[["case", "series", "cell"]],
        bad.assign(cell=bad["status"])[["case", "series", "cell"]],
    ], ignore_index=True)
    order = list(dict.fromkeys(list(data["case"]) + list(_case_order(bad)["case"] if not bad.empty else [])))
    table = cells.pivot_table(index="case", columns="series", values="cell", aggfunc="first")
    table = table.reindex(index=order, columns=sorted(cells["series"].unique()))
    return table.fillna("–")


# What makes a measurement beside companions and one without them the same case but for the load:
# the measurement's key without the names (the case's, and its case-file entry's).
_SAME_CASE = [column for column in MEASUREMENT_KEY if column not in ("case", "shape")]
BESIDE_COLUMNS = ["case", "beside", "implementation", "quiet", "beside them", "slow-down"]


def beside_companions(frame: pd.DataFrame, metas: dict[str, dict]) -> pd.DataFrame:
    """Each case measured beside busy companion processes (``metas``: run name -> meta.json), per
    implementation: its median time there, the same case's measured quietly in the same run, and
    the slow-down between them: how the implementation fares on a shared machine."""
    loaded = {(run, case): (count, meta.get("companion_sessions", {}).get(case, "own"))
              for run, meta in metas.items() for case, count in (meta.get("companions") or {}).items()}
    if frame.empty or not loaded:
        return pd.DataFrame(columns=BESIDE_COLUMNS)
    keys = list(zip(frame["run"], frame["case"]))
    is_loaded = pd.Series([key in loaded for key in keys], index=frame.index)
    quiet = frame[~is_loaded].drop_duplicates(subset=_SAME_CASE)[[*_SAME_CASE, "time_median"]]
    pairs = frame[is_loaded].merge(quiet, on=_SAME_CASE, how="left", suffixes=("", "_quiet"))
    rows = []
    for _, row in _case_order(pairs).iterrows():
        count, session = loaded[(row["run"], row["case"])]
        rows.append({
            "case": row["case"],
            "beside": f"{count} process{'es' if count > 1 else ''}, " + ("in the job's session" if session == "job"
                      else f"{'each ' if count > 1 else ''}in a session of its own"),
            "implementation": row["series"],
            "quiet": format_ms(row["time_median_quiet"]) if pd.notna(row["time_median_quiet"]) else "not measured",
            "beside them": format_ms(row["time_median"]),
            "slow-down": format_ratio(row["time_median"] / row["time_median_quiet"]),
        })
    return pd.DataFrame(rows, columns=BESIDE_COLUMNS)


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


def precision_matrix(precision: pd.DataFrame, column: str = "ratio") -> pd.DataFrame:
    """implementation x (dtype, tensor) -> its worst error over every equivalence and precision
    property of a check run: ``ratio``, as a multiple of torch-eager's error on the same inputs, or
    ``budget_ratio``, as a share of the gate's allowance (written as a percentage). Empty when the
    check run has no such column (``budget_ratio`` is newer than ``ratio``)."""
    if precision.empty or column not in precision:
        return pd.DataFrame()
    data = precision.assign(value=pd.to_numeric(precision[column], errors="coerce")).dropna(subset=["value"])
    if data.empty:
        return pd.DataFrame()
    data = data.assign(column=data["dtype"] + " " + data["tensor"])
    matrix = data.pivot_table(index="implementation", columns="column", values="value", aggfunc="max")
    order = sorted(matrix.columns, key=lambda c: (("float32", "bfloat16", "float16").index(c.split()[0])
                                                   if c.split()[0] in ("float32", "bfloat16", "float16") else 9, c))
    if column == "budget_ratio":
        return matrix[order].map(lambda v: "–" if pd.isna(v) else f"{v * 100:.0f}%")
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
