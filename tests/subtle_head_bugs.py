"""Subtle bugs of a whole head, one per plugin: the norm, the per-class scale, the generation path.

``correct_head`` is a head written the way model code writes one: a norm of the hidden states
(LayerNorm or RMSNorm, statistics in float32), the projection, the per-class scale, the softcap,
then PyTorch's cross-entropy on float32 logits. Each other plugin is that head with one bug of a
kind model authors really make; each passes a quick test at the defaults and shows only where the
head's options are reached. ``python -m harness check --impl tests.subtle_head_bugs:NAME`` must
reject every one (``tests/test_subtle_bugs.py``) and pass ``correct_head``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.adapter import Capabilities, Implementation
from harness.semantics import keep_positions, loss_from_logits, transform_logits
from harness.spec import LossSpec

SUPPORTED = ("norm", "bias", "class_scale", "ignore_index", "label_smoothing", "z_loss", "softcap", "loss_div_factor")

BUGS = {
    "layernorm_unbiased_variance": "the LayerNorm divides by D - 1 (torch.var's default), not D",
    "rmsnorm_eps_outside_the_root": "RMSNorm divides by sqrt(mean(x^2)) + eps, not sqrt(mean(x^2) + eps)",
    "norm_bias_frozen": "the norm's bias is applied but detached: it never gets a gradient",
    "class_scale_after_softcap": "the per-class scale multiplies the capped logits instead of the raw ones",
    "norm_statistics_in_input_dtype": "the norm's mean and variance are computed in bfloat16/float16",
    "kept_positions_sorted": "logits_to_keep positions are sorted first, so the logits come out in another order",
}


class Head(Implementation):
    family = "plugin"

    def __init__(self, bug: str = "") -> None:
        self.bug = bug
        self.name = f"tests.subtle_head_bugs:{bug or 'correct_head'}"
        self.summary = BUGS.get(bug, "a correct head: norm, projection, per-class scale, softcap, cross-entropy")

    def capabilities(self, device: str) -> Capabilities:
        return Capabilities(supported_options=SUPPORTED)

    def _norm(self, hidden: torch.Tensor, spec: LossSpec) -> torch.Tensor:
        if spec.norm is None:
            return hidden
        stats = hidden if self.bug == "norm_statistics_in_input_dtype" else hidden.float()
        if spec.norm == "layernorm":
            mean = stats.mean(-1, keepdim=True)
            variance = stats.var(-1, keepdim=True, unbiased=self.bug == "layernorm_unbiased_variance")
            normalized = (stats - mean) * torch.rsqrt(variance + spec.norm_eps)
        elif self.bug == "rmsnorm_eps_outside_the_root":
            normalized = stats / (stats.square().mean(-1, keepdim=True).sqrt() + spec.norm_eps)
        else:
            normalized = stats * torch.rsqrt(stats.square().mean(-1, keepdim=True) + spec.norm_eps)
        out = normalized.to(hidden.dtype) * spec.norm_weight
        if spec.norm_bias is not None:
            out = out + (spec.norm_bias.detach() if self.bug == "norm_bias_frozen" else spec.norm_bias)
        return out

    def _logits(self, hidden, weight, bias, spec):
        logits = F.linear(self._norm(hidden, spec), weight, bias).float()
        if self.bug == "class_scale_after_softcap" and spec.class_scale is not None:
            capped = transform_logits(logits, spec.replace(class_scale=None))
            return capped * spec.class_scale.float(), spec.replace(class_scale=None, logit_scale=1.0, softcap=None)
        return logits, spec

    def compute(self, hidden, weight, labels, spec, bias):
        logits, spec = self._logits(hidden, weight, bias, spec)
        return loss_from_logits(logits, labels, spec.replace(loss_div_factor=1.0))

    def logits(self, hidden, weight, *, bias=None, spec=None, logits_to_keep=0):
        spec = spec or LossSpec()
        if self.bug == "kept_positions_sorted" and isinstance(logits_to_keep, torch.Tensor):
            logits_to_keep = logits_to_keep.sort(-1).values
        logits, spec = self._logits(keep_positions(hidden, logits_to_keep), weight, bias, spec)
        return transform_logits(logits, spec).to(hidden.dtype)


correct_head = Head()
layernorm_unbiased_variance = Head("layernorm_unbiased_variance")
rmsnorm_eps_outside_the_root = Head("rmsnorm_eps_outside_the_root")
norm_bias_frozen = Head("norm_bias_frozen")
class_scale_after_softcap = Head("class_scale_after_softcap")
norm_statistics_in_input_dtype = Head("norm_statistics_in_input_dtype")
kept_positions_sorted = Head("kept_positions_sorted")
