"""Run one case through an implementation, or through the float64 reference, and keep what came out.

An ``Outcome`` holds float64 CPU copies of the loss, the separately reported z-loss and the
gradients, so outcomes of different dtypes and devices compare directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from harness.adapter import Implementation
from harness.check.case import GRADIENT_INPUTS, Case, Inputs, make_inputs
from harness.errors import HarnessError
from harness.semantics import reference_loss
from harness.spec import LossOutput


class CheckFailure(AssertionError):
    """A property does not hold; the message says what differs, by how much, and where."""


@dataclass(frozen=True)
class Outcome:
    loss: torch.Tensor
    z_loss: torch.Tensor | None  # None when the implementation does not report it
    grads: dict[str, torch.Tensor | None]  # "hidden", "weight", "bias" -> gradient (None: none arrived)
    loss_dtype: torch.dtype

    def tensors(self) -> dict[str, torch.Tensor | None]:
        """Every compared tensor by name: loss, z_loss, grad_hidden, grad_weight, grad_bias."""
        return {"loss": self.loss, "z_loss": self.z_loss, **{f"grad_{k}": v for k, v in self.grads.items()}}


LossFunction = Callable[[Inputs], LossOutput]


def implementation_loss(impl: Implementation) -> LossFunction:
    return lambda i: impl.loss(i.hidden, i.weight, i.labels, i.spec, bias=i.bias)


def reference_loss_function(i: Inputs) -> LossOutput:
    return reference_loss(i.hidden, i.weight, i.labels, i.spec, i.bias)


def _detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().to("cpu", torch.float64)


def upstream_for(inputs: Inputs, loss: torch.Tensor) -> torch.Tensor:
    """The gradient fed to ``loss.backward``: ones, or the case's per-token upstream gradient."""
    if inputs.upstream is None or loss.dim() == 0:
        return torch.ones_like(loss)
    return inputs.upstream.to(loss.device, loss.dtype)


def evaluate(
    loss_function: LossFunction,
    inputs: Inputs,
    *,
    loss_scale: float = 1.0,
    backward_calls: int = 1,
    grad_enabled: bool = True,
) -> Outcome:
    """Forward (and ``backward_calls`` backwards of ``loss * loss_scale``); float64 CPU copies.

    Raises ``CheckFailure`` when the loss cannot be differentiated although inputs require grad.
    """
    with torch.set_grad_enabled(grad_enabled):
        out = loss_function(inputs)
    loss = out.loss
    wants_grad = grad_enabled and bool(inputs.gradient_inputs) and backward_calls > 0
    if wants_grad:
        if not loss.requires_grad:
            raise CheckFailure("the loss does not require grad although its inputs do: no gradient can flow")
        upstream = upstream_for(inputs, loss)
        for call in range(backward_calls):
            (loss * loss_scale).backward(upstream, retain_graph=call + 1 < backward_calls)
    grads = {name: _detached(getattr(inputs, name).grad) for name in GRADIENT_INPUTS if getattr(inputs, name) is not None}
    return Outcome(_detached(loss), _detached(out.z_loss), grads, loss.dtype)


def run_implementation(impl: Implementation, case: Case, *, device: str = "cpu", **kwargs) -> Outcome:
    """The implementation's outcome on fresh inputs of ``case`` (see ``evaluate`` for the options)."""
    if case.chunk is not None:
        chunked = impl.with_chunk_size(case.chunk)
        if chunked is None:
            raise HarnessError(f"{impl.name} has no chunk size, but the case sets chunk={case.chunk}")
        impl = chunked
    return evaluate(implementation_loss(impl), make_inputs(case, device=device), **kwargs)


def run_reference(case: Case, **kwargs) -> Outcome:
    """The float64 reference on exact copies of the case's inputs (on the CPU)."""
    return evaluate(reference_loss_function, make_inputs(case, reference=True), **kwargs)
