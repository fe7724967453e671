"""Unsloth's fused linear cross-entropy (``unsloth_zoo.fused_losses``), GPU only.

``unsloth-fused-ce``: ``unsloth_fused_ce_loss``, the loss Unsloth's patched models call with the
head's weight and bias instead of the logits: chunked, the float32 cross-entropy of each chunk of
logits, with the logit scale and softcap of the model applied inside
(``logit_scale_multiply``, ``logit_softcapping``). ``unsloth_zoo`` refuses to import unless
``unsloth`` has been imported first, as a user's script does.

Conventions bridged: the harness's labels are already aligned with their positions
(``shift_labels=False``); Unsloth returns the mean over the tokens not ignored, or, given
``n_items``, their sum divided by it (gradient accumulation, like HF's ``num_items_in_batch``):
``sum`` passes ``n_items = loss_div_factor``, ``mean`` with a factor passes the count of tokens
not ignored times the factor. No per-token losses (``none``).
"""

from __future__ import annotations

import torch

from harness.adapter import ALL_DTYPES, Availability, Capabilities, Implementation
from harness.spec import LossOutput
from implementations.cuda_runtime import gpu_availability

PACKAGE = "unsloth_zoo 2026.10.9"
SUPPORTED = ("bias", "ignore_index", "label_smoothing", "logit_scale", "softcap", "loss_div_factor")
UNSUPPORTED = {
    "z_loss": "unsloth_fused_ce_loss has no z-loss",
    "class_weight": "unsloth_fused_ce_loss takes no class weights",
}


def n_items(labels: torch.Tensor, reduction: str, ignore_index: int, loss_div_factor: float):
    """Unsloth's ``n_items`` for a reduction (None: its own mean over the tokens not ignored)."""
    if reduction == "sum":
        return torch.tensor(loss_div_factor, device=labels.device)
    if loss_div_factor == 1.0:
        return None
    return (labels != ignore_index).sum() * loss_div_factor


def option_keywords(spec) -> dict:
    """The keyword arguments of the options in use, named as Unsloth's patched models pass them."""
    keywords = {"ignore_index": spec.ignore_index}
    if spec.label_smoothing:
        keywords["label_smoothing"] = spec.label_smoothing
    if spec.logit_scale != 1.0:
        keywords["logit_scale_multiply"] = spec.logit_scale
    if spec.softcap is not None:
        keywords["logit_softcapping"] = spec.softcap
    return keywords


class UnslothFusedCE(Implementation):
    name = "unsloth-fused-ce"
    family = "cuda"
    summary = "Unsloth's unsloth_fused_ce_loss (chunked fused linear cross-entropy, float32 logits)"
    devices = ("cuda",)
    has_logits_path = False
    applies_loss_div_factor = True  # through n_items

    def availability(self) -> Availability:
        available = gpu_availability("Unsloth's fused cross-entropy (torch.compile'd for CUDA)", "unsloth_zoo",
                                     "unsloth_zoo")
        if available.available and not _imports_unsloth():
            return Availability(False, "unsloth_zoo needs unsloth installed and imported first (pip install unsloth)")
        return available

    def capabilities(self, device):
        return Capabilities(dtypes=ALL_DTYPES, reductions=("mean", "sum"), supported_options=SUPPORTED,
                            unsupported_options=UNSUPPORTED)

    def compute(self, hidden, weight, labels, spec, bias):
        import unsloth  # noqa: F401  (unsloth_zoo refuses to import before it)
        from unsloth_zoo.fused_losses.cross_entropy_loss import unsloth_fused_ce_loss

        loss = unsloth_fused_ce_loss(
            None, hidden, weight, bias, labels.long(),
            n_items=n_items(labels, spec.reduction, spec.ignore_index, spec.loss_div_factor),
            shift_labels=False, **option_keywords(spec),
        )
        return LossOutput(loss, None)


def _imports_unsloth() -> bool:
    import importlib.util

    return importlib.util.find_spec("unsloth") is not None
