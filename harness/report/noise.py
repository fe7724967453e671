"""When one timing is faster than another: the one rule ``compare`` and the reports' picks share.

A timing is a median with its measured spread, p20 to p80 of the repetitions. One is **faster**
than another only when its median is lower by more than a threshold *and* its p80 is below the
other's p20: the two spreads do not overlap, so noise alone cannot produce the difference. When
the medians differ by more than the threshold but the spreads overlap, the two are **within
noise** of each other. Without a spread (older runs), the threshold alone decides, and the
judgement says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

FASTER, SLOWER, WITHIN_NOISE, UNCHANGED = "faster", "slower", "within noise", "unchanged"
NO_SPREAD = "no p20/p80: threshold only"
OVERLAP = "p20–p80 ranges overlap"


@dataclass(frozen=True)
class Judgement:
    """How ``new`` compares with ``base`` in time: ``verdict`` is one of the four above, ``note`` why."""

    verdict: str
    change: float  # new median / base median - 1 (NaN when either is missing)
    note: str = ""


def relative_change(base: float, new: float) -> float:
    if pd.isna(base) or pd.isna(new):
        return float("nan")
    if base == 0:
        return 0.0 if new == 0 else float("inf")
    return new / base - 1


def judge_time(base: pd.Series, new: pd.Series, threshold: float) -> Judgement:
    """``new``'s time against ``base``'s (each a row with time_median, time_p20, time_p80)."""
    change = relative_change(base["time_median"], new["time_median"])
    has_spread = not pd.isna([base["time_p20"], base["time_p80"], new["time_p20"], new["time_p80"]]).any()
    note = "" if has_spread or pd.isna(change) else NO_SPREAD
    if change > threshold:
        if not has_spread or new["time_p20"] > base["time_p80"]:
            return Judgement(SLOWER, change, note)
        return Judgement(WITHIN_NOISE, change, OVERLAP)
    if change < -threshold:
        if not has_spread or new["time_p80"] < base["time_p20"]:
            return Judgement(FASTER, change, note)
        return Judgement(WITHIN_NOISE, change, OVERLAP)
    return Judgement(UNCHANGED, change, note)


def clearly_faster(fast: pd.Series, slow: pd.Series) -> bool:
    """Whether ``fast`` beats ``slow`` beyond both measured spreads (no threshold: any clear gap)."""
    return judge_time(slow, fast, 0.0).verdict == FASTER
