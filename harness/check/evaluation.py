"""Run one case through an implementation, or through the float64 reference, and keep what came out.

An ``Outcome`` holds float64 CPU copies of the loss, the separately reported z-loss and the
gradients, so outcomes of different dtypes and devices compare directly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from harness.adapter import Implementation
from harness.case import GRADIENT_INPUTS, Case, Inputs, make_inputs, strided_copy
from harness.errors import HarnessError
from harness.semantics import NormTerms, in_float64, logits_with_terms, norm_with_terms, reference_loss
from harness.check.tolerance import LOGIT_ROUNDINGS, SUM_ORDER, logit_rounding_factor, summed_over_tokens
from harness.spec import LossOutput, LossSpec, underflow, unit_roundoff

# float32's smallest normal number: what a float32 value below it loses where subnormals are
# flushed to zero, as CUDA's fast-math (-ftz=true) and CPUs' denormals-are-zero modes do.
FLUSHED = torch.finfo(torch.float32).smallest_normal


class CheckFailure(AssertionError):
    """A property does not hold; the message says what differs, by how much, and where."""


@dataclass(frozen=True)
class Outcome:
    loss: torch.Tensor
    z_loss: torch.Tensor | None  # None when the implementation does not report it
    grads: dict[str, torch.Tensor | None]  # a name of GRADIENT_INPUTS -> gradient (None: none arrived)
    loss_dtype: torch.dtype
    # The dtype each result was returned in, by tensor name ("loss", "grad_weight", ...).
    dtypes: dict[str, torch.dtype] = dataclasses.field(default_factory=dict)
    # Reference only: the size of the terms each result is computed from (see
    # ``term_magnitudes``); rounding errors scale with these, not with the result.
    magnitudes: dict[str, torch.Tensor] | None = None

    def tensors(self) -> dict[str, torch.Tensor | None]:
        """Every compared tensor by name: loss, z_loss, grad_hidden, grad_weight, grad_bias, ..."""
        return {"loss": self.loss, "z_loss": self.z_loss, **{f"grad_{k}": v for k, v in self.grads.items()}}


LossFunction = Callable[[Inputs], LossOutput]


def implementation_loss(impl: Implementation) -> LossFunction:
    return lambda i: impl.loss(i.hidden, i.weight, i.labels, i.spec, bias=i.bias)


def reference_loss_function(i: Inputs) -> LossOutput:
    return reference_loss(i.hidden, i.weight, i.labels, i.spec, i.bias)


def _detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().to("cpu", torch.float64)


def upstream_for(inputs: Inputs, loss: torch.Tensor) -> torch.Tensor:
    """The gradient fed to ``loss.backward``: ones, or the case's per-token upstream gradient, laid out
    as the case says (the stride-0 ones of ``loss.sum().backward()``, or a non-contiguous view)."""
    if inputs.upstream is None or loss.dim() == 0:
        return torch.ones_like(loss)
    if inputs.upstream_layout == "expanded":
        return torch.ones((), device=loss.device, dtype=loss.dtype).expand(inputs.upstream.shape)
    upstream = inputs.upstream.to(loss.device, loss.dtype)
    return strided_copy(upstream) if inputs.upstream_layout == "strided" else upstream


def expected_loss_shape(inputs: Inputs) -> tuple[int, ...]:
    """The shape a loss must have: the labels' for reduction none, a scalar otherwise."""
    return tuple(inputs.labels.shape) if inputs.spec.reduction == "none" else ()


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
    if tuple(loss.shape) != expected_loss_shape(inputs):
        raise CheckFailure(f"loss: shape {tuple(loss.shape)} for labels of shape {tuple(inputs.labels.shape)} "
                           f"with reduction={inputs.spec.reduction}, expected {expected_loss_shape(inputs)}")
    wants_grad = grad_enabled and bool(inputs.gradient_inputs) and backward_calls > 0
    if wants_grad:
        if not loss.requires_grad:
            raise CheckFailure("the loss does not require grad although its inputs do: no gradient can flow")
        upstream = upstream_for(inputs, loss)
        scaled = loss if loss_scale == 1.0 else loss * loss_scale  # a product would hand on a fresh upstream
        for call in range(backward_calls):
            scaled.backward(upstream, retain_graph=call + 1 < backward_calls)
    grads, dtypes = {}, {"loss": loss.dtype}
    if out.z_loss is not None:
        dtypes["z_loss"] = out.z_loss.dtype
    for name in GRADIENT_INPUTS:
        tensor = getattr(inputs, name)
        if tensor is None:
            continue
        grads[name] = _detached(tensor.grad)
        if tensor.grad is not None:
            dtypes[f"grad_{name}"] = tensor.grad.dtype
    return Outcome(_detached(loss), _detached(out.z_loss), grads, loss.dtype, dtypes)


def run_implementation(impl: Implementation, case: Case, *, device: str = "cpu", **kwargs) -> Outcome:
    """The implementation's outcome on fresh inputs of ``case`` (see ``evaluate`` for the options)."""
    if case.chunk is not None:
        chunked = impl.with_chunk_size(case.chunk)
        if chunked is None:
            raise HarnessError(f"{impl.name} has no chunk size, but the case sets chunk={case.chunk}")
        impl = chunked
    return evaluate(implementation_loss(impl), make_inputs(case, device=device), **kwargs)


def logit_terms(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: LossSpec,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 logits of ``hidden`` (any shape ``(..., D)``, before the head's norm) and the size of
    their terms when computed in ``dtype`` (see ``harness.semantics.logits_with_terms``)."""
    with torch.no_grad():
        spec = in_float64(spec)
        bias = None if bias is None else bias.detach().double()
        hidden = hidden.detach().double()
        hidden_terms = hidden.abs()
        if spec.norm is not None:
            norm = norm_with_terms(hidden, spec, hidden_terms)
            hidden, hidden_terms = norm.output, norm.size
        terms = logits_with_terms(hidden, weight.detach().double(), bias, spec, dtype, hidden_terms,
                                  accumulation_share(dtype, hidden.shape[-1]))
    return terms.logits, terms.size


def accumulation_share(dtype: torch.dtype, length: int) -> float:
    """What a float32 sum of ``length`` terms costs in units of ``dtype``'s roundoff: ``SUM_ORDER``
    float32 roundoffs per sqrt(length), at most one roundoff of ``dtype``. A logit's dot product
    and a logsumexp are accumulated in float32 by every legitimate kernel: their terms count at
    this share, their values at the full rounding of ``dtype``."""
    return min(1.0, SUM_ORDER * math.sqrt(max(length, 1)) * unit_roundoff(torch.float32) / unit_roundoff(dtype))


def _head_with_terms(inputs: Inputs, dtype: torch.dtype):
    """The head's forward in float64 with the terms of every step (``term_magnitudes``' first part):
    (hidden, its terms, weight, the float64 spec, the norm's terms or None, the projection input's
    terms, the logits with their terms)."""
    hidden = inputs.hidden.detach().double().reshape(-1, inputs.hidden.shape[-1])
    weight = inputs.weight.detach().double()
    bias = None if inputs.bias is None else inputs.bias.detach().double()
    hidden_terms = hidden.abs()
    if inputs.model is not None:  # tied: the hidden states are computed by the trunk, tanh(layer(embedding))
        layer = inputs.model.layer
        embedded = inputs.model.embedding.weight.detach().double()[inputs.token_ids.reshape(-1)]
        pre_activation = F.linear(embedded.abs(), layer.weight.detach().double().abs(),
                                  layer.bias.detach().double().abs())
        hidden_terms = (1 - hidden.square()) * pre_activation + hidden.abs()
    spec = in_float64(inputs.spec)
    projected, projected_terms, norm = hidden, hidden_terms, None
    if spec.norm is not None:
        norm = norm_with_terms(hidden, spec, hidden_terms)
        projected, projected_terms = norm.output, norm.size
    head = logits_with_terms(projected, weight, bias, spec, dtype, projected_terms,
                             accumulation_share(dtype, projected.shape[-1]))
    return hidden, hidden_terms, weight, spec, norm, projected_terms, head


def term_magnitudes(
    inputs: Inputs, dtype: torch.dtype, *, loss_scale: float = 1.0, backward_calls: int = 1
) -> dict[str, torch.Tensor]:
    """The size of the terms each result is computed from, per element, in float64 (the tolerance's scale).

    A rounding error is a fraction of the terms a result is computed from, not of the result. The
    model, element by element (``x`` the raw logits, ``z`` the soft-capped ones, ``p = softmax(z)``):

    - a logit: ``L = |h| . |w| + |b|`` (the terms of its dot product), of which a float32
      accumulation's share counts, and at least its value ``|h . w| + |b|`` (``accumulation_share``),
      then through the head's options as ``harness.semantics.logits_with_terms`` models them; for a tied model's computed hidden states ``h =
      tanh(layer(e))``, ``|h|`` is replaced by the terms of ``h``: ``(1 - h^2) (|W_layer| . |e| +
      |b_layer|) + |h|``;
    - ``logsumexp(z)``: ``E = sum_j p_j L_j + a |logsumexp(z)|``, ``a`` the share of a float32
      sum over V (``accumulation_share``): the logsumexp itself is computed in float32;
    - a token's cross-entropy ``lse - z_y``: ``sum_j |p_j - [j = y]| L_j + a (|lse| + L_y)``, each
      logit's error times its effect on the loss (errors of ``lse`` and ``z_y`` cancel as ``p_y`` nears
      1) plus the float32 share of forming it; smoothed, ``(1 - eps) w_y`` times that ``+ eps / V sum_j
      w_j (E + L_j)``;
      its z-loss ``m lse^2``: ``2 m |lse| E``;
    - a logit gradient ``s (p_j c - c' [j = y] - eps w_j / V) + 2 m s' lse p_j``: every term taken
      positive, with ``p_j`` counted as ``p_j (1 + L_j + E)`` (an error in a logit or in the
      logsumexp is a relative error of every probability), and back through the head's options
      times the terms of their derivative (``LogitTerms.chain_terms``);
    - everything a token's logits reach is widened by ``logit_rounding_factor`` of that token's own
      largest logit (a rounding of a large logit moves its probability by a factor, not a fraction);
    - a logit gradient rounded to the case's ``dtype`` may also lose up to ``underflow(dtype)``
      outright, whatever its size, and up to ``FLUSHED`` where its float32 computation flushes
      subnormals to zero: the larger over ``u`` in units of the terms; below the normal range the
      loss is the same for equal gradients, so sums over tokens take it linearly;
    - the gradients of hidden, weight and bias sum the logit gradients' terms against ``|W|``,
      ``|H|`` and ones; a tied weight adds the embedding path's; a class scale's against the raw
      logits' terms;
    - a norm before the projection: its output's terms are ``harness.semantics.norm_with_terms``'s,
      its weight's and bias's gradients sum the output gradient's terms against ``|x_hat|`` (plus
      the input's terms over sigma) and ones, and its input's gradient takes them back through the
      norm's Jacobian with every term positive (``norm_backward_terms``);
    - a sum over tokens (a reduced loss, the gradients of the head's parameters) adds independent
      per-token roundings: ``tolerance.summed_over_tokens`` of the linear sum and the root-sum-square.

    Reductions sum the per-token terms with the reduction's weights, and the upstream gradients
    (``loss_scale``, ``backward_calls``, per-token upstream) scale them like the results.
    """
    with torch.no_grad():
        hidden, hidden_terms, weight, spec, norm, projected_terms, head = _head_with_terms(inputs, dtype)
        logits, logit_size = head.logits, head.size
        probs, lse = logits.softmax(dim=-1), torch.logsumexp(logits, dim=-1)
        vocab = logits.shape[-1]
        lse_terms = (probs * logit_size).sum(-1) + accumulation_share(dtype, vocab) * lse.abs()
        largest = logits.abs().amax(-1) if vocab else lse.abs()
        widening = logit_rounding_factor(LOGIT_ROUNDINGS, dtype, largest) / LOGIT_ROUNDINGS  # per token, >= 1
        labels = inputs.labels.reshape(-1)
        valid = (labels != spec.ignore_index).double()
        safe = torch.where(valid.bool(), labels, 0)
        class_weight = torch.ones(vocab, dtype=torch.float64) if spec.class_weight is None else spec.class_weight.double()
        weight_y = class_weight[safe] * valid
        eps, z_mult = spec.label_smoothing, spec.z_loss_multiplier
        # d(reduced loss) / d(per-token cross-entropy and z-loss), before loss_div_factor
        if spec.reduction == "mean":
            ce_scale, z_scale = valid / weight_y.sum(), valid / valid.sum()
        else:
            ce_scale = z_scale = valid

        label_terms = logit_size.gather(1, safe[:, None]).squeeze(1)
        one_hot = F.one_hot(safe, vocab).double()
        # lse - z_y moves by p_j - [j = y] times an error of logit j: as p_y nears 1 the errors of the
        # two cancel, which a loss formed from both in float32 keeps (each rounded first would not).
        nll_terms = (((probs - one_hot).abs() * logit_size).sum(-1)
                     + accumulation_share(dtype, vocab) * (lse.abs() + label_terms))
        smooth_terms = (logit_size * class_weight).sum(-1) / vocab + lse_terms * class_weight.sum() / vocab
        per_token_ce = ((1 - eps) * weight_y * nll_terms + eps * smooth_terms * valid) * widening
        per_token_z = 2 * z_mult * lse.abs() * lse_terms * valid * widening
        per_token = (per_token_ce + per_token_z).reshape(inputs.labels.shape) / spec.loss_div_factor
        if spec.reduction == "none":
            total, z = per_token, per_token_z.reshape(inputs.labels.shape) / spec.loss_div_factor
        else:
            total = _token_sum(per_token_ce * ce_scale + per_token_z * z_scale) / spec.loss_div_factor
            z = _token_sum(per_token_z * z_scale) / spec.loss_div_factor
        terms = {"loss": total, "z_loss": z}

        # the gradients: times the upstream gradient of every backward
        upstream = valid if inputs.upstream is None else inputs.upstream.reshape(-1).abs().double()
        if spec.reduction == "none":
            ce_scale = z_scale = upstream * valid
        factor = abs(loss_scale) * backward_calls / spec.loss_div_factor
        ce_scale, z_scale = ce_scale * factor, z_scale * factor
        mix = (1 - eps) * weight_y + eps / vocab * class_weight.sum() * valid
        prob_terms = probs * (1 + logit_size + lse_terms[:, None])
        logit_grad = (
            ce_scale[:, None] * (prob_terms * mix[:, None] + one_hot * ((1 - eps) * weight_y)[:, None]
                                 + eps / vocab * class_weight[None, :] * valid[:, None])
            + (z_scale * 2 * z_mult)[:, None] * (lse.abs()[:, None] * prob_terms + probs * lse_terms[:, None])
        ) * widening[:, None]
        # A logit gradient below the normal range is stored with an absolute loss: up to underflow(dtype)
        # rounded to the case's dtype, up to float32's smallest normal where its float32 computation
        # flushes subnormals to zero (GPUs' fast-math exp, CPUs' denormals-are-zero mode). The loss is
        # the same for every token whose gradient has the same value (a mean's 1/N times smoothing's
        # eps/V): no independent roundings, so its sum over tokens is linear.
        lost_to_underflow = max(underflow(dtype), FLUSHED) / unit_roundoff(dtype)  # in units of the terms
        normal_min = max(torch.finfo(dtype).smallest_normal, FLUSHED)
        subnormal = logit_grad < normal_min
        if head.class_scale_terms is not None:  # d(loss)/d(scale_j) = sum over tokens of dL/dz_j dz_j/ds_j
            products = (logit_grad + lost_to_underflow) * head.class_scale_terms + lost_to_underflow
            systematic = subnormal.double() * lost_to_underflow * (head.class_scale_terms + 1)
            terms["grad_class_scale"] = (summed_over_tokens(products.sum(0), products.square().sum(0).sqrt())
                                         + systematic.sum(0))
        if head.chain_terms is not None:  # back through the head's options to the raw logits
            logit_grad = logit_grad * head.chain_terms
            subnormal = subnormal | (logit_grad < normal_min)
        systematic = subnormal.double() * lost_to_underflow
        logit_grad = logit_grad + lost_to_underflow
        grad_hidden = logit_grad @ weight.abs()
        terms["grad_weight"] = (summed_over_tokens(logit_grad.t() @ projected_terms,
                                                   (logit_grad.square().t() @ projected_terms.square()).sqrt())
                                + systematic.t() @ projected_terms)
        terms["grad_bias"] = summed_over_tokens(logit_grad.sum(0), logit_grad.square().sum(0).sqrt()) + systematic.sum(0)
        if norm is not None:  # back through the norm: its parameters', then its input's gradient
            norm_weight_terms = grad_hidden * (norm.normalized.abs() + hidden_terms * norm.inverse_scale)
            terms["grad_norm_weight"] = summed_over_tokens(norm_weight_terms.sum(0),
                                                           norm_weight_terms.square().sum(0).sqrt())
            terms["grad_norm_bias"] = summed_over_tokens(grad_hidden.sum(0), grad_hidden.square().sum(0).sqrt())
            grad_hidden = norm_backward_terms(grad_hidden, norm, spec)
        terms["grad_hidden"] = grad_hidden.reshape(inputs.hidden.shape)
        if inputs.model is not None:  # tied: the embedding path adds to the weight's gradient
            layer = inputs.model.layer.weight.detach().double().abs()
            embedding_rows = grad_hidden @ layer
            terms["grad_weight"] = terms["grad_weight"].index_add(0, inputs.token_ids.reshape(-1), embedding_rows)
        return terms


def _token_sum(per_token: torch.Tensor) -> torch.Tensor:
    """The terms of a reduced value from its per-token terms (see ``tolerance.summed_over_tokens``)."""
    return summed_over_tokens(per_token.sum(), per_token.square().sum().sqrt())


def norm_backward_terms(grad_output_terms: torch.Tensor, norm: NormTerms, spec: LossSpec) -> torch.Tensor:
    """The terms of a norm's input gradient, from those of its output gradient ``dy``.

    ``dx = (g dy - mean(g dy) - x_hat mean(g dy x_hat)) / sigma`` for a LayerNorm, without the
    middle term for an RMSNorm: each term taken positive.
    """
    gain = 1.0 if spec.norm_weight is None else spec.norm_weight.double().abs()
    scaled = grad_output_terms * gain
    projection = norm.normalized.abs() * (scaled * norm.normalized.abs()).mean(-1, keepdim=True)
    centring = scaled.mean(-1, keepdim=True) if spec.norm == "layernorm" else 0.0
    return (scaled + centring + projection) * norm.inverse_scale


def run_reference(case: Case, **kwargs) -> Outcome:
    """The float64 reference on exact copies of the case's inputs (on the CPU)."""
    inputs = make_inputs(case, reference=True)
    outcome = evaluate(reference_loss_function, inputs, **kwargs)
    sizes = {k: v for k, v in kwargs.items() if k in ("loss_scale", "backward_calls")}
    return dataclasses.replace(outcome, magnitudes=term_magnitudes(inputs, case.torch_dtype, **sizes))
