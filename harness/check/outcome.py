"""Run one case through an implementation, or through the float64 reference, and keep what came out.

An ``Outcome`` holds float64 CPU copies of the loss, the separately reported z-loss and the
gradients, so outcomes of different dtypes and devices compare directly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from harness.adapter import Implementation
from harness.check.case import GRADIENT_INPUTS, Case, Inputs, make_inputs
from harness.errors import HarnessError
from harness.semantics import apply_softcap, reference_loss
from harness.spec import LossOutput


class CheckFailure(AssertionError):
    """A property does not hold; the message says what differs, by how much, and where."""


@dataclass(frozen=True)
class Outcome:
    loss: torch.Tensor
    z_loss: torch.Tensor | None  # None when the implementation does not report it
    grads: dict[str, torch.Tensor | None]  # "hidden", "weight", "bias" -> gradient (None: none arrived)
    loss_dtype: torch.dtype
    # Reference only: the size of the terms each result is computed from (see
    # ``term_magnitudes``); rounding errors scale with these, not with the result.
    magnitudes: dict[str, torch.Tensor] | None = None

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


def term_magnitudes(inputs: Inputs, *, loss_scale: float = 1.0, backward_calls: int = 1) -> dict[str, torch.Tensor]:
    """The size of the terms each result is computed from, in float64 (the tolerance's scale).

    Rounding errors scale with the terms of a sum, not with its value. A token's cross-entropy
    ``logsumexp(z) - z_label`` is a small difference of terms as large as ``|logsumexp(z)| +
    max|z|``; its z-loss ``m logsumexp(z)^2`` moves by ``2 m |logsumexp(z)|`` per unit of error in
    ``logsumexp(z)``. The logit gradient ``s (c p - c' y - e w / V) + 2 m s' logsumexp(z) p`` is
    a difference too (``p`` close to the one-hot ``y`` for a confident token), of terms as large
    as the same expression with every minus made a plus; the gradients of hidden, weight and bias
    sum it against ``|W|``, ``|H|`` and ones. The softcap's factor (at most 1) is left out.
    """
    spec = inputs.spec
    with torch.no_grad():
        hidden = inputs.hidden.detach().double().reshape(-1, inputs.hidden.shape[-1])
        weight = inputs.weight.detach().double()
        bias = None if inputs.bias is None else inputs.bias.detach().double()
        logits = apply_softcap(F.linear(hidden, weight, bias), spec.softcap)
        probs, lse = logits.softmax(dim=-1), torch.logsumexp(logits, dim=-1)
        vocab = logits.shape[-1]
        labels = inputs.labels.reshape(-1)
        valid = (labels != spec.ignore_index).double()
        safe = torch.where(valid.bool(), labels, 0)
        class_weight = torch.ones(vocab, dtype=torch.float64) if spec.class_weight is None else spec.class_weight.double()
        weight_y = class_weight[safe] * valid
        # d(reduced loss) / d(per-token cross-entropy and z-loss), before loss_div_factor
        if spec.reduction == "mean":
            ce_scale, z_scale = valid / weight_y.sum(), valid / valid.sum()
        else:
            ce_scale = z_scale = valid

        eps, z_mult = spec.label_smoothing, spec.z_loss_multiplier
        size = lse.abs() + logits.abs().amax(dim=-1)
        per_token_ce, per_token_z = size * weight_y, 2 * z_mult * lse.abs() * size * valid
        if spec.reduction == "none":
            ce, z = per_token_ce.reshape(inputs.labels.shape), per_token_z.reshape(inputs.labels.shape)
        else:
            ce, z = (per_token_ce * ce_scale).sum(), (per_token_z * z_scale).sum()
        terms = {"loss": (ce + z) / spec.loss_div_factor, "z_loss": z / spec.loss_div_factor}

        # the gradients: times the upstream gradient of every backward
        upstream = valid if inputs.upstream is None else inputs.upstream.reshape(-1).abs().double()
        if spec.reduction == "none":
            ce_scale = z_scale = upstream * valid
        factor = abs(loss_scale) * backward_calls / spec.loss_div_factor
        ce_scale, z_scale = ce_scale * factor, z_scale * factor
        one_hot = F.one_hot(safe, vocab).double()
        mix = (1 - eps) * weight_y + eps / vocab * class_weight.sum() * valid
        logit_grad = (
            ce_scale[:, None] * (probs * mix[:, None] + one_hot * ((1 - eps) * weight_y)[:, None]
                                 + eps / vocab * class_weight[None, :] * valid[:, None])
            + (z_scale * 2 * z_mult * lse.abs())[:, None] * probs
        )
        grad_hidden = logit_grad @ weight.abs()
        terms["grad_hidden"] = grad_hidden.reshape(inputs.hidden.shape)
        terms["grad_weight"] = logit_grad.t() @ hidden.abs()
        terms["grad_bias"] = logit_grad.sum(dim=0)
        if inputs.model is not None:  # tied: the embedding path adds to the weight's gradient
            layer = inputs.model.layer.weight.detach().double().abs()
            embedding_rows = grad_hidden @ layer
            terms["grad_weight"] = terms["grad_weight"].index_add(0, inputs.token_ids.reshape(-1), embedding_rows)
        return terms


def run_reference(case: Case, **kwargs) -> Outcome:
    """The float64 reference on exact copies of the case's inputs (on the CPU)."""
    inputs = make_inputs(case, reference=True)
    outcome = evaluate(reference_loss_function, inputs, **kwargs)
    sizes = {k: v for k, v in kwargs.items() if k in ("loss_scale", "backward_calls")}
    return dataclasses.replace(outcome, magnitudes=term_magnitudes(inputs, **sizes))
