"""TransformerEngine's ``parallel_cross_entropy`` (``transformer_engine.pytorch``), GPU only.

``te-parallel-ce``: the loss Megatron-core calls with ``cross_entropy_fusion_impl="te"``, on the
head's logits as ``(1, N, V)`` (it takes ``(B, SQ, V)``; ``implementations.composed`` applies the
logit scale and the softcap in front). Triton kernels that run on CUDA tensors only
(``inp must be a CUDA tensor``), in float32 for bfloat16 and float32 inputs (it refuses float16).
``reduce_loss=True`` is its mean over the tokens not ignored; otherwise it returns per-token losses,
which ``sum`` adds up. A second backward through the same loss raises, as documented.
"""

from __future__ import annotations

import torch

from harness.adapter import Availability, Capabilities, Implementation
from harness.known import KnownLimitation
from harness.spec import LossOutput
from implementations.composed import composed_logits
from implementations.cuda_runtime import gpu_availability

PACKAGE = "transformer-engine 2.20.2"
SUPPORTED = ("bias", "ignore_index", "label_smoothing", "logit_scale", "softcap", "loss_div_factor")
UNSUPPORTED = {
    "z_loss": "parallel_cross_entropy has no z-loss",
    "class_weight": "parallel_cross_entropy takes no class weights",
}


class TransformerEngineCrossEntropy(Implementation):
    name = "te-parallel-ce"
    family = "cuda"
    summary = "TransformerEngine's parallel_cross_entropy (Triton, float32 math) on the head's logits"
    devices = ("cuda",)
    has_logits_path = False

    def availability(self) -> Availability:
        return gpu_availability("TransformerEngine (its CUDA core library) and parallel_cross_entropy's Triton "
                                "kernels", "transformer-engine", "transformer_engine")

    def capabilities(self, device):
        return Capabilities(dtypes=(torch.float32, torch.bfloat16), supported_options=SUPPORTED,
                            unsupported_options=UNSUPPORTED)

    def known_issues(self, device):
        return (REPEATED_BACKWARD,)

    def compute(self, hidden, weight, labels, spec, bias):
        from transformer_engine.pytorch import parallel_cross_entropy

        logits = composed_logits(hidden, weight, bias, spec)
        loss = parallel_cross_entropy(logits[None], labels.long()[None], label_smoothing=spec.label_smoothing,
                                      reduce_loss=spec.reduction == "mean", ignore_idx=spec.ignore_index)
        if spec.reduction == "sum":
            loss = loss.sum()
        elif spec.reduction == "none":
            loss = loss[0]
        return LossOutput(loss, None)


REPEATED_BACKWARD = KnownLimitation(
    "transformer-engine 2.20's parallel_cross_entropy supports one backward per loss (documented: its backward "
    "reuses its saved input buffer); a second one raises",
    ("autograd/retain-graph",), "RuntimeError", "does not support repeated backward passes", PACKAGE,
    devices=("cuda",),
)
