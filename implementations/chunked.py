"""The project's own memory-efficient LM-head loss in pure PyTorch.

Tokens are processed in chunks. For each chunk the logits are computed in float32, turned into
the loss and, in the same pass, into the gradient of the logits, which is immediately projected
onto the gradients of hidden, weight and bias. Peak extra memory is therefore one chunk of logits
(plus the gradients themselves), not N x V. Every option of ``LossSpec`` is supported, on CPU
and GPU.

With ``reduction="mean"``/``"sum"`` the gradients are computed in the forward (the upstream
gradient is a scalar, applied in backward). With ``reduction="none"`` the upstream gradient is
per token, so backward recomputes each chunk with it (as Liger-Kernel does).

Gradient of the per-token loss with respect to the (soft-capped) logits z, with p = softmax(z),
target y, class weights w (all ones without ``class_weight``), smoothing eps, V classes and
z-loss multiplier m:

    d/dz_j = p_j * ((1 - eps) * w_y + eps / V * sum(w)) - (1 - eps) * w_y * [j == y] - eps / V * w_j
             + 2 * m * logsumexp(z) * p_j

and the softcap chain rule multiplies by 1 - tanh(x / cap)^2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from harness.adapter import Capabilities, Implementation
from harness.semantics import apply_softcap
from harness.spec import LossOutput, LossSpec


# Smallest float32 logits chunk worth making. Tiny chunks make skinny matmuls and re-read the
# (V, D) float32 weight-gradient accumulator once per chunk: with D = 256, V = 32768, N = 2048 on
# the 2-core CPU machine, 16-token chunks took 13.6 s for forward+backward, 256-token chunks 5.4 s.
MIN_CHUNK_LOGITS_BYTES = 64 * 2**20


def default_chunk_size(num_tokens: int, vocab: int, dim: int) -> int:
    """Tokens per chunk: one chunk of logits about the size of the hidden states, but not smaller
    than ``MIN_CHUNK_LOGITS_BYTES`` of float32 logits; a power of 2.

    The first part is the aspect-ratio rule of Liger-Kernel and PyTorch's chunked path.
    """
    chunks = max(1, math.ceil(vocab / max(dim, 1)))
    by_aspect_ratio = math.ceil(num_tokens / chunks)
    by_budget = MIN_CHUNK_LOGITS_BYTES // (4 * max(vocab, 1))
    tokens = max(1, by_aspect_ratio, by_budget)
    return 1 << math.ceil(math.log2(tokens))


class _Totals:
    """Per-batch normalisers, computed once from the labels before any chunk is processed."""

    def __init__(self, labels: torch.Tensor, spec: LossSpec):
        valid = labels != spec.ignore_index
        self.num_valid = valid.sum().to(torch.float32)
        if spec.class_weight is not None:
            safe = torch.where(valid, labels, 0)
            self.ce_denominator = (spec.class_weight.float()[safe] * valid).sum()
        else:
            self.ce_denominator = self.num_valid


def _chunk_loss_and_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    spec: LossSpec,
    totals: _Totals,
    token_scale: torch.Tensor | None,
    want_grad: bool,
):
    """Loss, z-loss (per token, already scaled for the reduction) and d(loss)/d(raw logits)."""
    raw = F.linear(hidden, weight, bias).float()
    logits = apply_softcap(raw, spec.softcap)
    lse = torch.logsumexp(logits, dim=-1)
    log_probs = logits - lse[:, None]
    valid = labels != spec.ignore_index
    safe = torch.where(valid, labels, 0).long()
    eps = spec.label_smoothing
    vocab = logits.shape[-1]

    class_weight = None if spec.class_weight is None else spec.class_weight.float()
    weight_y = torch.ones_like(lse) if class_weight is None else class_weight[safe]
    nll = -log_probs.gather(1, safe[:, None]).squeeze(1)
    ce = (1 - eps) * weight_y * nll
    if eps:
        smooth = -(log_probs.sum(-1) if class_weight is None else log_probs @ class_weight)
        ce = ce + eps / vocab * smooth
    z = spec.z_loss_multiplier * lse.square()

    # Reduction scaling, per token: mean divides the CE by the (weighted) token count and the
    # z-loss by the plain token count; "none" takes the upstream gradient per token.
    if spec.reduction == "mean":
        ce_scale = valid / totals.ce_denominator
        z_scale = valid / totals.num_valid
    else:
        ce_scale = z_scale = valid.float()
    ce, z = ce * ce_scale, z * z_scale
    if not want_grad:
        return ce, z, None

    if token_scale is not None:
        ce_scale, z_scale = ce_scale * token_scale, z_scale * token_scale
    probs = log_probs.exp()
    weight_sum = vocab if class_weight is None else class_weight.sum()
    grad = probs * ((ce_scale * ((1 - eps) * weight_y + eps / vocab * weight_sum))[:, None])
    grad.scatter_add_(1, safe[:, None], (-(1 - eps) * weight_y * ce_scale)[:, None])
    if eps:
        per_class = torch.ones(vocab, device=grad.device) if class_weight is None else class_weight
        grad -= (eps / vocab) * ce_scale[:, None] * per_class[None, :]
    if spec.z_loss_multiplier:
        grad += (2 * spec.z_loss_multiplier * lse * z_scale)[:, None] * probs
    if spec.softcap is not None:
        grad *= 1 - (logits / spec.softcap).square()
    return ce, z, grad


def _chunked_pass(hidden, weight, bias, labels, spec, chunk_size, needs, token_scale=None):
    """Run every chunk; return per-token (ce, z) and the requested gradients (float32 accumulators)."""
    num_tokens = hidden.shape[0]
    totals = _Totals(labels, spec)
    need_h, need_w, need_b = needs
    want_grad = need_h or need_w or need_b
    ce_all = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
    z_all = torch.empty_like(ce_all)
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
    for start in range(0, num_tokens, chunk_size):
        end = min(start + chunk_size, num_tokens)
        h = hidden[start:end]
        scale = None if token_scale is None else token_scale[start:end].float()
        ce, z, grad = _chunk_loss_and_grad(h, weight, bias, labels[start:end], spec, totals, scale, want_grad)
        ce_all[start:end] = ce
        z_all[start:end] = z
        if grad is None:
            continue
        if need_h:
            grad_h[start:end] = grad.to(weight.dtype) @ weight
        if need_w:
            grad_w.addmm_(grad.t(), h.float())
        if need_b:
            grad_b += grad.sum(0)
        del grad
    return ce_all, z_all, grad_h, grad_w, grad_b


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, spec, chunk_size, compute_grads):
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        needs = tuple(n and compute_grads for n in needs)
        defer = spec.reduction == "none"
        ce, z, grad_h, grad_w, grad_b = _chunked_pass(
            hidden, weight, bias, labels, spec, chunk_size, (False, False, False) if defer else needs
        )
        if spec.reduction == "none":
            loss, z_loss = ce + z, z
            ctx.save_for_backward(hidden, weight, bias, labels)
        else:
            loss, z_loss = (ce + z).sum(), z.sum()
            ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.spec, ctx.chunk_size, ctx.needs, ctx.defer = spec, chunk_size, needs, defer
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(z_loss)
        return loss, z_loss

    @staticmethod
    def backward(ctx, grad_loss, _grad_z_loss):
        if ctx.defer:
            hidden, weight, bias, labels = ctx.saved_tensors
            _, _, grad_h, grad_w, grad_b = _chunked_pass(
                hidden, weight, bias, labels, ctx.spec, ctx.chunk_size, ctx.needs, token_scale=grad_loss
            )
        else:
            grad_h, grad_w, grad_b = ctx.saved_tensors
            # Scale without touching the saved buffers, so a retained graph can run backward again.
            grad_h = None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype)
            grad_w = None if grad_w is None else grad_w * grad_loss
            grad_b = None if grad_b is None else grad_b * grad_loss
        weight_dtype, bias_dtype = ctx.dtypes
        grad_w = None if grad_w is None else grad_w.to(weight_dtype)
        grad_b = None if grad_b is None else grad_b.to(bias_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


SUPPORTED = ("bias", "ignore_index", "label_smoothing", "z_loss", "softcap", "loss_div_factor", "class_weight")


class Chunked(Implementation):
    name = "chunked"
    family = "native"
    summary = "project's pure-PyTorch chunked loss: gradients computed chunk by chunk in the forward"

    def __init__(self, chunk_size: int | None = None) -> None:
        self.chunk_size = chunk_size

    def with_chunk_size(self, chunk_size):
        return Chunked(chunk_size=chunk_size)

    def capabilities(self, device):
        return Capabilities(supported_options=SUPPORTED)

    def compute(self, hidden, weight, labels, spec, bias):
        num_tokens = hidden.shape[0]
        chunk_size = self.chunk_size or default_chunk_size(num_tokens, weight.shape[0], weight.shape[1])
        # An all-ignored batch with "mean" gives 0/0 = NaN, as in PyTorch: no special case needed.
        loss, z_loss = _ChunkedLinearCrossEntropy.apply(
            hidden, weight, bias, labels, spec, max(1, chunk_size), torch.is_grad_enabled()
        )
        return LossOutput(loss, z_loss)
