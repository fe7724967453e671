"""Synthetic run folders in the real results format, so report and compare tests need no sweep.

The numbers come from a simple cost model (time grows with N*V*D, memory with what each
implementation materialises) plus seeded noise, which is enough to give the plots real
structure. They are not measurements and are never shown as such.
"""

from __future__ import annotations

import random
from pathlib import Path

from harness.results import BEHAVIOUR_COLUMNS, PROPERTY_COLUMNS, RowWriter, write_json_atomic

SYNTHETIC_DEVICE = "synthetic test device (not a measurement)"
SWEEP_COMMIT = "0123abc"
XSS = "<script>alert('xss')</script>"

IMPLEMENTATIONS = {  # name -> (relative speed, bytes per logit kept alive)
    "torch-eager": (1.0, 12),
    "torch-compile": (1.4, 6),
    "chunked": (1.2, 0.5),
    "liger": (1.6, 0.25),
    "torch-linear-ce": (1.3, 0.5),
}
DTYPES = {"float32": 4, "bfloat16": 2}
MODES = ("forward", "forward_backward")


def synthetic_cases() -> list[dict]:
    """A vocabulary sweep and a token sweep, each in two dtypes."""
    cases = []
    for dtype in DTYPES:
        for vocab in (8192, 32768, 131072):
            cases.append(dict(shape="vocab-sweep", vocab=vocab, hidden=1024, tokens=2048, dtype=dtype))
        for tokens in (1024, 4096, 16384):
            cases.append(dict(shape="llama3-8b", vocab=128256, hidden=4096, tokens=tokens, dtype=dtype))
    for case in cases:
        case["case"] = f"{case['shape']}/V={case['vocab']}/N={case['tokens']}/{case['dtype']}"
        case["tied"] = False
        case["options"] = "mean"
    return cases


def write_sweep_run(
    results_dir: Path,
    run_id: str,
    *,
    seed: int = 0,
    noise: float = 0.02,
    slowdown: dict[str, float] | None = None,
    memory_growth: dict[str, float] | None = None,
    drop_cases: tuple[str, ...] = (),
    device: str = SYNTHETIC_DEVICE,
) -> Path:
    """Write ``results_dir/run_id`` as a sweep would.

    ``slowdown``/``memory_growth`` multiply one implementation's times/peak memory (1.2 = 20 %
    worse); ``noise`` is the relative run-to-run jitter of the median; ``drop_cases`` leaves cases out.
    Two failed cases are included: liger unsupported (its reason carries a ``<script>`` tag,
    to check escaping) and an out-of-memory torch-eager case.
    """
    slowdown = slowdown or {}
    memory_growth = memory_growth or {}
    rng = random.Random(seed)
    run_dir = Path(results_dir) / run_id
    write_json_atomic(
        run_dir / "meta.json",
        {
            "kind": "sweep",
            "device": device,
            "torch": "2.13.0+cpu",
            "git_commit": SWEEP_COMMIT,
            "host": "test-host",
            "command": "python -m harness sweep --preset synthetic",
            "matmul_tflops": {"float32": 2.0, "bfloat16": 1.0},
            "matmul_routines": {"float32": {"torch.mm": 1.0, "onednn": 2.0}, "bfloat16": {"torch.mm": 1.0}},
        },
    )
    writer = RowWriter(run_dir / "rows.csv")
    for case in synthetic_cases():
        if case["case"] in drop_cases:
            continue
        for impl, (speed, logit_bytes) in IMPLEMENTATIONS.items():
            for mode in MODES:
                base = dict(case, run_id=run_id, implementation=impl, mode=mode, device=device)
                if impl == "liger" and case["dtype"] == "float32" and case["shape"] == "vocab-sweep":
                    writer.append([dict(base, metric="status", status="unsupported", reason=f"softcap {XSS}")])
                    continue
                if impl == "torch-eager" and case["tokens"] == 16384 and mode == "forward_backward":
                    writer.append([dict(base, metric="status", status="oom", reason="CUDA out of memory (synthetic)")])
                    continue
                writer.append(
                    _metric_rows(base, case, speed, logit_bytes, mode, rng, noise,
                                 slowdown.get(impl, 1.0), memory_growth.get(impl, 1.0))
                )
    return run_dir


def _metric_rows(base, case, speed, logit_bytes, mode, rng, noise, slowdown, memory_growth) -> list[dict]:
    n, v, d = case["tokens"], case["vocab"], case["hidden"]
    flops = (2 if mode == "forward" else 6) * n * v * d
    rate = {"float32": 2.0, "bfloat16": 1.0}[case["dtype"]]  # TFLOP/s of the synthetic device
    median = flops / (rate * 1e12 * 0.5 * speed) * 1e3 * slowdown * (1 + rng.uniform(-noise, noise))
    element = DTYPES[case["dtype"]]
    lower_bound = (n * d + v * d) * element
    peak = (lower_bound + n * v * logit_bytes) * memory_growth
    tflops = flops / (median / 1e3) / 1e12
    metrics = {
        "time_median": (median, "ms"),
        "time_p20": (median * 0.96, "ms"),
        "time_p80": (median * 1.04, "ms"),
        "first_call": (median * 3, "ms"),
        "peak_memory": (round(peak), "bytes"),
        "tflops": (tflops, "TFLOP/s"),
        "matmul_fraction": (tflops / rate, "ratio"),
        "memory_over_lower_bound": (peak / lower_bound, "ratio"),
        "memory_over_logits": (peak / (n * v * element), "ratio"),
    }
    return [dict(base, metric=m, value=value, unit=unit, status="ok") for m, (value, unit) in metrics.items()]


def write_check_run(results_dir: Path, run_id: str, *, commit: str = SWEEP_COMMIT, device: str = SYNTHETIC_DEVICE,
                    finished: bool = True, precision: list[dict] | None = None) -> Path:
    """A check run with one failing property (with a reproducer) and a behaviour matrix; by default
    of the synthetic sweep's commit and device, and finished; ``precision``: rows of precision.csv."""
    run_dir = Path(results_dir) / run_id
    meta = {"kind": "check", "device": device, "torch": "2.13.0+cpu", "git_commit": commit, "git_dirty": False,
            "profile": "ci"}
    if finished:
        meta["finished"] = "2026-01-01T13:05:00+00:00"
    write_json_atomic(run_dir / "meta.json", meta)
    if precision is not None:
        columns = tuple(dict.fromkeys(key for row in precision for key in row))
        RowWriter(run_dir / "precision.csv", columns).append(precision)
    properties = RowWriter(run_dir / "properties.csv", PROPERTY_COLUMNS)
    properties.append([
        dict(implementation="torch-eager", property="loss matches reference", status="pass", examples=50),
        dict(implementation="chunked", property="loss matches reference", status="pass", examples=50),
        dict(
            implementation="chunked", property="grad_weight matches reference", status="fail", examples=7,
            detail=f"max abs error 3e-2 {XSS}",
            reproducer="python -m harness check --impl chunked --seed 7 --shape 3x16x50 --dtype bfloat16",
        ),
        dict(implementation="liger", property="softcap", status="unsupported", examples=0,
             detail="softcap is not supported under the Triton interpreter"),
    ])
    behaviour = RowWriter(run_dir / "behaviour.csv", BEHAVIOUR_COLUMNS)
    behaviour.append([
        dict(implementation="torch-eager", edge_case="all labels ignored", behaviour="nan", detail="0/0 mean"),
        dict(implementation="chunked", edge_case="all labels ignored", behaviour="0.0", detail=""),
        dict(implementation="torch-linear-ce", edge_case="retain_graph backward twice", behaviour="raises",
             detail=f"RuntimeError {XSS}"),
    ])
    return run_dir
