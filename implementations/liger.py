"""Liger-Kernel's fused linear cross-entropy (Triton).

On a machine without a CUDA GPU the harness has turned on Triton's interpreter before Triton was
imported (see ``harness/__init__.py``), so the same kernels run, slowly but exactly, on the CPU.
"""

from __future__ import annotations

import importlib.util
import sys

import torch

from harness.adapter import Availability, Capabilities, Implementation
from harness.spec import LossOutput

PACKAGE_HINT = "pip install 'lmhead-bench[liger]'"

# In liger-kernel 0.8.5 these kernels branches fail under Triton's interpreter with
# InterpreterError: AttributeError("'float' object has no attribute 'to'"). On a GPU they run.
# What LigerFusedLinearCrossEntropyFunction takes (loss_div_factor: applied by the harness).
SUPPORTED = ("bias", "ignore_index", "label_smoothing", "z_loss", "softcap", "loss_div_factor", "class_weight")
INTERPRETER_FAILURES = {
    "class_weight": "liger-kernel's class-weight kernel fails under Triton's interpreter (no GPU here)",
    "softcap": "liger-kernel's softcap kernel fails under Triton's interpreter (no GPU here)",
}


def _interpreter_on() -> bool:
    """True when Triton's interpreter is active (Triton reads the setting once, at import)."""
    if "triton" in sys.modules:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


class Liger(Implementation):
    """``liger``: the function with its defaults, which accumulate the weight and bias gradients
    across token chunks in the input dtype; ``liger-fp32-accum``: ``accum_dtype=torch.float32``,
    the configuration OLMo-core's fused_linear head passes (and the fix for the precision the gate
    finds in bfloat16 and float16)."""

    family = "triton"

    def __init__(self, name: str = "liger", *, accum_dtype: torch.dtype | None = None) -> None:
        self.name = name
        self.accum_dtype = accum_dtype
        self.summary = (
            "Liger-Kernel LigerFusedLinearCrossEntropyFunction (chunked, gradients in the forward)"
            if accum_dtype is None
            else "the same with accum_dtype=torch.float32 (weight/bias gradients accumulated in float32)"
        )

    def availability(self) -> Availability:
        if importlib.util.find_spec("liger_kernel") is None:
            return Availability(False, f"liger-kernel is not installed ({PACKAGE_HINT})")
        if importlib.util.find_spec("triton") is None:
            return Availability(False, "triton is not installed")
        if torch.cuda.is_available():
            return Availability(True, "Triton kernels on CUDA")
        if not _interpreter_on():
            return Availability(
                False,
                "no GPU and Triton was imported before the harness could set TRITON_INTERPRET=1; "
                "import harness first or export TRITON_INTERPRET=1",
            )
        return Availability(True, "through Triton's interpreter (no GPU here; slow but exact)")

    def capabilities(self, device):
        unsupported = dict(INTERPRETER_FAILURES) if device == "cpu" else {}
        return Capabilities(supported_options=SUPPORTED, unsupported_options=unsupported)

    def compute(self, hidden, weight, labels, spec, bias):
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        # Liger's class weights must share the logits' precision for its kernel (float32 here).
        class_weight = None if spec.class_weight is None else spec.class_weight.to(hidden.device, torch.float32)
        loss, z_loss, _, _ = LigerFusedLinearCrossEntropyFunction.apply(
            hidden,
            weight,
            labels.long(),
            bias,
            class_weight,
            spec.ignore_index,
            spec.z_loss_multiplier,
            spec.label_smoothing,
            spec.reduction,
            spec.softcap,
            True,  # return_z_loss: reported separately for logging
            self.accum_dtype,
        )
        return LossOutput(loss, z_loss)
