"""PyTorch's own ``F.linear_cross_entropy`` with its chunked ``LinearCrossEntropyOptions`` path.

Present from torch 2.13. The chunked path computes the gradients during the forward, one batch
chunk at a time, so it never holds the whole (N, V) logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.adapter import Availability, Capabilities, Implementation
from harness.spec import LossOutput

SUPPORTED = ("bias", "ignore_index", "loss_div_factor", "class_weight")  # loss_div_factor: by the harness
# Options the chunked path lacks. Label smoothing is accepted by the function, but it silently
# leaves the chunked path for the unchunked reference path, which would misreport its memory.
UNSUPPORTED = {
    "label_smoothing": "PyTorch's chunked path falls back to the unchunked path with label smoothing",
    "z_loss": "F.linear_cross_entropy has no z-loss",
    "softcap": "F.linear_cross_entropy has no logit softcap",
}


class TorchLinearCrossEntropy(Implementation):
    name = "torch-linear-ce"
    family = "native"
    summary = "torch.nn.functional.linear_cross_entropy with chunked LinearCrossEntropyOptions"

    def __init__(self, batch_chunk_size: int | None = None) -> None:
        self.batch_chunk_size = batch_chunk_size

    def availability(self) -> Availability:
        if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            return Availability(
                False, f"needs torch >= 2.13 for F.linear_cross_entropy (this is torch {torch.__version__})"
            )
        return Availability(True, "chunked LinearCrossEntropyOptions path")

    def capabilities(self, device):
        return Capabilities(supported_options=SUPPORTED, unsupported_options=dict(UNSUPPORTED))

    def with_chunk_size(self, chunk_size):
        return TorchLinearCrossEntropy(batch_chunk_size=chunk_size)

    def _options(self):
        if self.batch_chunk_size is None:
            return torch.nn.LinearCrossEntropyOptions()
        return torch.nn.LinearCrossEntropyOptions(chunking_method=None, batch_chunk_size=self.batch_chunk_size)

    def compute(self, hidden, weight, labels, spec, bias):
        loss = F.linear_cross_entropy(
            hidden,
            weight,
            labels.long(),
            linear_bias=bias,
            weight=spec.class_weight,
            reduction=spec.reduction,
            ignore_index=spec.ignore_index,
            options=self._options(),
        )
        return LossOutput(loss, None)
