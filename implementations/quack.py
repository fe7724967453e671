"""quack's cross-entropy kernels (``quack-kernels``, CuTe DSL), GPU only (compute capability 9.0+).

- ``quack-ce``: ``quack.cross_entropy.cross_entropy`` on the head's logits
  (``implementations.composed`` applies the logit scale and the softcap in front), with class
  weights; its kernels load 16 bytes of logits at a time, so V must be a multiple of
  16 / (bytes per element) (its backward asserts it); other cases are refused;
- ``quack-linear-ce``: ``quack.linear_cross_entropy.chunked_linear_cross_entropy``, the head and
  the loss fused in token chunks (4096 rows, its default), gradients computed in the forward,
  the weight's accumulated in float32. Its GEMMs use TMA, which needs N, D and V multiples of 8
  (it asserts N % 8; its own ``LinearCrossEntropy`` module falls back to the unfused path
  otherwise, and so without a bias): other cases are refused.
"""

from __future__ import annotations

import torch

from harness.adapter import ALL_DTYPES, Availability, Capabilities, Implementation
from harness.errors import UnsupportedCase
from harness.spec import LossOutput
from implementations.composed import composed_logits
from implementations.cuda_runtime import gpu_availability

PACKAGE = "quack-kernels 0.6.5"
SM90 = (9, 0)
KERNELS = "quack's CuTe DSL kernels"
CE_SUPPORTED = ("bias", "ignore_index", "logit_scale", "softcap", "loss_div_factor", "class_weight")
CE_UNSUPPORTED = {
    "label_smoothing": "quack's cross_entropy has no label smoothing",
    "z_loss": "quack's cross_entropy has no z-loss",
}
LINEAR_SUPPORTED = ("ignore_index", "loss_div_factor")
LINEAR_UNSUPPORTED = {
    "bias": "chunked_linear_cross_entropy has no bias",
    "label_smoothing": "chunked_linear_cross_entropy has no label smoothing",
    "z_loss": "chunked_linear_cross_entropy has no z-loss",
    "softcap": "chunked_linear_cross_entropy has no softcap",
    "logit_scale": "chunked_linear_cross_entropy has no logit scale",
    "class_weight": "chunked_linear_cross_entropy takes no class weights",
}


def quack_availability() -> Availability:
    return gpu_availability(KERNELS, "quack-kernels", "quack", min_capability=SM90)


class QuackCrossEntropy(Implementation):
    name = "quack-ce"
    family = "cuda"
    summary = "quack's CuTe DSL cross_entropy on the head's logits (logit scale, softcap composed in front)"
    devices = ("cuda",)
    has_logits_path = False

    def availability(self) -> Availability:
        return quack_availability()

    def capabilities(self, device):
        return Capabilities(dtypes=ALL_DTYPES, supported_options=CE_SUPPORTED, unsupported_options=CE_UNSUPPORTED)

    def compute(self, hidden, weight, labels, spec, bias):
        vector = 16 // hidden.element_size()
        if weight.shape[0] % vector:
            raise UnsupportedCase(f"quack's cross_entropy loads {vector} logits of this dtype at a time: V = "
                                  f"{weight.shape[0]} is not a multiple of {vector} (its backward asserts it)")
        from quack.cross_entropy import cross_entropy

        class_weight = None if spec.class_weight is None else spec.class_weight.to(hidden.device, torch.float32)
        loss = cross_entropy(composed_logits(hidden, weight, bias, spec), labels.long(), weight=class_weight,
                             ignore_index=spec.ignore_index, reduction=spec.reduction)
        return LossOutput(loss, None)


class QuackLinearCrossEntropy(Implementation):
    name = "quack-linear-ce"
    family = "cuda"
    summary = "quack's chunked_linear_cross_entropy (CuTe DSL GEMMs and cross-entropy, gradients in the forward)"
    devices = ("cuda",)
    has_logits_path = False

    def availability(self) -> Availability:
        return quack_availability()

    def capabilities(self, device):
        return Capabilities(dtypes=(torch.bfloat16, torch.float16), reductions=("mean", "sum"),
                            supported_options=LINEAR_SUPPORTED, unsupported_options=LINEAR_UNSUPPORTED)

    def compute(self, hidden, weight, labels, spec, bias):
        sizes = {"N": hidden.shape[0], "D": hidden.shape[1], "V": weight.shape[0]}
        unaligned = [f"{k} = {v}" for k, v in sizes.items() if v % 8]
        if unaligned:
            raise UnsupportedCase(f"quack's chunked_linear_cross_entropy needs N, D and V multiples of 8 (TMA); "
                                  f"{', '.join(unaligned)}")
        from quack.linear_cross_entropy import chunked_linear_cross_entropy

        loss = chunked_linear_cross_entropy(hidden, weight, labels.long(), ignore_index=spec.ignore_index,
                                            reduction=spec.reduction)
        return LossOutput(loss, None)
