"""PyTorch eager and ``torch.compile``: materialise the (N, V) logits, upcast, cross-entropy.

This is what Hugging Face transformers and OLMo-core do by default, and the baseline every
speed-up and memory saving in the reports is measured against.
"""

from __future__ import annotations

import shutil

import torch
import torch.nn.functional as F

from harness.adapter import Availability, Capabilities, Implementation
from harness.semantics import apply_norm, loss_from_logits
from harness.spec import OPTIONS, LossOutput, LossSpec

RECOMPILE_LIMIT = 256


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
    name = "torch-eager"
    family = "native"
    summary = "materialised logits upcast to float32, then F.cross_entropy (HF / OLMo-core default)"

    def capabilities(self, device):
        return Capabilities(supported_options=OPTIONS)  # it runs the definition itself

    def compute(self, hidden, weight, labels, spec, bias):
        return eager_loss(hidden, weight, labels, spec, bias)


class TorchCompile(Implementation):
    name = "torch-compile"
    family = "native"
    summary = "the torch-eager computation under torch.compile (inductor)"

    def __init__(self) -> None:
        # Compiled lazily: creating the wrapper is cheap, the first call pays the compile time.
        self._compiled = None

    def availability(self) -> Availability:
        if not torch.cuda.is_available() and shutil.which("c++") is None and shutil.which("g++") is None:
            return Availability(False, "torch.compile on CPU needs a C++ compiler (c++/g++) on PATH")
        return Availability(True, "inductor (Triton on GPU, C++ on CPU)")

    def capabilities(self, device):
        return Capabilities(supported_options=OPTIONS)  # the definition itself, compiled

    def compute(self, hidden, weight, labels, spec, bias):
        if self._compiled is None:
            self._compiled = torch.compile(eager_loss, dynamic=None)
        # Each spec, dtype, layout and bias/no-bias pair is a guard of its own; past dynamo's
        # default limit of 8 it would silently run eager and be measured as "compiled". Allow more,
        # fail loudly at the limit, and then start from an empty cache: compiled, never eager.
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
            try:
                return self._compiled(hidden, weight, labels, spec, bias)
            except torch._dynamo.exc.FailOnRecompileLimitHit:
                torch._dynamo.reset()
                return self._compiled(hidden, weight, labels, spec, bias)
