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
from harness.errors import UnsupportedCase

# What the interpreter does differently from a GPU, which the Triton peers' known issues cite.
TRUNCATION = (
    "Triton 3.9's interpreter casts float32 to bfloat16 by truncation (runtime/interpreter.py: cast_impl "
    "passes no rounding mode to _convert_float), where a GPU rounds to nearest even: on a CPU every bfloat16 "
    "value a Triton kernel stores is rounded toward zero, all in the same direction"
)


# The interpreter runs a kernel's programs one after another in Python. Liger-Kernel's and fla-core's
# losses, a program per token, took 32 and 48 ms a token on the CPU machine (N = 2048, D = 8, V = 17,
# fused linear cross-entropy forward and backward, load about 5, 2026-12-07): the gate's 65 600-token
# case would take over half an hour. Cases of more tokens are refused there; a GPU runs them.
INTERPRETED_TOKENS_MAX = 4096


def refuse_too_many_tokens_to_interpret(labels: torch.Tensor) -> None:
    """Raise ``UnsupportedCase`` where Triton's interpreter would run more than
    ``INTERPRETED_TOKENS_MAX`` tokens (a program each): hours of a CPU for one case."""
    if interpreter_on() and labels.numel() > INTERPRETED_TOKENS_MAX:
        raise UnsupportedCase(
            f"{labels.numel()} tokens through Triton's interpreter (no GPU here), a program each: more than "
            f"{INTERPRETED_TOKENS_MAX} would take most of an hour on a CPU; a GPU runs such cases"
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
