"""Correct linear-cross-entropy plugins that place their roundings differently from torch-eager.

torch-eager computes ``F.linear(hidden, weight, bias)`` in the input dtype (one rounding of each
logit), upcasts it to float32 and takes the loss there; its backward rounds the logits' gradient
to the input dtype before the two gradient matmuls. Each plugin here computes exactly the loss of
``harness.semantics`` and differs from torch-eager only in where it rounds, each a choice a real
kernel makes (the bias after the rounded matmul, as Liger adds it; logits never rounded; the
logits' gradient formed in the forward, as fused kernels do; online logsumexp over class blocks;
token chunks; other summation orders; base-2 exponentials, as Triton kernels use; ...). A
correctness gate must pass every one: this is the false-alarm corpus of issue 24, beside the bug
corpora (``tests/subtle_bugs.py``, ``tests/reach_bugs.py``).

Each is a plain-function plugin, ``python -m harness check --impl tests.correct_variants:NAME``::

    fn(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
       label_smoothing=0.0, z_loss_multiplier=0.0, softcap=None, class_weight=None)

for ``(N, D)`` hidden states and ``(N,)`` labels or ``(B, T, D)`` and ``(B, T)``, in any layout
(non-contiguous views included), in float32, bfloat16, float16 and float64; the loss has the
labels' shape for ``reduction="none"`` and is 0-d otherwise. "Float32" below is the accumulation
dtype: float32 for float32, bfloat16 and float16 inputs, float64 for float64 inputs, where every
plugin matches the float64 reference to about 1e-13 (``tests/test_correct_variants.py``): each
computes the right function, and differs from the reference by its roundings only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CLASS_BLOCK = 1000  # classes per block of the online logsumexp: no power of two, no shape of the gate
TOKEN_CHUNK = 100  # tokens per chunk of the chunked loss
GRADIENT_CHUNK = 256  # tokens per chunk of the Liger-style loss that forms its gradients in the forward
SUM_BLOCK = 64  # tokens per block of the blocked weight-gradient sum
SHARDS = 2  # vocabulary shards of the tensor-parallel-style loss
LOG2_E = 1.0 / math.log(2.0)
LN_2 = math.log(2.0)


@dataclass(frozen=True, eq=False)
class Options:
    """The loss options of the plugin contract."""

    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss_multiplier: float = 0.0
    softcap: float | None = None
    class_weight: torch.Tensor | None = None

    def __post_init__(self):
        if self.reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be mean, sum or none, got {self.reduction!r}")


@dataclass(frozen=True, eq=False)
class Tokens:
    """The labels of the ``(N,)`` tokens and what the reduction makes of each.

    ``safe`` is a class id for every token (ignored ones read class 0 and are masked); ``target``
    the token's weight in the cross-entropy (its class weight, 0 when ignored); ``ce_scale`` and
    ``z_scale`` the factor of its cross-entropy and of its z-loss in the reduced loss.
    """

    labels: torch.Tensor
    valid: torch.Tensor
    safe: torch.Tensor
    target: torch.Tensor
    ce_scale: torch.Tensor
    z_scale: torch.Tensor


def _wide(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """The tensor in the accumulation dtype: float64 stays float64, everything else becomes float32."""
    if tensor is None or tensor.dtype == torch.float64:
        return tensor
    return tensor.float()


def _rows(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, D)`` hidden states and ``(N,)`` int64 labels of any-rank, any-layout inputs."""
    return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).long()


def _capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def _class_weight(options: Options, dtype: torch.dtype) -> torch.Tensor | None:
    return None if options.class_weight is None else options.class_weight.to(dtype)


def _tokens(labels: torch.Tensor, options: Options, dtype: torch.dtype) -> Tokens:
    """The per-token weights of ``labels`` (flat) under ``options``, in ``dtype``."""
    valid = labels != options.ignore_index
    safe = labels.masked_fill(~valid, 0)
    class_weight = _class_weight(options, dtype)
    target = valid.to(dtype) if class_weight is None else class_weight[safe] * valid
    ones = torch.ones_like(target)
    if options.reduction == "mean":
        ce_scale, z_scale = ones / target.sum(), ones / valid.sum().to(dtype)
    else:
        ce_scale = z_scale = ones
    return Tokens(labels, valid, safe, target, ce_scale, z_scale)


def _losses_from_statistics(lse, target_logit, weighted_logit_sum, tokens: Tokens, options: Options, vocab: int):
    """Per-token cross-entropy and z-loss (0 where ignored) from a token's logsumexp, target logit and
    class-weighted logit sum: ``(1 - eps) w_y (lse - z_y) + eps / V sum_c w_c (lse - z_c)`` and ``m lse^2``."""
    ce = (lse - target_logit) * tokens.target
    eps = options.label_smoothing
    if eps:
        class_weight = _class_weight(options, lse.dtype)
        weight_sum = vocab if class_weight is None else class_weight.sum()
        ce = (1 - eps) * ce + eps / vocab * torch.where(tokens.valid, weight_sum * lse - weighted_logit_sum, 0.0)
    z_loss = options.z_loss_multiplier * torch.where(tokens.valid, lse.square(), 0.0)
    return ce, z_loss


def _weighted_logit_sum(z: torch.Tensor, options: Options) -> torch.Tensor:
    """``sum_c w_c z_c`` of each row of logits ``z`` (``w_c = 1`` without class weights)."""
    class_weight = _class_weight(options, z.dtype)
    return z.sum(-1) if class_weight is None else z @ class_weight


def _losses(z: torch.Tensor, lse: torch.Tensor, tokens: Tokens, options: Options):
    """Per-token cross-entropy and z-loss of soft-capped logits ``z`` with logsumexp ``lse``."""
    target_logit = z.gather(1, tokens.safe[:, None]).squeeze(1)
    weighted = _weighted_logit_sum(z, options) if options.label_smoothing else None
    return _losses_from_statistics(lse, target_logit, weighted, tokens, options, z.shape[-1])


def _reduce(ce, z_loss, tokens: Tokens, options: Options, shape, total=torch.sum):
    """The loss the reduction makes of per-token losses, with the sum ``total``: the labels' shape for
    ``none``, 0-d otherwise (the mean divides the cross-entropy by the class-weight sum, the z-loss by
    the token count)."""
    if options.reduction == "none":
        return (ce + z_loss).reshape(shape)
    return total(ce * tokens.ce_scale) + total(z_loss * tokens.z_scale)


def _pytorch_loss(logits: torch.Tensor, labels: torch.Tensor, options: Options, shape) -> torch.Tensor:
    """PyTorch's ``cross_entropy`` of float logits (before the softcap) plus the z-loss, as
    torch-eager takes it."""
    z = _capped(logits, options.softcap)
    loss = F.cross_entropy(z, labels, weight=_class_weight(options, z.dtype), ignore_index=options.ignore_index,
                           reduction=options.reduction, label_smoothing=options.label_smoothing)
    if options.z_loss_multiplier:
        valid = labels != options.ignore_index
        z_loss = options.z_loss_multiplier * torch.where(valid, torch.logsumexp(z, -1).square(), 0.0)
        if options.reduction == "none":
            loss = loss + z_loss
        elif options.reduction == "sum":
            loss = loss + z_loss.sum()
        else:
            loss = loss + z_loss.sum() / valid.sum()
    return loss.reshape(shape) if options.reduction == "none" else loss


def _logit_gradient(z, lse, hit, class_weight, weight_sum, tokens: Tokens, options: Options, vocab: int,
                    ce_scale, z_scale):
    """d(sum_i ce_scale_i ce_i + z_scale_i zloss_i) / d(raw logits) for a block of soft-capped logits ``z``.

    ``hit`` marks each token's target class in the block, ``class_weight`` is the block's (None
    without class weights), ``weight_sum`` the sum of all V class weights (V without).
    """
    p = (z - lse[:, None]).exp()
    nll = (ce_scale * tokens.target * (1 - options.label_smoothing))[:, None]
    grad = nll * (p - hit.to(p.dtype))
    if options.label_smoothing:
        spread = (ce_scale * tokens.valid * options.label_smoothing / vocab)[:, None]
        grad = grad + spread * (weight_sum * p - (1.0 if class_weight is None else class_weight[None, :]))
    if options.z_loss_multiplier:
        grad = grad + (z_scale * tokens.valid * 2 * options.z_loss_multiplier * lse)[:, None] * p
    if options.softcap is not None:
        grad = grad * (1 - (z / options.softcap).square())
    return grad


def _gradient_inputs(options: Options, vocab: int, dtype: torch.dtype):
    """The class weights and their sum as ``_logit_gradient`` takes them."""
    class_weight = _class_weight(options, dtype)
    return class_weight, (vocab if class_weight is None else class_weight.sum())


def _hits(safe: torch.Tensor, v0: int, v1: int) -> torch.Tensor:
    return safe[:, None] == torch.arange(v0, v1, device=safe.device)[None, :]


def _upstream(grad_output: torch.Tensor, tokens: Tokens, options: Options, n: int):
    """Each token's (ce_scale, z_scale) times the upstream gradient."""
    if options.reduction == "none":
        g = _wide(grad_output).reshape(n)
        return tokens.ce_scale * g, tokens.z_scale * g
    g = _wide(grad_output).reshape(())
    return tokens.ce_scale * g, tokens.z_scale * g


def _needed(grads, needs_input_grad):
    return tuple(grad if needed else None for grad, needed in zip(grads, needs_input_grad))


# --- rounding of the logits --------------------------------------------------------------------------


def bias_after_rounded_matmul(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
                              label_smoothing=0.0, z_loss_multiplier=0.0, softcap=None, class_weight=None):
    """Bias added in float32 after the matmul rounded to the input dtype (Liger-Kernel's order)."""
    options = Options(ignore_index, reduction, label_smoothing, z_loss_multiplier, softcap, class_weight)
    h, y = _rows(hidden, labels)
    logits = _wide(F.linear(h, weight))
    if bias is not None:
        logits = logits + _wide(bias)
    return _pytorch_loss(logits, y, options, labels.shape)


def bias_in_input_dtype(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
                        label_smoothing=0.0, z_loss_multiplier=0.0, softcap=None, class_weight=None):
    """Bias added in the input dtype after the rounded matmul: two roundings of each logit."""
    options = Options(ignore_index, reduction, label_smoothing, z_loss_multiplier, softcap, class_weight)
    h, y = _rows(hidden, labels)
    logits = h @ weight.T
    if bias is not None:
        logits = logits + bias
    return _pytorch_loss(_wide(logits), y, options, labels.shape)


def all_float32(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                z_loss_multiplier=0.0, softcap=None, class_weight=None):
    """Everything in float32, logits and their gradient never rounded; gradients rounded once at the end."""
    options = Options(ignore_index, reduction, label_smoothing, z_loss_multiplier, softcap, class_weight)
    h, y = _rows(hidden, labels)
    return _pytorch_loss(F.linear(_wide(h), _wide(weight), _wide(bias)), y, options, labels.shape)


def loss_in_input_dtype(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
                        label_smoothing=0.0, z_loss_multiplier=0.0, softcap=None, class_weight=None):
    """torch-eager's arithmetic, with the loss returned in the input dtype (one more rounding)."""
    options = Options(ignore_index, reduction, label_smoothing, z_loss_multiplier, softcap, class_weight)
    h, y = _rows(hidden, labels)
    return _pytorch_loss(_wide(F.linear(h, weight, bias)), y, options, labels.shape).to(hidden.dtype)


def softcap_on_rounded_matmul(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
                              label_smoothing=0.0, z_loss_multiplier=0.0, softcap=None, class_weight=None):
    """Softcap in float32, as ``tanh(x * (1/cap)) * cap``, of the rounded matmul plus a float32 bias."""
    options = Options(ignore_index, reduction, label_smoothing, z_loss_multiplier, None, class_weight)
    h, y = _rows(hidden, labels)
    logits = _wide(F.linear(h, weight))
    if bias is not None:
        logits = logits + _wide(bias)
    if softcap is not None:
        logits = torch.tanh(logits * (1.0 / softcap)) * softcap
    return _pytorch_loss(logits, y, options, labels.shape)


# --- the logsumexp and the loss formula --------------------------------------------------------------


def log2_exp2_logsumexp(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
                        label_smoothing=0.0, z_loss_multiplier=0.0, softcap=None, class_weight=None):
    """The logsumexp through base 2, ``(m + log2(sum exp2(z log2(e) - m))) ln 2``, as Triton kernels take it."""
    options = Options(ignore_index, reduction, label_smoothing, z_loss_multiplier, softcap, class_weight)
    h, y = _rows(hidden, labels)
    z = _capped(_wide(F.linear(h, weight, bias)), softcap)
    scaled = z * LOG2_E
    top = scaled.max(-1, keepdim=True).values.detach()  # the logsumexp does not depend on the shift
    lse = (top.squeeze(-1) + torch.exp2(scaled - top).sum(-1).log2()) * LN_2
    tokens = _tokens(y, options, z.dtype)
    return _reduce(*_losses(z, lse, tokens, options), tokens, options, labels.shape)


def smoothing_as_mixture(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, z_loss_multiplier=0.0, softcap=None, class_weight=None):
    """Label smoothing as ``(1 - eps) nll + eps mean_c(-w_c log p_c)`` from log_softmax, not F.cross_entropy."""
    options = Options(ignore_index, reduction, label_smoothing, z_loss_multiplier, softcap, class_weight)
    h, y = _rows(hidden, labels)
    z = _capped(_wide(F.linear(h, weight, bias)), softcap)
    log_p = z.log_softmax(-1)
    tokens = _tokens(y, options, z.dtype)
    ce = -log_p.gather(1, tokens.safe[:, None]).squeeze(1) * tokens.target
    if label_smoothing:
        class_weights = _class_weight(options, z.dtype)
        weighted = -log_p if class_weights is None else -log_p * class_weights
        ce = (1 - label_smoothing) * ce + label_smoothing * torch.where(tokens.valid, weighted.mean(-1), 0.0)
    z_loss = z_loss_multiplier * torch.where(tokens.valid, torch.logsumexp(z, -1).square(), 0.0)
    return _reduce(ce, z_loss, tokens, options, labels.shape)


def _float32_per_token_losses(hidden, weight, labels, bias, options: Options):
    """Each token's cross-entropy and z-loss, in float32 from torch-eager's rounded logits, and its ``Tokens``."""
    h, y = _rows(hidden, labels)
    z = _capped(_wide(F.linear(h, weight, bias)), options.softcap)
    ce = F.cross_entropy(z, y, weight=_class_weight(options, z.dtype), ignore_index=options.ignore_index,
                         reduction="none", label_smoothing=options.label_smoothing)
    tokens = _tokens(y, options, z.dtype)
    z_loss = options.z_loss_multiplier * torch.where(tokens.valid, torch.logsumexp(z, -1).square(), 0.0)
    return ce, z_loss, tokens


def float32_sum_over_count(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
                           label_smoothing=0.0, z_loss_multiplier=0.0, softcap=None, class_weight=None):
    """Per-token losses in float32 reduced by a float32 sum over the count (the mean), not by F.cross_entropy."""
    options = Options(ignore_index, reduction, label_smoothing, z_loss_multiplier, softcap, class_weight)
    ce, z_loss, tokens = _float32_per_token_losses(hidden, weight, labels, bias, options)
    if reduction == "none":
        return (ce + z_loss).reshape(labels.shape)
    if reduction == "sum":
        return ce.sum() + z_loss.sum()
    return ce.sum() / tokens.target.sum() + z_loss.sum() / tokens.valid.sum()


def per_token_losses_in_input_dtype(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
                                    label_smoothing=0.0, z_loss_multiplier=0.0, softcap=None, class_weight=None):
    """Per-token losses stored in the input dtype (a kernel's loss buffer), then a float32 reduction."""
    options = Options(ignore_index, reduction, label_smoothing, z_loss_multiplier, softcap, class_weight)
    ce, z_loss, tokens = _float32_per_token_losses(hidden, weight, labels, bias, options)
    buffer = (ce + z_loss) if reduction == "none" else torch.stack([ce, z_loss])
    buffer = _wide(buffer.to(hidden.dtype))
    if reduction == "none":
        return buffer.reshape(labels.shape)
    return _reduce(buffer[0], buffer[1], tokens, options, labels.shape)


def softcap_in_input_dtype(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
                           label_smoothing=0.0, z_loss_multiplier=0.0, softcap=None, class_weight=None):
    """Softcap as ``tanh(z / cap) * cap`` in the input dtype, three roundings (Hugging Face's Gemma-2 head)."""
    options = Options(ignore_index, reduction, label_smoothing, z_loss_multiplier, None, class_weight)
    h, y = _rows(hidden, labels)
    z = F.linear(h, weight, bias)
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return _pytorch_loss(_wide(z), y, options, labels.shape)


def all_float64(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                z_loss_multiplier=0.0, softcap=None, class_weight=None):
    """Everything in float64 (more exact than torch-eager); the loss returned in float32, gradients rounded once."""
    wide = None if class_weight is None else class_weight.double()
    options = Options(ignore_index, reduction, label_smoothing, z_loss_multiplier, softcap, wide)
    h, y = _rows(hidden, labels)
    loss = _pytorch_loss(F.linear(h.double(), weight.double(), None if bias is None else bias.double()), y,
                         options, labels.shape)
    return loss if hidden.dtype == torch.float64 else loss.float()


class _SubnormalsFlushed(torch.autograd.Function):
    """The identity, whose backward flushes float32 subnormals of the gradient to zero."""

    @staticmethod
    def forward(ctx, logits):
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad):
        return torch.where(grad.abs() < torch.finfo(torch.float32).smallest_normal, 0.0, grad)


def logit_gradient_flushed_to_zero(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
                                   label_smoothing=0.0, z_loss_multiplier=0.0, softcap=None, class_weight=None):
    """torch-eager's arithmetic with the float32 logit gradient's subnormals flushed to zero (fast-math FTZ)."""
    options = Options(ignore_index, reduction, label_smoothing, z_loss_multiplier, softcap, class_weight)
    h, y = _rows(hidden, labels)
    return _pytorch_loss(_SubnormalsFlushed.apply(_wide(F.linear(h, weight, bias))), y, options, labels.shape)


def vocab_shards(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                 z_loss_multiplier=0.0, softcap=None, class_weight=None):
    """Two vocabulary shards combined as in tensor parallelism: global max, summed exp, the target from its shard."""
    options = Options(ignore_index, reduction, label_smoothing, z_loss_multiplier, softcap, class_weight)
    h, y = _rows(hidden, labels)
    vocab = weight.shape[0]
    bounds = [vocab * s // SHARDS for s in range(SHARDS + 1)]
    shards = []
    for v0, v1 in zip(bounds, bounds[1:]):
        shard_bias = None if bias is None else bias[v0:v1]
        shards.append((v0, v1, _capped(_wide(F.linear(h, weight[v0:v1], shard_bias)), softcap)))
    top = torch.stack([z.max(-1).values for _, _, z in shards if z.shape[-1]]).max(0).values.detach()
    lse = top + sum((z - top[:, None]).exp().sum(-1) for _, _, z in shards).log()
    tokens = _tokens(y, options, lse.dtype)
    target_logit = torch.zeros_like(lse)
    weighted = torch.zeros_like(lse)
    for v0, v1, z in shards:  # each shard holds the target logits of its own classes
        local = (tokens.safe - v0).clamp(0, max(v1 - v0 - 1, 0))
        mine = (tokens.safe >= v0) & (tokens.safe < v1)
        if v1 > v0:
            target_logit = target_logit + torch.where(mine, z.gather(1, local[:, None]).squeeze(1), 0.0)
        if label_smoothing:
            shard_weight = None if class_weight is None else class_weight[v0:v1].to(z.dtype)
            weighted = weighted + (z.sum(-1) if shard_weight is None else z @ shard_weight)
    ce, z_loss = _losses_from_statistics(lse, target_logit, weighted, tokens, options, vocab)
    return _reduce(ce, z_loss, tokens, options, labels.shape)


# --- the backward's structure -----------------------------------------------------------------------


def _pairwise_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum over the first axis in reversed order, as a pairwise tree (padded with zeros)."""
    values = values.flip(0)
    while values.shape[0] > 1:
        if values.shape[0] % 2:
            values = torch.cat([values, values.new_zeros(1, *values.shape[1:])])
        values = values[0::2] + values[1::2]
    return values.sum(0) if values.shape[0] == 0 else values[0]


class _ReorderedSums(torch.autograd.Function):
    """torch-eager's roundings, with every sum over tokens taken in another order: the reduced loss and
    the bias gradient as reversed pairwise trees, the weight gradient over 64-token blocks in reverse."""

    @staticmethod
    def forward(ctx, h, weight, bias, labels, options):
        z = _capped(_wide(F.linear(h, weight, bias)), options.softcap)
        lse = torch.logsumexp(z, -1)
        tokens = _tokens(labels, options, z.dtype)
        ce, z_loss = _losses(z, lse, tokens, options)
        ctx.save_for_backward(h, weight, bias, labels)
        ctx.options, ctx.lse = options, lse
        if options.reduction == "none":
            return ce + z_loss
        return _pairwise_sum(ce * tokens.ce_scale) + _pairwise_sum(z_loss * tokens.z_scale)

    @staticmethod
    def backward(ctx, grad_output):
        h, weight, bias, labels = ctx.saved_tensors
        options, lse = ctx.options, ctx.lse
        z = _capped(_wide(F.linear(h, weight, bias)), options.softcap)
        tokens = _tokens(labels, options, z.dtype)
        ce_scale, z_scale = _upstream(grad_output, tokens, options, h.shape[0])
        class_weight, weight_sum = _gradient_inputs(options, z.shape[1], z.dtype)
        grad = _logit_gradient(z, lse, _hits(tokens.safe, 0, z.shape[1]), class_weight, weight_sum, tokens, options,
                               z.shape[1], ce_scale, z_scale)
        dx = _wide(grad.to(h.dtype))  # the logits' gradient in the input dtype, as torch-eager rounds it
        grad_h = (dx @ _wide(weight)).to(h.dtype)
        grad_w = torch.zeros_like(_wide(weight))
        for s in reversed(range(0, h.shape[0], SUM_BLOCK)):
            grad_w += dx[s:s + SUM_BLOCK].T @ _wide(h[s:s + SUM_BLOCK])
        grad_b = None if bias is None else _pairwise_sum(dx).to(bias.dtype)
        return (*_needed((grad_h, grad_w.to(weight.dtype), grad_b), ctx.needs_input_grad), None, None)


def reordered_sums(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                   z_loss_multiplier=0.0, softcap=None, class_weight=None):
    """Reduced loss and bias gradient as reversed pairwise sums, weight gradient over reversed 64-token blocks."""
    options = Options(ignore_index, reduction, label_smoothing, z_loss_multiplier, softcap, class_weight)
    h, y = _rows(hidden, labels)
    loss = _ReorderedSums.apply(h, weight, bias, y, options)
    return loss.reshape(labels.shape) if reduction == "none" else loss


class _Recomputed(torch.autograd.Function):
    """A fused, memory-saving loss: logits of one token chunk and one class block at a time, an online
    (running max, running sum) logsumexp, nothing of size N x V kept; the backward recomputes each
    block's logits, rounds their gradient to the input dtype (for tensor-core matmuls) and accumulates
    all three gradients in float32, each rounded once at the end.

    ``rounded_logits``: each block's logits are ``F.linear`` in the input dtype (rounded, as
    torch-eager's), else float32 products of the input-dtype operands (a Triton ``tl.dot``).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, labels, options, token_chunk, class_block, rounded_logits):
        n, vocab = h.shape[0], weight.shape[0]
        acc = _wide(h[:0]).dtype
        tokens = _tokens(labels, options, acc)
        lse = torch.empty(n, dtype=acc, device=h.device)
        target_logit = torch.zeros(n, dtype=acc, device=h.device)
        weighted = torch.zeros(n, dtype=acc, device=h.device)
        class_weight = _class_weight(options, acc)
        for s in range(0, n, token_chunk):
            e = min(s + token_chunk, n)
            top = torch.full((e - s,), -torch.inf, dtype=acc, device=h.device)
            total = torch.zeros(e - s, dtype=acc, device=h.device)
            for v0 in range(0, vocab, class_block):
                v1 = min(v0 + class_block, vocab)
                z = _block_logits(h[s:e], weight, bias, v0, v1, options.softcap, rounded_logits)
                new_top = torch.maximum(top, z.max(-1).values)
                total = total * (top - new_top).exp() + (z - new_top[:, None]).exp().sum(-1)
                top = new_top
                # where, not a product with the hits: a logit that overflowed to -inf times 0 is NaN
                target_logit[s:e] += torch.where(_hits(tokens.safe[s:e], v0, v1), z, 0.0).sum(-1)
                if options.label_smoothing:
                    weighted[s:e] += z.sum(-1) if class_weight is None else z @ class_weight[v0:v1]
            lse[s:e] = top + total.log()
        ce, z_loss = _losses_from_statistics(lse, target_logit, weighted, tokens, options, vocab)
        ctx.save_for_backward(h, weight, bias, labels, lse)
        ctx.options, ctx.blocks = options, (token_chunk, class_block, rounded_logits)
        if options.reduction == "none":
            return ce + z_loss
        return (ce * tokens.ce_scale).sum() + (z_loss * tokens.z_scale).sum()

    @staticmethod
    def backward(ctx, grad_output):
        h, weight, bias, labels, lse = ctx.saved_tensors
        options, (token_chunk, class_block, rounded_logits) = ctx.options, ctx.blocks
        n, vocab = h.shape[0], weight.shape[0]
        tokens = _tokens(labels, options, lse.dtype)
        ce_scale, z_scale = _upstream(grad_output, tokens, options, n)
        class_weight, weight_sum = _gradient_inputs(options, vocab, lse.dtype)
        grad_h = torch.zeros_like(_wide(h))
        grad_w = torch.zeros_like(_wide(weight))
        grad_b = torch.zeros(vocab, dtype=lse.dtype, device=h.device)
        for s in range(0, n, token_chunk):
            e = min(s + token_chunk, n)
            chunk = _slice_tokens(tokens, s, e)
            for v0 in range(0, vocab, class_block):
                v1 = min(v0 + class_block, vocab)
                z = _block_logits(h[s:e], weight, bias, v0, v1, options.softcap, rounded_logits)
                block_weight = None if class_weight is None else class_weight[v0:v1]
                grad = _logit_gradient(z, lse[s:e], _hits(chunk.safe, v0, v1), block_weight, weight_sum, chunk,
                                       options, vocab, ce_scale[s:e], z_scale[s:e])
                dx = _wide(grad.to(h.dtype))
                grad_h[s:e] += dx @ _wide(weight[v0:v1])
                grad_w[v0:v1] += dx.T @ _wide(h[s:e])
                grad_b[v0:v1] += dx.sum(0)
        grads = (grad_h.to(h.dtype), grad_w.to(weight.dtype), None if bias is None else grad_b.to(bias.dtype))
        return (*_needed(grads, ctx.needs_input_grad), None, None, None, None, None)


def _block_logits(h, weight, bias, v0, v1, softcap, rounded):
    """Soft-capped logits of classes ``v0:v1`` in the accumulation dtype."""
    block_bias = None if bias is None else bias[v0:v1]
    if rounded:
        return _capped(_wide(F.linear(h, weight[v0:v1], block_bias)), softcap)
    raw = _wide(h) @ _wide(weight[v0:v1]).T
    return _capped(raw if block_bias is None else raw + _wide(block_bias), softcap)


def _slice_tokens(tokens: Tokens, s: int, e: int) -> Tokens:
    return Tokens(tokens.labels[s:e], tokens.valid[s:e], tokens.safe[s:e], tokens.target[s:e],
                  tokens.ce_scale[s:e], tokens.z_scale[s:e])


def online_logsumexp_blocks(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
                            label_smoothing=0.0, z_loss_multiplier=0.0, softcap=None, class_weight=None):
    """Online logsumexp over 1000-class blocks of float32 logits never rounded (a fused Triton kernel)."""
    options = Options(ignore_index, reduction, label_smoothing, z_loss_multiplier, softcap, class_weight)
    h, y = _rows(hidden, labels)
    loss = _Recomputed.apply(h, weight, bias, y, options, max(h.shape[0], 1), CLASS_BLOCK, False)
    return loss.reshape(labels.shape) if reduction == "none" else loss


def token_chunks(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                 z_loss_multiplier=0.0, softcap=None, class_weight=None):
    """Chunks of 100 tokens, logits recomputed in the backward, gradients accumulated in float32 and rounded once."""
    options = Options(ignore_index, reduction, label_smoothing, z_loss_multiplier, softcap, class_weight)
    h, y = _rows(hidden, labels)
    loss = _Recomputed.apply(h, weight, bias, y, options, TOKEN_CHUNK, max(weight.shape[0], 1), True)
    return loss.reshape(labels.shape) if reduction == "none" else loss


class _ForwardGradients(torch.autograd.Function):
    """A fused loss that forms its gradients in the forward (Liger-Kernel, Cut Cross-Entropy): each chunk's
    logits' gradient for a unit upstream gradient is computed with the loss and stored in the input
    dtype; with a reduced loss the three gradients are formed in the forward too, and the backward
    only scales them by the upstream gradient, in the input dtype (Liger's ``element_mul``). With
    ``reduction="none"`` the backward scales each token's stored gradient before the matmuls.

    ``chunk``: tokens per chunk (None: all at once). ``split_bias``: the bias is added in the input
    dtype after the rounded matmul (Liger's ``logits_chunk + bias``: two roundings). ``float32_sums``:
    the weight and bias gradients accumulate over chunks in float32 and are rounded once; otherwise
    each chunk's gradient is one input-dtype matmul (the unchunked kernel has one chunk).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, labels, options, chunk, split_bias, float32_sums):
        n, vocab = h.shape[0], weight.shape[0]
        chunk = chunk or max(n, 1)
        acc = _wide(h[:0]).dtype
        tokens = _tokens(labels, options, acc)
        class_weight, weight_sum = _gradient_inputs(options, vocab, acc)
        losses, stored = [], []
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            if split_bias:
                raw = h[s:e] @ weight.T
                raw = raw if bias is None else raw + bias
            else:
                raw = F.linear(h[s:e], weight, bias)
            z = _capped(_wide(raw), options.softcap)
            lse = torch.logsumexp(z, -1)
            part = _slice_tokens(tokens, s, e)
            losses.append(_losses(z, lse, part, options))
            grad = _logit_gradient(z, lse, _hits(part.safe, 0, vocab), class_weight, weight_sum, part, options, vocab,
                                   part.ce_scale, part.z_scale)
            stored.append(grad.to(h.dtype))
        ce = torch.cat([c for c, _ in losses]) if losses else h.new_zeros(0, dtype=acc)
        z_loss = torch.cat([z for _, z in losses]) if losses else h.new_zeros(0, dtype=acc)
        dlogits = torch.cat(stored) if stored else h.new_zeros(0, vocab)
        ctx.options, ctx.setup = options, (chunk, float32_sums, bias is not None)
        if options.reduction == "none":
            ctx.save_for_backward(h, weight, dlogits)
            return ce + z_loss
        # Outputs of this forward, not inputs: kept as they are (a second backward reads them again).
        ctx.grads = _chunked_gradients(h, weight, dlogits, chunk, float32_sums, bias is not None, ctx.needs_input_grad)
        return (ce * tokens.ce_scale).sum() + (z_loss * tokens.z_scale).sum()

    @staticmethod
    def backward(ctx, grad_output):
        chunk, float32_sums, has_bias = ctx.setup
        if ctx.options.reduction == "none":
            h, weight, dlogits = ctx.saved_tensors
            scaled = (_wide(dlogits) * _wide(grad_output)[:, None]).to(h.dtype)
            grads = _chunked_gradients(h, weight, scaled, chunk, float32_sums, has_bias, ctx.needs_input_grad)
        else:
            g = grad_output.reshape(())
            grads = tuple(None if t is None else t * g.to(t.dtype) for t in ctx.grads)
        return (*_needed(grads, ctx.needs_input_grad), None, None, None, None, None)


def _chunked_gradients(h, weight, dlogits, chunk, float32_sums, has_bias, needs):
    """The three gradients of input-dtype logit gradients ``dlogits``, chunk by chunk."""
    n = h.shape[0]
    grad_h = torch.empty_like(h) if needs[0] else None
    grad_w = torch.zeros_like(_wide(weight) if float32_sums else weight) if needs[1] else None
    grad_b = (torch.zeros(weight.shape[0], dtype=_wide(h[:0]).dtype if float32_sums else h.dtype, device=h.device)
              if has_bias and needs[2] else None)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        d = dlogits[s:e]
        if grad_h is not None:
            grad_h[s:e] = d @ weight  # one input-dtype matmul per chunk: rounded once
        if grad_w is not None:
            grad_w += _wide(d).T @ _wide(h[s:e]) if float32_sums else d.T @ h[s:e]
        if grad_b is not None:
            grad_b += _wide(d).sum(0) if float32_sums else d.sum(0)
    return (grad_h, None if grad_w is None else grad_w.to(weight.dtype), None if grad_b is None else grad_b.to(h.dtype))


def dlogits_in_forward(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
                       label_smoothing=0.0, z_loss_multiplier=0.0, softcap=None, class_weight=None):
    """The logits' gradient formed in the forward, stored in the input dtype, scaled by grad_output in the backward."""
    options = Options(ignore_index, reduction, label_smoothing, z_loss_multiplier, softcap, class_weight)
    h, y = _rows(hidden, labels)
    loss = _ForwardGradients.apply(h, weight, bias, y, options, None, False, False)
    return loss.reshape(labels.shape) if reduction == "none" else loss


def weight_grad_float32_across_chunks(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
                                      label_smoothing=0.0, z_loss_multiplier=0.0, softcap=None, class_weight=None):
    """Liger's 256-token chunks with the weight and bias gradients accumulated in float32, rounded once."""
    options = Options(ignore_index, reduction, label_smoothing, z_loss_multiplier, softcap, class_weight)
    h, y = _rows(hidden, labels)
    loss = _ForwardGradients.apply(h, weight, bias, y, options, GRADIENT_CHUNK, True, True)
    return loss.reshape(labels.shape) if reduction == "none" else loss


VARIANTS = (
    bias_after_rounded_matmul,
    bias_in_input_dtype,
    all_float32,
    loss_in_input_dtype,
    softcap_on_rounded_matmul,
    log2_exp2_logsumexp,
    smoothing_as_mixture,
    float32_sum_over_count,
    per_token_losses_in_input_dtype,
    softcap_in_input_dtype,
    all_float64,
    logit_gradient_flushed_to_zero,
    vocab_shards,
    reordered_sums,
    online_logsumexp_blocks,
    token_chunks,
    dlogits_in_forward,
    weight_grad_float32_across_chunks,
)
