"""A tiny language model to call LM heads in their real setting: tied or untied to the embedding.

embedding (V, D) -> one small layer -> LM head (V, D). "Tied" means the head's weight *is* the
embedding's parameter, as GPT-2's ``lm_head`` is tied to ``wte``: its gradient is the sum of the
embedding path's and the head path's.
"""

from __future__ import annotations

import torch
from torch import nn

from harness.adapter import Implementation
from harness.spec import LossOutput, LossSpec


class TinyLM(nn.Module):
    def __init__(
        self,
        vocab: int,
        dim: int,
        *,
        tied: bool,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.tied = tied
        self.embedding = nn.Embedding(vocab, dim, dtype=dtype)
        self.layer = nn.Linear(dim, dim, dtype=dtype)
        with torch.no_grad():
            self.embedding.weight.copy_(torch.randn(vocab, dim, generator=generator) * dim**-0.5)
            self.layer.weight.copy_(torch.randn(dim, dim, generator=generator) * dim**-0.5)
            self.layer.bias.zero_()
        self.head_weight = self.embedding.weight if tied else nn.Parameter(
            torch.randn(vocab, dim, generator=generator).to(dtype) * dim**-0.5
        )
        self.head_bias = nn.Parameter(torch.zeros(vocab, dtype=dtype)) if bias else None

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.layer(self.embedding(tokens)))

    def loss(
        self, implementation: Implementation, tokens: torch.Tensor, labels: torch.Tensor, spec: LossSpec = LossSpec()
    ) -> LossOutput:
        return implementation.loss(self.hidden_states(tokens), self.head_weight, labels, spec, bias=self.head_bias)
