"""The single definition of the LM-head loss, and the float64 reference built on it.

``loss_from_logits`` is the function every implementation is measured against. The reference
(``reference_loss`` / ``reference_result``) runs it in float64 on the CPU with autograd; the
``torch-eager`` implementation runs the same code on float32-upcast logits, as Hugging Face and
OLMo-core do by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from harness.errors import HarnessError
from harness.spec import LossOutput, LossSpec, underflow, unit_roundoff


def apply_softcap(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma-2 style logit soft-capping: ``cap * tanh(logits / cap)``."""
    if softcap is None:
        return logits
    return softcap * torch.tanh(logits / softcap)


def apply_norm(hidden: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """The head's norm of its ``(..., D)`` input (none, LayerNorm or RMSNorm) with its weight and bias,
    PyTorch's own functions (float32 statistics for low-precision inputs)."""
    if spec.norm is None:
        return hidden
    weight = None if spec.norm_weight is None else spec.norm_weight.to(hidden.dtype)
    if spec.norm == "layernorm":
        bias = None if spec.norm_bias is None else spec.norm_bias.to(hidden.dtype)
        return F.layer_norm(hidden, hidden.shape[-1:], weight, bias, spec.norm_eps)
    return F.rms_norm(hidden, hidden.shape[-1:], weight, spec.norm_eps)


def transform_logits(raw: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """What the head's options do to its raw logits ``norm(hidden) @ weight.T + bias``: the
    per-class scale (nGPT), the logit scale (Cohere, Granite), then the softcap."""
    if spec.class_scale is not None:
        raw = raw * spec.class_scale.to(raw.dtype)
    if spec.logit_scale != 1.0:
        raw = raw * spec.logit_scale
    return apply_softcap(raw, spec.softcap)


def loss_from_logits(logits: torch.Tensor, labels: torch.Tensor, spec: LossSpec) -> LossOutput:
    """Loss of ``(N, V)`` raw logits (norm and bias included) against ``(N,)`` labels under ``spec``,
    in the logits' dtype."""
    logits = transform_logits(logits, spec)
    labels = labels.long()
    class_weight = None if spec.class_weight is None else spec.class_weight.to(logits)
    ce = F.cross_entropy(
        logits,
        labels,
        weight=class_weight,
        ignore_index=spec.ignore_index,
        reduction=spec.reduction,
        label_smoothing=spec.label_smoothing,
    )
    valid = labels != spec.ignore_index
    if spec.z_loss_multiplier:
        z_per_token = spec.z_loss_multiplier * torch.logsumexp(logits, dim=-1).square() * valid
    else:  # no logsumexp: it is another N x V pass and buffer, which torch-eager's figures would carry
        z_per_token = logits.new_zeros(logits.shape[:-1])
    if spec.reduction == "none":
        z_loss = z_per_token
    elif spec.reduction == "sum":
        z_loss = z_per_token.sum()
    else:  # z-loss is never class-weighted: its mean is over the tokens not ignored
        z_loss = z_per_token.sum() / valid.sum()
    loss = ce + z_loss if spec.z_loss_multiplier else ce
    return LossOutput(loss=loss / spec.loss_div_factor, z_loss=z_loss / spec.loss_div_factor)


def head_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    spec: LossSpec | None = None,
    *,
    logits_to_keep: int | torch.Tensor = 0,
) -> torch.Tensor:
    """The inference path: logits of the positions ``logits_to_keep`` names, under the head's options
    in ``spec`` (its loss options play no part).

    Positions are the sequence axis: ``T`` for ``(B, T, D)`` input, ``N`` for ``(N, D)``. An int keeps
    the last ``logits_to_keep`` (all when 0); a tensor lists the positions to keep, ``(K,)`` or, for
    ``(B, T, D)`` input, ``(B, K)`` (OLMo-core's convention).
    """
    spec = spec or LossSpec()
    hidden = keep_positions(hidden, logits_to_keep)
    return transform_logits(F.linear(apply_norm(hidden, spec), weight, bias), spec)


def keep_positions(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The hidden states at the positions ``logits_to_keep`` names (see ``head_logits``)."""
    if isinstance(logits_to_keep, torch.Tensor):
        if logits_to_keep.dim() == 1:
            return hidden.index_select(-2, logits_to_keep)
        if hidden.dim() != 3 or logits_to_keep.dim() != 2 or logits_to_keep.shape[0] != hidden.shape[0]:
            # gather would take a (1, K) index for (B, T, D) hidden states as the first sequence's only
            raise HarnessError(f"logits_to_keep positions of shape {tuple(logits_to_keep.shape)} for hidden states "
                               f"{tuple(hidden.shape)}: expected (K,) or, for (B, T, D), (B, K)")
        index = logits_to_keep.unsqueeze(-1).expand(*logits_to_keep.shape, hidden.shape[-1])
        return hidden.gather(-2, index)
    return hidden[..., -logits_to_keep:, :] if logits_to_keep else hidden


# --- the size of the logits' terms (the tolerance's scale) ----------------------------------------


@dataclass(frozen=True)
class NormTerms:
    """A norm's float64 output, the size of the terms it is computed from in ``dtype``, and what its
    backward needs: the normalized input ``x_hat`` and ``1 / sigma`` per token."""

    output: torch.Tensor
    size: torch.Tensor
    normalized: torch.Tensor
    inverse_scale: torch.Tensor


def norm_with_terms(hidden: torch.Tensor, spec: LossSpec, hidden_terms: torch.Tensor) -> NormTerms:
    """The float64 norm of ``hidden`` and its terms.

    ``y = x_hat g + b`` with ``x_hat = (x - mean) / sigma`` (RMSNorm: ``x / rms``): an error of a
    roundoff in ``x``'s terms is ``|x terms| / sigma`` in ``x_hat``, and the output is rounded
    once more: its terms are ``|g| (|x_hat| + |x terms| / sigma) + |b|``.
    """
    centred = hidden - hidden.mean(-1, keepdim=True) if spec.norm == "layernorm" else hidden
    inverse_scale = torch.rsqrt(centred.square().mean(-1, keepdim=True) + spec.norm_eps)
    normalized = centred * inverse_scale
    gain = 1.0 if spec.norm_weight is None else spec.norm_weight.double()
    shift = 0.0 if spec.norm_bias is None else spec.norm_bias.double()
    output = normalized * gain + shift
    size = abs(gain) * (normalized.abs() + hidden_terms * inverse_scale) + abs(shift)
    return NormTerms(output, size, normalized, inverse_scale)


@dataclass(frozen=True)
class LogitTerms:
    """Float64 logits and, per element, the size of the terms they are computed from in ``dtype``.

    ``chain`` is d(logits)/d(raw logits), None where it is 1, and ``chain_terms`` the size of its
    own terms (a derivative evaluated from rounded values is off by roundoffs of those terms).
    ``class_scale_terms``: with a class scale, the terms of d(logits)/d(class scale) (the raw
    logits' through the options after it).
    """

    logits: torch.Tensor
    size: torch.Tensor
    chain: torch.Tensor | float | None = None
    chain_terms: torch.Tensor | float | None = None
    class_scale_terms: torch.Tensor | None = None


def logits_with_terms(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    spec: LossSpec,
    dtype: torch.dtype,
    hidden_terms: torch.Tensor | None = None,
    terms_share: float = 1.0,
) -> LogitTerms:
    """The logits of float64 inputs and their terms, step by step as ``transform_logits`` computes them.

    ``hidden`` is the projection's input (after the norm) and ``hidden_terms`` the size of its
    terms when it is itself computed (``|h|`` by default). A raw logit's terms are those of its dot
    product, ``|h| . |w| + |b|``. A scale ``s`` (per class, or the logit scale) scales them by
    ``|s|`` and adds ``|s x|`` for the product's own rounding. The softcap ``cap tanh(x / cap)``
    scales them by its slope ``1 - tanh^2`` and adds ``|z|`` for its own rounding; ``x / cap``
    computed in ``dtype`` may underflow, up to ``underflow(dtype)`` lost, ``cap`` times that in
    the logit; the slope (the chain rule's factor) is off by roundoffs of ``2 tanh^2`` near
    saturation, and by its derivative ``2 |tanh| slope / cap`` times the terms of ``x``: a logit
    rounded to ``dtype`` before the cap moves the slope at that logit.

    ``terms_share`` < 1: a raw logit rounded in ``dtype`` is off by a fraction of its value (the
    product ``|h . w|``, the bias, and the errors its input brings, ``(terms(h) - |h|) . |w|``),
    not of its dot product's terms, which grow as D where the value grows as sqrt(D); the terms
    count only through a float32 accumulation, ``terms_share`` of them in units of ``dtype``. The
    size is the larger of the two, never more than the terms.
    """
    hidden_terms = hidden.abs() if hidden_terms is None else hidden_terms
    product = F.linear(hidden, weight)
    logits = product if bias is None else product + bias
    size = F.linear(hidden_terms, weight.abs(), None if bias is None else bias.abs())
    if terms_share < 1.0:
        value = product.abs() + F.linear(hidden_terms - hidden.abs(), weight.abs())
        value = value if bias is None else value + bias.abs()
        size = torch.maximum(value, terms_share * size)
    chain = chain_terms = class_scale_terms = None
    if spec.class_scale is not None:
        scale = spec.class_scale.double()
        class_scale_terms = size
        logits = logits * scale
        size = size * scale.abs() + logits.abs()
        chain, chain_terms = scale, scale.abs()
    if spec.logit_scale != 1.0:
        logits = logits * spec.logit_scale
        size = size * abs(spec.logit_scale) + logits.abs()
        chain, chain_terms = _times(chain, spec.logit_scale), _times(chain_terms, abs(spec.logit_scale))
        class_scale_terms = _times(class_scale_terms, abs(spec.logit_scale))
    if spec.softcap is not None:
        tanh = torch.tanh(logits / spec.softcap)
        slope = 1 - tanh.square()
        # The slope computed from a rounded tanh (2 tanh^2), at a logit that is itself off by its
        # size: the slope moves by |d slope / dx| = 2 |tanh| slope / cap per unit of the logit.
        slope_terms = slope + 2 * tanh.square() + 2 * tanh.abs() * slope * size / spec.softcap
        logits = spec.softcap * tanh
        lost_to_underflow = spec.softcap * underflow(dtype) / unit_roundoff(dtype)  # in units of the terms
        size = size * slope + logits.abs() + lost_to_underflow
        chain, chain_terms = _times(chain, slope), _times(chain_terms, slope_terms)
        class_scale_terms = _times(class_scale_terms, slope_terms)
    return LogitTerms(logits, size, chain, chain_terms, class_scale_terms)


def _times(factor, other):
    """A chain-rule product, where None is 1."""
    return other if factor is None else factor * other


def reference_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    spec: LossSpec,
    bias: torch.Tensor | None = None,
) -> LossOutput:
    """The loss in float64 from 2-D or 3-D inputs of any dtype, differentiable through autograd (the
    head's parameters in ``spec`` included)."""
    spec = in_float64(spec)
    hidden = apply_norm(hidden.double().flatten(0, -2), spec)
    logits = F.linear(hidden, weight.double(), None if bias is None else bias.double())
    out = loss_from_logits(logits, labels.flatten(), spec)
    if spec.reduction == "none":
        out = LossOutput(out.loss.view(labels.shape), out.z_loss.view(labels.shape))
    return out


@dataclass(frozen=True)
class ReferenceResult:
    """The float64 reference for one case: loss, z-loss and the gradients of a chosen backward."""

    loss: torch.Tensor
    z_loss: torch.Tensor
    grad_hidden: torch.Tensor | None
    grad_weight: torch.Tensor | None
    grad_bias: torch.Tensor | None


def reference_result(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    spec: LossSpec,
    bias: torch.Tensor | None = None,
    *,
    grad_output: torch.Tensor | None = None,
) -> ReferenceResult:
    """Float64 CPU reference with gradients of ``(loss * grad_output).sum()`` with respect to hidden,
    weight and bias (the head's parameters in ``spec`` are constants here).

    ``grad_output`` defaults to ones (a plain ``loss.backward()`` or ``loss.sum().backward()``).
    """
    h = hidden.detach().double().cpu().requires_grad_()
    w = weight.detach().double().cpu().requires_grad_()
    b = None if bias is None else bias.detach().double().cpu().requires_grad_()
    out = reference_loss(h, w, labels.cpu(), spec, b)
    upstream = torch.ones_like(out.loss) if grad_output is None else grad_output.double().cpu()
    grads = torch.autograd.grad(out.loss, [t for t in (h, w, b) if t is not None], upstream, allow_unused=True)
    grad_b = grads[2] if b is not None else None
    return ReferenceResult(
        loss=out.loss.detach(),
        z_loss=out.z_loss.detach(),
        grad_hidden=grads[0],
        grad_weight=grads[1],
        grad_bias=grad_b,
    )


def in_float64(spec: LossSpec) -> LossSpec:
    """``spec`` with its tensors in float64 on the CPU; the head's parameters keep their autograd graph."""
    def double(tensor):
        return None if tensor is None else tensor.to("cpu", torch.float64)

    class_weight = None if spec.class_weight is None else spec.class_weight.detach()
    return spec.replace(class_weight=double(class_weight), norm_weight=double(spec.norm_weight),
                        norm_bias=double(spec.norm_bias), class_scale=double(spec.class_scale))
