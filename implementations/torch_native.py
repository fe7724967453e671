"""PyTorch eager and ``torch.compile``: materialise the (N, V) logits, upcast, cross-entropy.

This is what Hugging Face transformers and OLMo-core do by default, and the baseline every
speed-up and memory saving in the reports is measured against.
"""

from __future__ import annotations

import shutil

import torch

from harness.adapter import Availability, Capabilities, Implementation
from harness.baseline import TorchEager, eager_loss
from harness.known import KnownLimitation
from harness.spec import OPTIONS

__all__ = ["TorchCompile", "TorchEager", "eager_loss"]

RECOMPILE_LIMIT = 256


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

    def known_issues(self, device):
        return (DONATED_BUFFERS,)

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


DONATED_BUFFERS = KnownLimitation(
    "torch.compile donates the saved buffers of its backward by default: a second backward "
    "(retain_graph=True) raises and names the switch, torch._functorch.config.donated_buffer=False",
    ("autograd/retain-graph",), "RuntimeError", "compiled with non-empty donated buffers", "torch 2.13",
)
