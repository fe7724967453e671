"""Apple's Cut Cross-Entropy (``cut-cross-entropy``).

On CUDA, its Triton kernels: ``cce`` (skips gradient blocks below ``filter_eps``, the package
default) and ``cce-exact`` (``filter_eps=None``: no filtering). On a CPU, ``cce`` runs the
package's ``torch_compile`` implementation, because its Triton kernels do not run under Triton's
interpreter.
"""

from __future__ import annotations

import importlib.util
import shutil

import torch

from harness.adapter import ALL_DTYPES, Availability, Capabilities, Implementation
from harness.known import KnownLimitation
from harness.spec import LossOutput
from implementations.torch_native import RECOMPILE_LIMIT

PACKAGE_HINT = "pip install 'lmhead-bench[cce]'"

SUPPORTED = ("ignore_index", "softcap", "loss_div_factor")  # loss_div_factor: applied by the harness
CUDA_DTYPES = (torch.bfloat16, torch.float16)
UNSUPPORTED = {
    "bias": "cut-cross-entropy 25.1 has no bias input",
    "label_smoothing": "cut-cross-entropy 25.1 has no label smoothing",
    "z_loss": "cut-cross-entropy 25.1 has no z-loss",
    "class_weight": "cut-cross-entropy 25.1 has no class weights",
}


class CutCrossEntropy(Implementation):
    family = "triton"

    def __init__(self, name: str = "cce", *, exact: bool = False) -> None:
        self.name = name
        self.exact = exact
        self.summary = (
            "Cut Cross-Entropy, Triton kernel without gradient filtering (filter_eps=None)"
            if exact
            else "Cut Cross-Entropy: Triton 'cce' kernel on CUDA, its 'torch_compile' impl on CPU"
        )

    def availability(self) -> Availability:
        if importlib.util.find_spec("cut_cross_entropy") is None:
            return Availability(False, f"cut-cross-entropy is not installed ({PACKAGE_HINT})")
        if torch.cuda.is_available():
            return Availability(True, "Triton kernel 'cce'" + (" with filter_eps=None" if self.exact else ""))
        if self.exact:
            return Availability(
                False, "the exact Triton kernel needs a CUDA GPU (on CPU, 'cce' runs the torch_compile impl)"
            )
        if shutil.which("c++") is None and shutil.which("g++") is None:
            return Availability(False, "its torch_compile impl on CPU needs a C++ compiler (c++/g++) on PATH")
        return Availability(True, "its 'torch_compile' impl (no GPU here: its Triton kernels need CUDA)")

    def capabilities(self, device):
        # On CUDA its Triton kernels' backward asserts bfloat16 or float16 embeddings (25.1.1:
        # "Backwards requires embeddings to be bf16 or fp16"); its CPU torch_compile impl takes float32.
        dtypes = CUDA_DTYPES if device == "cuda" else ALL_DTYPES
        return Capabilities(dtypes=dtypes, supported_options=SUPPORTED, unsupported_options=dict(UNSUPPORTED))

    def known_issues(self, device):
        return () if self.exact else KNOWN_ISSUES  # the exact kernel runs on CUDA only, where they do not show

    def compute(self, hidden, weight, labels, spec, bias):
        from cut_cross_entropy import linear_cross_entropy

        if hidden.is_cuda:
            kwargs = {"impl": "cce", "filter_eps": None} if self.exact else {"impl": "cce"}
        else:
            kwargs = {"impl": "torch_compile"}
        def call():
            return linear_cross_entropy(hidden, weight, labels.long(), ignore_index=spec.ignore_index,
                                        softcap=spec.softcap, reduction=spec.reduction, **kwargs)

        # Its CPU impl is torch.compile(fullgraph=True): every dtype, layout, softcap value and
        # reduction is a guard of its own, and past dynamo's default limit of 8 recompiles a process
        # fails hard (FailOnRecompileLimitHit), as `check` found after a few dozen cases. Allow
        # more, and at the limit start again from an empty cache.
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            try:
                loss = call()
            except torch._dynamo.exc.FailOnRecompileLimitHit:
                torch._dynamo.reset()
                loss = call()
        return LossOutput(loss, None)


# --- known issues of cut-cross-entropy 25.1.1's CPU path ---
# Its torch_compile impl soft-caps the logits in the input dtype (torch_compile.py: softcapping, then
# .float()): within the gate's budget (0.11 x the allowance on the case that showed it under the old rule;
# CPU machine, 2026-12-07), so no entry.

PACKAGE = "cut-cross-entropy 25.1.1"
KNOWN_ISSUES = (
    KnownLimitation(
        "on a CPU, cut-cross-entropy runs its torch.compile implementation, whose backward donates its saved "
        "buffers: a second backward (retain_graph=True) raises",
        ("autograd/retain-graph",), "RuntimeError", "compiled with non-empty donated buffers", PACKAGE,
        devices=("cpu",),
    ),
)
