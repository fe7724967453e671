"""flash-attn's Triton cross-entropy (``flash_attn.ops.triton.cross_entropy``), GPU only.

``flash-attn-ce``: ``cross_entropy_loss`` on the head's logits (``implementations.composed``), its
per-token losses reduced as its ``flash_attn.losses.cross_entropy.CrossEntropyLoss`` module reduces
them (the sum, or the sum over the tokens not ignored). Its own options: label smoothing, the
logit scale, the z-loss (``lse_square_scale``, also returned per token for logging). It has no
softcap: that is composed in front, with the logit scale before it when both are on (the
harness's order). The package imports its CUDA extension (``flash_attn_2_cuda``) on import, and
the kernel's wrapper asserts CUDA tensors, so it needs a GPU even though the kernel is Triton.
"""

from __future__ import annotations

from harness.adapter import ALL_DTYPES, Availability, Capabilities, Implementation
from harness.spec import LossOutput
from implementations.composed import composed_logits, reduce_per_token
from implementations.cuda_runtime import gpu_availability

PACKAGE = "flash-attn 2.8.3.post2"
SUPPORTED = ("bias", "ignore_index", "label_smoothing", "z_loss", "logit_scale", "softcap", "loss_div_factor")
UNSUPPORTED = {"class_weight": "flash-attn's cross_entropy_loss takes no class weights"}


class FlashAttnCrossEntropy(Implementation):
    name = "flash-attn-ce"
    family = "cuda"
    summary = "flash-attn's Triton cross_entropy_loss on the head's logits (softcap composed in front)"
    devices = ("cuda",)
    has_logits_path = False

    def availability(self) -> Availability:
        return gpu_availability("flash-attn's package (its CUDA extension flash_attn_2_cuda) and its "
                                "CUDA-only cross-entropy wrapper", "flash-attn", "flash_attn")

    def capabilities(self, device):
        return Capabilities(dtypes=ALL_DTYPES, supported_options=SUPPORTED, unsupported_options=UNSUPPORTED)

    def compute(self, hidden, weight, labels, spec, bias):
        from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

        native_scale = spec.softcap is None  # its logit scale applies inside, so after a composed softcap
        logits = composed_logits(hidden, weight, bias, spec, logit_scale=not native_scale)
        losses, z_losses = cross_entropy_loss(
            logits, labels.long(), label_smoothing=spec.label_smoothing,
            logit_scale=spec.logit_scale if native_scale else 1.0, lse_square_scale=spec.z_loss_multiplier,
            ignore_index=spec.ignore_index,
        )
        reduce = lambda t: reduce_per_token(t, labels, spec.ignore_index, spec.reduction)  # noqa: E731
        return LossOutput(reduce(losses), reduce(z_losses))
