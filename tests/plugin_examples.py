"""Third-party implementations as a user would write them, loaded by name as ``module:attr``."""

import functools

import torch
import torch.nn.functional as F

from harness.adapter import Capabilities, Implementation
from harness.spec import LossOutput


def flat_tokens(function):
    """A plugin written for ``(N, D)`` inputs, as many are: ``(B, T, D)`` ones are flattened first, and
    a per-token loss gets the labels' shape back (the gate passes inputs as given and checks it)."""

    @functools.wraps(function)
    def plugin(hidden, weight, labels, **options):
        loss = function(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), **options)
        return loss.view(labels.shape) if options.get("reduction", "mean") == "none" else loss

    return plugin


@flat_tokens
def plain_eager(
    hidden,
    weight,
    labels,
    *,
    bias=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss_multiplier=0.0,
    softcap=None,
    class_weight=None,
):
    """Materialised logits and F.cross_entropy; no z-loss and no softcap."""
    if z_loss_multiplier:
        raise NotImplementedError("z-loss is not implemented")
    if softcap is not None:
        raise NotImplementedError("softcap is not implemented")
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(
        logits, labels, weight=class_weight, ignore_index=ignore_index,
        reduction=reduction, label_smoothing=label_smoothing,
    )


class SumOnlyAdapter(Implementation):
    """An adapter of the project's own kind that only supports reduction="sum"."""

    name = "sum-only"
    family = "plugin"
    summary = "example plugin adapter supporting only reduction=sum"

    def capabilities(self, device):
        ignored = "this example passes only bias and ignore_index to F.cross_entropy"
        return Capabilities(
            dtypes=(torch.float32,),
            reductions=("sum",),
            unsupported_options={o: ignored for o in ("label_smoothing", "z_loss", "softcap", "class_weight")},
        )

    def compute(self, hidden, weight, labels, spec, bias):
        logits = F.linear(hidden, weight, bias).float()
        return LossOutput(F.cross_entropy(logits, labels, ignore_index=spec.ignore_index, reduction="sum"))


sum_only = SumOnlyAdapter()
not_callable = 42


class ImpersonatesLiger(Implementation):
    """A plugin that takes a built-in's name (and would inherit its known failures): refused."""

    name = "liger"
    family = "plugin"

    def compute(self, hidden, weight, labels, spec, bias):
        logits = F.linear(hidden, weight, bias).float()
        return LossOutput(F.cross_entropy(logits, labels, ignore_index=spec.ignore_index, reduction=spec.reduction))


impersonates_liger = ImpersonatesLiger()


@flat_tokens
def written_before_softcap(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean"):
    """A plugin that knows bias, ignore_index and reductions only: every other option is unsupported."""
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), labels, ignore_index=ignore_index,
                           reduction=reduction)


@flat_tokens
def scale_after_softcap(hidden, weight, labels, *, bias=None, softcap=None, logit_scale=1.0, reduction="mean"):
    """A plugin that takes logit_scale but applies it after the softcap instead of before it."""
    logits = F.linear(hidden, weight, bias).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits * logit_scale, labels, reduction=reduction)
