"""The head in front of a loss that takes logits, as a user composes it.

A logits loss (Liger's ``LigerCrossEntropyLoss``, flash-attn's, TransformerEngine's, quack's) is put
behind the contract by computing the head's logits first, exactly as a model does before calling
it: the projection in the model's dtype, then the options the loss lacks, as Hugging Face's models
apply them: the logit scale (Cohere), then the softcap as Gemma-2 writes it (divide, tanh,
multiply). So the gate judges the composition users run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.spec import LossSpec


def composed_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: LossSpec, *,
                    logit_scale: bool = True) -> torch.Tensor:
    """The head's logits with the logit scale (unless the loss applies it: ``logit_scale=False``)
    and the softcap applied in front."""
    logits = F.linear(hidden, weight, bias)
    if logit_scale and spec.logit_scale != 1.0:
        logits = logits * spec.logit_scale
    if spec.softcap is not None:
        logits = logits / spec.softcap
        logits = torch.tanh(logits)
        logits = logits * spec.softcap
    return logits


def reduce_per_token(per_token: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str):
    """A reduction of per-token losses (0 at ignored tokens), as the losses' own modules reduce:
    the sum, or the sum over the count of tokens not ignored."""
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / (labels != ignore_index).sum()
