"""torch-eager: the one declaration of the baseline every comparison is made against.

The gate's yardstick (torch-eager's own error on the same inputs) and the sweep's baseline (its
speed-ups and memory savings) are this implementation. It materialises the ``(N, V)`` logits in
the input dtype, upcasts them and runs the definition (``harness.semantics.loss_from_logits``) in
float32, as Hugging Face transformers and OLMo-core do by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.adapter import Capabilities, Implementation
from harness.semantics import apply_norm, loss_from_logits
from harness.spec import OPTIONS, LossOutput, LossSpec

BASELINE = "torch-eager"


def eager_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    spec: LossSpec,
    bias: torch.Tensor | None,
) -> LossOutput:
    # The norm and the matmul run in the input dtype; the softmax in float32, as `logits.float()`
    # in HF models.
    logits = F.linear(apply_norm(hidden, spec), weight, bias).float()
    return loss_from_logits(logits, labels, spec.replace(loss_div_factor=1.0))


class TorchEager(Implementation):
    name = BASELINE
    family = "native"
    summary = "materialised logits upcast to float32, then F.cross_entropy (HF / OLMo-core default)"

    def capabilities(self, device):
        return Capabilities(supported_options=OPTIONS)  # it runs the definition itself

    def compute(self, hidden, weight, labels, spec, bias):
        return eager_loss(hidden, weight, labels, spec, bias)
