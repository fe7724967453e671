"""Where a Triton kernel runs here: on a CUDA GPU, or on the CPU through Triton's interpreter.

On a machine without a CUDA GPU the harness turns on Triton's interpreter before Triton is
imported (``harness/__init__.py``), so Triton peers (Liger-Kernel, fla-core) run their own
kernels on the CPU, slowly but with the same arithmetic, except where the interpreter lacks an
operation (each adapter declares those).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

from harness.adapter import Availability

# What the interpreter does differently from a GPU, which the Triton peers' known issues cite.
TRUNCATION = (
    "Triton 3.9's interpreter casts float32 to bfloat16 by truncation (runtime/interpreter.py: cast_impl "
    "passes no rounding mode to _convert_float), where a GPU rounds to nearest even: on a CPU every bfloat16 "
    "value a Triton kernel stores is rounded toward zero, all in the same direction"
)


def interpreter_on() -> bool:
    """True when Triton's interpreter is active (Triton reads the setting once, at import)."""
    if "triton" in sys.modules:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_availability() -> Availability:
    """Whether Triton kernels can run here, and how (the package itself is the caller's to check)."""
    if importlib.util.find_spec("triton") is None:
        return Availability(False, "triton is not installed")
    if torch.cuda.is_available():
        return Availability(True, "Triton kernels on CUDA")
    if not interpreter_on():
        return Availability(
            False,
            "no GPU and Triton was imported before the harness could set TRITON_INTERPRET=1; "
            "import harness first or export TRITON_INTERPRET=1",
        )
    return Availability(True, "through Triton's interpreter (no GPU here; slow but exact)")
