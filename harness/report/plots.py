"""The report's figures, drawn with seaborn on matplotlib's file-only Agg backend.

Every figure has one facet (column) per dtype, log axes where the data span decades, and says
which device its numbers were measured on. A figure whose data the runs do not hold (no vocabulary
sweep, no memory measured) is skipped with the reason, so a partial run still gets a report.

A case an implementation has no numbers for (timeout, out of memory, crash, error, or numbers that
are ``wrong``) is drawn where its numbers would be: a cross at the top of a line plot, at the
case's x, labelled with the status; a red cell with the status in a heatmap. A line never just
stops, and a heatmap's cell is never left blank for a failure. ``Plot.marked`` lists what was
drawn so, and ``Plot.cells`` holds each heatmap's cell texts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; must be chosen before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from harness.report.runs import primary_mode  # noqa: E402
from harness.results import BASELINE  # noqa: E402

MAX_FACET_ROWS = 6  # more sweep groups than this would make an unreadable figure; the rest is noted
DPI = 100


FAILURE_COLOUR = "#d62728"
NOT_A_FAILURE = ("unsupported",)  # a statement about support: left grey, as not run


@dataclass(frozen=True)
class Plot:
    """One figure of the report: ``path`` is the PNG, or None when skipped (``note`` says why).

    ``marked``: the failures drawn in place ("chunked: timeout at V=128,256 (vocab-sweep ...)");
    ``cells``: a heatmap's cell texts per dtype (case x implementation), failures by their status.
    """

    name: str
    title: str
    path: Path | None
    note: str = ""
    marked: tuple[str, ...] = ()
    cells: dict = field(default_factory=dict, compare=False, repr=False)


def draw_all(frame: pd.DataFrame, device: str, out_dir: Path, failed: pd.DataFrame | None = None) -> list[Plot]:
    """Every figure of the report, written as ``out_dir/<name>.png``; ``failed``: the runs' failures."""
    sns.set_theme(style="whitegrid", context="notebook")
    mode = primary_mode(frame)
    failed = failed if failed is not None else pd.DataFrame(columns=["mode", "status"])
    failed = failed[(failed["mode"] == mode) & ~failed["status"].isin(NOT_A_FAILURE)] if mode else failed.iloc[0:0]
    plots = [
        _sweep_plot(frame, failed, mode, device, out_dir, vary="vocab", metric="time", name="time_vs_vocab",
                    title="Time vs vocabulary size V"),
        _sweep_plot(frame, failed, mode, device, out_dir, vary="tokens", metric="time", name="time_vs_tokens",
                    title="Time vs number of tokens N"),
        _sweep_plot(frame, failed, mode, device, out_dir, vary="tokens", metric="peak_memory",
                    name="memory_vs_tokens", title="Peak memory vs number of tokens N"),
        _heatmap(frame, failed, mode, device, out_dir, value="speedup", name="speedup_heatmap",
                 title=f"Speed-up over {BASELINE} (its time / this time)", fmt=".2f", log_colour=True, centre=1.0),
        _heatmap(frame, failed, mode, device, out_dir, value="memory_over_lower_bound",
                 name="memory_over_lower_bound",
                 title="Peak memory as a multiple of the lower bound (grad_hidden + grad_weight)",
                 fmt=".1f", log_colour=True),
        _heatmap(frame, failed, mode, device, out_dir, value="matmul_fraction", name="matmul_fraction",
                 title="Achieved fraction of the device's measured matmul rate", fmt=".2f", log_colour=False),
    ]
    plt.close("all")
    return plots


def _sweep_groups(data: pd.DataFrame, vary: str) -> list[tuple[str, pd.DataFrame]]:
    """Sets of cases that differ only in ``vary`` (at least two values of it), with a label."""
    fixed = ["shape", "hidden", "tied", "options", "tokens" if vary == "vocab" else "vocab"]
    groups = []
    for key, group in data.groupby(fixed, dropna=False, sort=True):
        if group[vary].nunique() < 2:
            continue
        shape, hidden, tied, options, other = key
        other_name = "N" if vary == "vocab" else "V"
        label = f"{shape}  D={hidden:g} {other_name}={other:g}"
        if options:
            label += f"  [{options}]"
        if str(tied).lower() == "true":
            label += " tied"
        groups.append((label, group))
    return groups


def _sweep_plot(frame, failed, mode, device, out_dir, *, vary, metric, name, title) -> Plot:
    """Lines per implementation over ``vary``, with the p20–p80 band for times, and a cross where a
    case has no numbers."""
    value = "time_median" if metric == "time" else "peak_memory"
    data = frame[(frame["mode"] == mode)].dropna(subset=[value, vary]) if mode else frame.iloc[0:0]
    data = data.assign(failure="")
    bad = failed.dropna(subset=[vary]).assign(failure=failed["status"], **{value: np.nan})
    groups = _sweep_groups(pd.concat([data, bad], ignore_index=True) if not bad.empty else data, vary)
    groups = [(label, group) for label, group in groups if group[value].notna().any()]
    if not groups:
        what = "vocabulary sizes" if vary == "vocab" else "token counts"
        reason = (f"no measured {value} in these runs" if data.empty
                  else f"no set of cases that differs only in its {what}")
        return Plot(name, title, None, f"skipped: {reason}")
    note = ""
    if len(groups) > MAX_FACET_ROWS:
        note = f"showing the first {MAX_FACET_ROWS} of {len(groups)} sweeps"
        groups = groups[:MAX_FACET_ROWS]
    long = pd.concat([g.assign(sweep=label) for label, g in groups], ignore_index=True)
    scale = 1.0 if metric == "time" else 2**20
    long = long.assign(y=long[value] / scale, low=long["time_p20"], high=long["time_p80"])
    series = sorted(long["series"].unique())
    palette = dict(zip(series, sns.color_palette(n_colors=len(series))))
    measured = long[long["failure"] == ""]
    grid = sns.FacetGrid(
        measured, row="sweep", col="dtype", hue="series", hue_order=[s for s in series if s in set(measured["series"])],
        palette=palette, row_order=[label for label, _ in groups], col_order=sorted(long["dtype"].unique()),
        sharex=False, sharey=False, height=3.2, aspect=1.4,
    )
    grid.map_dataframe(_line_with_band, x=vary, band=metric == "time")
    grid.set(xscale="log", yscale="log")
    marked = []
    for (sweep, dtype), ax in grid.axes_dict.items():
        _label_log_axes(ax, sorted(long.loc[long["sweep"] == sweep, vary].unique()))
        crosses = long[(long["sweep"] == sweep) & (long["dtype"] == dtype) & (long["failure"] != "")]
        marked += _mark_failures(ax, crosses, vary, palette, sweep)
    grid.set_axis_labels(
        "vocabulary size V" if vary == "vocab" else "tokens N",
        "time, median (ms)" if metric == "time" else "peak memory (MiB)",
    )
    grid.set_titles(template="{row_name} · {col_name}", size=9)
    grid.add_legend(title="implementation")
    band = "; band = p20–p80" if metric == "time" else ""
    cross = "; ✕ at the top: no numbers (timeout, error, wrong, ...)" if marked else ""
    # Just above the facet titles: bbox_inches="tight" grows the saved image to include it.
    height = grid.figure.get_figheight()
    grid.figure.suptitle(f"{title} — {mode}{band}{cross}\nmeasured on: {device}", y=1 + 0.15 / height, va="bottom")
    return _save(grid.figure, out_dir, name, title, note, marked=tuple(marked))


def _mark_failures(ax, crosses: pd.DataFrame, vary: str, palette: dict, sweep: str) -> list[str]:
    """A cross at the top edge of ``ax`` at each failed case's x, in its implementation's colour,
    labelled with the status; returns what was marked."""
    marked = []
    top = ax.get_xaxis_transform()  # x in data units, y in axes units: 1 is the top edge
    crosses = crosses.sort_values([vary, "series"])
    stacked = crosses.groupby(vary, sort=False).cumcount()  # several failures at one x stack downwards
    for offset, (_, row) in zip(stacked, crosses.iterrows()):
        colour = palette.get(row["series"], FAILURE_COLOUR)
        y = 0.97 - 0.09 * (offset % 4)
        ax.plot([row[vary]], [y], marker="X", markersize=9, color=colour, markeredgecolor=FAILURE_COLOUR,
                transform=top, clip_on=False, linestyle="none")
        ax.annotate(f"{row['series']}: {row['failure']}", (row[vary], y), xycoords=top, xytext=(-6, 0),
                    textcoords="offset points", ha="right", va="center", fontsize=7, color=FAILURE_COLOUR)
        marked.append(f"{row['series']}: {row['failure']} at {'V' if vary == 'vocab' else 'N'}="
                      f"{row[vary]:,.0f} ({sweep})")
    return marked


def _line_with_band(*, data: pd.DataFrame, x: str, band: bool, color=None, label=None, **_) -> None:
    data = data.sort_values(x)
    ax = plt.gca()
    ax.plot(data[x], data["y"], marker="o", color=color, label=label)
    if band and data[["low", "high"]].notna().all(axis=None):
        ax.fill_between(data[x], data["low"], data["high"], color=color, alpha=0.2, linewidth=0)


def _label_log_axes(ax, x_values: list[float]) -> None:
    """Ticks a reader can read: the swept sizes themselves on x, 1-2-5 steps on y, no crowded minor labels."""
    ax.xaxis.set_major_locator(ticker.FixedLocator(x_values))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:,.0f}"))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def _heatmap(frame, failed, mode, device, out_dir, *, value, name, title, fmt, log_colour, centre=None) -> Plot:
    """case x implementation, one panel per dtype; colours on a log scale when values span decades;
    a case without numbers is a red cell with its status."""
    data = frame[frame["mode"] == mode].dropna(subset=[value]) if mode else frame.iloc[0:0]
    if data.empty:
        why = f"no {BASELINE} measurements to compare with" if value == "speedup" else f"no measured {value}"
        return Plot(name, title, None, f"skipped: {why} in these runs")
    dtypes = sorted(data["dtype"].unique())
    order = ["shape", "vocab", "hidden", "tokens", "case"]  # numeric order, not by name
    both = pd.concat([data[[*order, "dtype", "series"]], failed[[*order, "dtype", "series"]]], ignore_index=True)
    both = both[both["dtype"].isin(dtypes)].sort_values(order)
    tables, texts = {}, {}
    for dtype in dtypes:
        here = both[both["dtype"] == dtype]
        cases, columns = list(here["case"].unique()), sorted(here["series"].unique())
        table = (data[data["dtype"] == dtype].pivot_table(index="case", columns="series", values=value, aggfunc="last")
                 .reindex(index=cases, columns=columns))
        text = table.map(lambda v: "" if pd.isna(v) else format(v, fmt))
        for _, row in failed[failed["dtype"] == dtype].iterrows():
            text.loc[row["case"], row["series"]] = row["status"]
        tables[dtype], texts[dtype] = table, text
    rows = max(len(t.index) for t in tables.values())
    width = sum(2.5 + 0.9 * len(t.columns) for t in tables.values()) + 3
    figure, axes = plt.subplots(
        1, len(dtypes), figsize=(width, 2.6 + 0.38 * rows), squeeze=False, layout="constrained"
    )
    marked = []
    for ax, (dtype, table) in zip(axes[0], tables.items()):
        colour = np.log10(table) if log_colour else table
        if centre is not None:  # diverging colours, symmetric around "as fast as the baseline"
            middle = np.log10(centre) if log_colour else centre
            spread = float(np.nanmax(np.abs(colour.to_numpy() - middle))) or 1.0
            limits, cmap = dict(center=middle, vmin=middle - spread, vmax=middle + spread), "RdYlGn"
        else:
            limits, cmap = {}, "mako_r"
        sns.heatmap(colour, annot=texts[dtype].to_numpy(), fmt="", cmap=cmap, cbar=False, linewidths=0.5, ax=ax,
                    annot_kws={"fontsize": 8}, **limits)
        marked += _failed_cells(ax, table, texts[dtype], dtype)
        ax.set_title(dtype)
        ax.grid(False)
        ax.set_facecolor("#e8e8e8")  # the cells left empty: not run here (unsupported, or not in the case file)
        ax.set_xlabel("implementation")
        ax.set_ylabel("case" if ax is axes[0][0] else "")
        ax.tick_params(axis="x", labelrotation=30)
        ax.tick_params(axis="y", labelrotation=0)  # seaborn turns a lone row label sideways
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")
    colour_note = "; colour: log scale" if log_colour else ""
    failure_note = "; red: no numbers (status shown)" if marked else ""
    figure.suptitle(f"{title} — {mode} (grey: not run{failure_note}{colour_note})\nmeasured on: {device}")
    return _save(figure, out_dir, name, title, marked=tuple(marked), cells=texts)


def _failed_cells(ax, table: pd.DataFrame, text: pd.DataFrame, dtype: str) -> list[str]:
    """Red cells, with the status written in them, where a case has a failure instead of a value
    (seaborn annotates only the cells that have a value)."""
    from matplotlib.patches import Rectangle

    marked = []
    for i, case in enumerate(table.index):
        for j, series in enumerate(table.columns):
            status = text.loc[case, series]
            if pd.isna(table.loc[case, series]) and status:
                ax.add_patch(Rectangle((j, i), 1, 1, facecolor="#f6c9c5", edgecolor="white", linewidth=0.5,
                                       zorder=0.5))
                ax.text(j + 0.5, i + 0.5, status, ha="center", va="center", fontsize=8, color="#8b0000")
                marked.append(f"{series}: {status} at {case} ({dtype})")
    return marked


def _save(figure, out_dir: Path, name: str, title: str, note: str = "", *, marked: tuple[str, ...] = (),
          cells: dict | None = None) -> Plot:
    path = Path(out_dir) / f"{name}.png"
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return Plot(name, title, path, note, marked, cells or {})
