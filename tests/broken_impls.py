"""Deliberately broken LM-head losses, each with one bug that fused kernels are known to have.

The gate must fail every one of them (``python -m harness check --impl tests.broken_impls:NAME``
exits non-zero and prints a reproducer), every time. They are plugins exactly as a user would
write them: plain functions, or ``Implementation`` subclasses, loaded as ``module:attr``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.adapter import Capabilities, Implementation
from harness.semantics import loss_from_logits
from harness.spec import LossOutput
from tests.plugin_examples import flat_tokens


def _plain_options_only(label_smoothing, z_loss_multiplier, softcap, class_weight):
    if label_smoothing or z_loss_multiplier or softcap is not None or class_weight is not None:
        raise NotImplementedError("only bias and ignore_index are implemented")


@flat_tokens
def wrong_mean_denominator(
    hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
    label_smoothing=0.0, z_loss_multiplier=0.0, softcap=None, class_weight=None,
):
    """Divides the mean by every token, ignored ones included."""
    _plain_options_only(label_smoothing, z_loss_multiplier, softcap, class_weight)
    logits = F.linear(hidden, weight, bias).float()
    per_token = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    if reduction == "mean":
        return per_token.sum() / labels.numel()
    return per_token.sum() if reduction == "sum" else per_token


@flat_tokens
def dropped_vocabulary_tail(
    hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
    label_smoothing=0.0, z_loss_multiplier=0.0, softcap=None, class_weight=None,
):
    """Runs its softmax over whole blocks of 16 classes only: the last V % 16 are never seen."""
    _plain_options_only(label_smoothing, z_loss_multiplier, softcap, class_weight)
    logits = F.linear(hidden, weight, bias).float()
    seen = logits.shape[-1] // 16 * 16
    logits = torch.cat([logits[:, :seen], torch.full_like(logits[:, seen:], -torch.inf)], dim=-1)
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


@flat_tokens
def smoothing_on_ignored_tokens(
    hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
    label_smoothing=0.0, z_loss_multiplier=0.0, softcap=None, class_weight=None,
):
    """Adds the label-smoothing term for every token, ignored ones included."""
    if z_loss_multiplier or softcap is not None or class_weight is not None:
        raise NotImplementedError("only bias, ignore_index and label_smoothing are implemented")
    logits = F.linear(hidden, weight, bias).float()
    log_probs = logits.log_softmax(-1)
    valid = labels != ignore_index
    nll = -log_probs.gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1) * valid
    smooth = -log_probs.mean(-1)  # the bug: not multiplied by `valid`
    per_token = (1 - label_smoothing) * nll + label_smoothing * smooth
    if reduction == "mean":
        return per_token.sum() / valid.sum()
    return per_token.sum() if reduction == "sum" else per_token


class _Eager(Implementation):
    """Materialised float32 logits and the project's definition; subclasses add one bug."""

    family = "plugin"

    def loss_of(self, hidden, weight, labels, spec, bias):
        return loss_from_logits(F.linear(hidden, weight, bias).float(), labels, spec.replace(loss_div_factor=1.0))


class DroppedLastChunk(_Eager):
    """Processes tokens in chunks but loops over N // chunk_size chunks: the partial last one is lost."""

    name = "dropped-last-chunk"
    summary = "chunked loss that drops the last partial chunk of tokens"

    def __init__(self, chunk_size: int = 8):
        self.chunk_size = chunk_size

    def with_chunk_size(self, chunk_size):
        return DroppedLastChunk(chunk_size)

    def compute(self, hidden, weight, labels, spec, bias):
        none_spec = spec.replace(reduction="none")
        kept = hidden.shape[0] // self.chunk_size * self.chunk_size
        parts = [
            self.loss_of(hidden[s : s + self.chunk_size], weight, labels[s : s + self.chunk_size], none_spec, bias)
            for s in range(0, kept, self.chunk_size)
        ]
        ce = torch.cat([p.loss for p in parts]) if parts else hidden.new_zeros(0, dtype=torch.float32)
        z = torch.cat([p.z_loss for p in parts]) if parts else ce
        lost = hidden.new_zeros(hidden.shape[0] - kept, dtype=torch.float32)
        ce, z = torch.cat([ce, lost]), torch.cat([z, lost])
        if spec.reduction == "none":
            return LossOutput(ce, z)
        if spec.reduction == "sum":
            return LossOutput(ce.sum(), z.sum())
        valid = labels != spec.ignore_index
        weights = valid.float() if spec.class_weight is None else spec.class_weight.float()[labels.clamp(min=0)] * valid
        return LossOutput(ce.sum() / weights.sum() if spec.class_weight is not None else ce.sum() / valid.sum(),
                          z.sum() / valid.sum())


class MissingBiasGradient(_Eager):
    """Uses the bias in the forward but never returns its gradient."""

    name = "missing-bias-gradient"
    summary = "bias detached: no gradient reaches it"

    def compute(self, hidden, weight, labels, spec, bias):
        return self.loss_of(hidden, weight, labels, spec, None if bias is None else bias.detach())


class ZLossWithoutGradient(_Eager):
    """Adds the right z-loss value, but computed outside autograd: its gradient is missing."""

    name = "z-loss-without-gradient"
    summary = "z-loss added as a constant"

    def compute(self, hidden, weight, labels, spec, bias):
        out = self.loss_of(hidden, weight, labels, spec.replace(z_loss_multiplier=0.0), bias)
        with torch.no_grad():
            z = self.loss_of(hidden, weight, labels, spec, bias).z_loss
        return LossOutput(out.loss + z if spec.z_loss_multiplier else out.loss, z)


class _GradientsInForward(torch.autograd.Function):
    """Computes the gradients during the forward (as fused kernels do) and has a backward bug."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, bug):
        with torch.enable_grad():
            h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
            loss = F.cross_entropy(F.linear(h, w).float(), labels, ignore_index=-100, reduction="sum")
            grad_h, grad_w = torch.autograd.grad(loss, (h, w))
        ctx.bug = bug
        # Kept as attributes, not through save_for_backward: like a kernel writing through raw
        # pointers, an in-place update then escapes autograd's version check.
        ctx.grad_h, ctx.grad_w = grad_h, grad_w
        if bug == "reuses-input-buffer":
            hidden.copy_(grad_h)  # the gradient is written into the caller's hidden states
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.grad_h, ctx.grad_w
        if ctx.bug == "ignores-upstream":
            return grad_h, grad_w, None, None
        if ctx.bug == "scales-saved-in-place":
            grad_h.mul_(grad_loss.to(grad_h.dtype))
            grad_w.mul_(grad_loss.to(grad_w.dtype))
            return grad_h, grad_w, None, None
        return grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype), None, None


class _FusedSumOnly(Implementation):
    family = "plugin"
    bug = ""

    def capabilities(self, device):
        return Capabilities(reductions=("sum",), unsupported_options={
            o: "not implemented" for o in ("bias", "ignore_index", "label_smoothing", "z_loss", "softcap",
                                           "class_weight")})

    def compute(self, hidden, weight, labels, spec, bias):
        return LossOutput(_GradientsInForward.apply(hidden, weight, labels, self.bug), None)


class IgnoresUpstreamGradient(_FusedSumOnly):
    """Returns the gradients saved in the forward without multiplying by the upstream gradient."""

    name = "ignores-upstream-gradient"
    bug = "ignores-upstream"


class ScalesSavedGradientInPlace(_FusedSumOnly):
    """Multiplies its saved gradients in place by the upstream gradient: a second backward is wrong."""

    name = "scales-saved-gradient-in-place"
    bug = "scales-saved-in-place"


class ReusesInputBuffer(_FusedSumOnly):
    """Stores the hidden-state gradient in the caller's hidden-state tensor."""

    name = "reuses-input-buffer"
    bug = "reuses-input-buffer"


dropped_last_chunk = DroppedLastChunk()
missing_bias_gradient = MissingBiasGradient()
z_loss_without_gradient = ZLossWithoutGradient()
ignores_upstream_gradient = IgnoresUpstreamGradient()
scales_saved_gradient_in_place = ScalesSavedGradientInPlace()
reuses_input_buffer = ReusesInputBuffer()


@flat_tokens
def aborts_the_process(
    hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
    label_smoothing=0.0, z_loss_multiplier=0.0, softcap=None, class_weight=None,
):
    """Kills its process, as an illegal memory access does, on a single token or an out-of-range
    label. The gate records a crash and goes on."""
    import os

    _plain_options_only(label_smoothing, z_loss_multiplier, softcap, class_weight)
    valid = labels != ignore_index
    if labels.numel() == 1 or bool(((labels < 0) | (labels >= weight.shape[0]))[valid].any()):
        os.abort()
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


FATAL_CUDA_ERROR = "CUDA error: an illegal memory access was encountered"


class LosesItsCudaContext(_Eager):
    """Raises the error an illegal memory access surfaces as, on float16 inputs of more than 3 tokens
    (the probes of what it supports have 3, and pass) or on an out-of-range label (as a device-side
    assert would). As on a GPU, its process is spoiled from then on: every later call raises the
    same error, so that only a fresh process gives the next property or edge case a fair run."""

    name = "loses-its-cuda-context"

    def __init__(self):
        self.context_lost = False  # the stand-in for a CUDA context, which is per process

    def compute(self, hidden, weight, labels, spec, bias):
        valid = labels != spec.ignore_index
        out_of_range = bool(((labels < 0) | (labels >= weight.shape[0]))[valid].any())
        tokens = hidden.numel() // hidden.shape[-1]
        if self.context_lost or out_of_range or (hidden.dtype == torch.float16 and tokens > 3):
            self.context_lost = True
            raise RuntimeError(FATAL_CUDA_ERROR)
        return self.loss_of(hidden, weight, labels, spec, bias)


loses_its_cuda_context = LosesItsCudaContext()


def _check_token_count(hidden):
    if hidden.shape[0] > 64:
        raise ValueError(f"this kernel's tile holds 64 tokens, got {hidden.shape[0]}")


@flat_tokens
def raises_past_64_tokens(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean"):
    """Raises ValueError (from a helper, two frames down) on more than 64 tokens: the gate records
    the failure with the kernel's traceback."""
    _check_token_count(hidden)
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)
