"""The project's own memory-efficient LM-head loss in pure PyTorch.

Tokens are processed in chunks. Each chunk's logits are written by the matmul into one float32
buffer, which two steps turn, in place, into the gradient of the logits:

1. row statistics: the options that change the logits (the logit scale, and a softcap's 1 / cap,
   as the matmul's own scalar factor; then ``_to_logits_``), an in-place ``softmax`` (one exp per
   logit), from which the loss, the z-loss and the log-sum-exp are read per token
   (logsumexp = z_y - log p_y);
2. the gradient, divided by its per-token scale alpha: the label's and the smoothing's terms and
   the chain rule of the options that changed the logits. alpha itself is applied on the
   matmuls' small operands (rows of grad_hidden; a scaled (tokens, D) copy of the chunk's hidden
   for the weight gradient), not in a pass over the buffer.

The gradient is then projected onto the gradients of hidden, weight and bias (float32
accumulators for weight and bias). Peak extra memory is the chunk's buffers, sized from a budget
relative to the lower bound (the gradients of hidden and weight), plus the gradients themselves.

With ``reduction="mean"``/``"sum"`` the gradients are computed in the forward (the upstream
gradient is a scalar, applied in backward unless it is 1 and on the CPU). With
``reduction="none"`` the upstream gradient is per token, so the forward computes the losses only
and backward recomputes each chunk with it (as Liger-Kernel does).

Gradient of the per-token loss with respect to the logits z, with p = softmax(z), target y, class
weights w (all ones without ``class_weight``), smoothing eps, V classes and z-loss multiplier m:

    d/dz_j = p_j * ((1 - eps) * w_y + eps / V * sum(w)) - (1 - eps) * w_y * [j == y] - eps / V * w_j
             + 2 * m * logsumexp(z) * p_j

then multiplied by d(logits)/d(raw matmul output): the logit scale s, and 1 - tanh(s raw / cap)^2
with a softcap (tanh kept in a second float32 buffer for it).

Low-precision inputs (bfloat16, float16): statistics and gradient are computed in the float32
buffer; the gradient is written into a buffer of the input dtype for the two gradient matmuls.
On CUDA the logits matmul writes float32 directly and the weight gradient is accumulated in
float32 by the matmul itself (``out_dtype``); PyTorch's CPU matmuls have no ``out_dtype``, so
there the logits are rounded to the input dtype first (as torch-eager's are) and the weight
gradient is accumulated from the float32 buffer and a float32 copy of hidden made once per pass.

Float32 on the CPU: the matmuls go through oneDNN where torch has it (``harness.onednn``), in
blocks of classes, since it runs at about twice torch.mm's rate on the project's AMD CPU machine;
``Chunked(onednn=False)`` keeps torch.mm, as a torch without oneDNN does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from harness.adapter import Capabilities, Implementation
from harness.onednn import onednn_linear
from harness.spec import LossOutput, LossSpec

# The chunk's buffers may take this fraction of the lower bound (the bytes of the gradients of
# hidden and weight), so peak memory stays near twice the lower bound; larger chunks make the
# matmuls faster (docs/measurements/2026-11-24-chunked.md, "Chunk sizing").
CHUNK_BUDGET_FRACTION = 1.0

# Small cases get at least this much: each chunk costs a few threaded passes and a pass over the
# (V, D) weight-gradient accumulator, which small chunks do not repay. It stays below 32 MiB, the
# largest allocation glibc serves from the heap, so the buffer's pages are reused from call to call
# instead of being mapped and faulted in afresh.
MIN_CHUNK_BUFFER_BYTES = 31 * 2**20

# Below this many tokens per chunk the matmuls turn skinny; a case whose budget allows fewer takes
# the memory.
MIN_CHUNK_TOKENS = 16


def lower_bound_bytes(num_tokens: int, vocab: int, dim: int, itemsize: int, has_bias: bool) -> int:
    """The gradients of hidden, weight (and bias) in the input dtype: what no implementation can avoid."""
    return (num_tokens * dim + vocab * dim + (vocab if has_bias else 0)) * itemsize


def buffer_bytes_per_token(vocab: int, dtype: torch.dtype, spec: LossSpec, want_grad: bool) -> int:
    """Bytes of chunk buffers per token: float32 logits, plus (with gradients) the softcap's tanh in
    float32, kept for its chain rule, and, for low-precision inputs, the gradient in the input dtype."""
    per_class = 4
    if want_grad and spec.softcap is not None:
        per_class += 4
    if want_grad and dtype != torch.float32:
        per_class += dtype.itemsize
    return per_class * vocab


def default_chunk_size(
    num_tokens: int, vocab: int, dim: int, *, dtype: torch.dtype, spec: LossSpec, has_bias: bool, want_grad: bool,
    workspace_bytes: int = 0,
) -> int:
    """Tokens per chunk: as many as the budget allows (less the matmuls' ``workspace_bytes``), split
    evenly over the chunks that needs."""
    budget = max(
        CHUNK_BUDGET_FRACTION * lower_bound_bytes(num_tokens, vocab, dim, dtype.itemsize, has_bias) - workspace_bytes,
        MIN_CHUNK_BUFFER_BYTES,
    )
    most = max(MIN_CHUNK_TOKENS, int(budget // buffer_bytes_per_token(vocab, dtype, spec, want_grad)))
    chunks = max(1, math.ceil(num_tokens / most))
    # Even chunks: a last chunk of a few tokens would be a skinny, slow matmul of its own.
    return max(1, math.ceil(num_tokens / chunks))


@dataclass(frozen=True)
class _Batch:
    """What every chunk needs from the whole batch, computed once from the labels before any chunk.

    Per-token values that enter a chunk's arithmetic are (N, 1) columns, the shape its gathers give
    and its (tokens, V) and (tokens, D) operands broadcast against: no reshaping per chunk."""

    valid: torch.Tensor  # (N,) bool: the label is not ignore_index
    safe_labels: torch.Tensor  # (N, 1) int64: ignored labels replaced by 0, so they can index
    num_valid: torch.Tensor  # z-loss's mean denominator
    ce_denominator: torch.Tensor  # cross-entropy's mean denominator (the labels' class weights)
    label_weights: torch.Tensor | None  # (N, 1) float32: the labels' class weights w_y; only with class_weight
    smoothing_weights: torch.Tensor | None  # (V, 1) float32: w, or ones; only with label smoothing
    smoothing_sum: torch.Tensor | int | None  # sum(w), V without class_weight; only with label smoothing

    @staticmethod
    def of(labels: torch.Tensor, spec: LossSpec, vocab: int) -> _Batch:
        valid = labels != spec.ignore_index
        safe = (labels * valid).long()[:, None]  # ignored labels times 0
        num_valid = valid.sum().to(torch.float32)
        class_weight = label_weights = None
        ce_denominator = num_valid
        if spec.class_weight is not None:
            class_weight = spec.class_weight.to(labels.device, torch.float32)
            label_weights = class_weight[safe]
            ce_denominator = (label_weights[:, 0] * valid).sum()
        smoothing = smoothing_sum = None
        if spec.label_smoothing:
            if class_weight is None:
                smoothing, smoothing_sum = torch.ones(vocab, 1, device=labels.device), vocab
            else:
                smoothing, smoothing_sum = class_weight[:, None], class_weight.sum()
        return _Batch(valid, safe, num_valid, ce_denominator, label_weights, smoothing, smoothing_sum)


@dataclass(frozen=True)
class _GradientTerms:
    """Per-token coefficients of d(loss)/d(logits) = alpha p - beta [j == y] - gamma w_j (before the
    softcap's chain rule), (N, 1) columns computed for every token of the pass at once rather than
    per chunk. alpha's z-loss part, 2 m s z_scale logsumexp, needs the token's logsumexp and is
    completed per chunk. ce_scale and z_scale are d(loss)/d(the token's cross-entropy, z-loss term):
    the reduction and, with reduction="none", the upstream gradient; s is the logit scale."""

    softmax: torch.Tensor  # alpha without the z-loss: s ce_scale ((1 - eps) w_y + eps / V sum(w))
    label: torch.Tensor | None  # beta = s ce_scale (1 - eps) w_y; None where it equals alpha (no eps, no m)
    smoothing: torch.Tensor | None  # gamma = s ce_scale eps / V; only with label smoothing
    z_loss: torch.Tensor | None  # 2 m s z_scale; only with z-loss

    @staticmethod
    def of(batch: _Batch, spec: LossSpec, vocab: int, token_scale: torch.Tensor | None) -> _GradientTerms:
        eps, m, scale = spec.label_smoothing, spec.z_loss_multiplier, spec.logit_scale
        valid = batch.valid[:, None]
        if spec.reduction == "mean":
            ce_scale = torch.where(valid, batch.ce_denominator.reciprocal(), 0.0)
            z_scale = torch.where(valid, batch.num_valid.reciprocal(), 0.0) if m else None
        else:
            ce_scale = z_scale = valid.float()
        if token_scale is not None:
            upstream = token_scale.float()[:, None]
            ce_scale = ce_scale * upstream
            z_scale = z_scale * upstream if m else None
        # Without class weights the factors are numbers, and a factor of 1 is not multiplied in.
        label = scale * (1 - eps) if batch.label_weights is None else scale * (1 - eps) * batch.label_weights
        softmax = label + scale * eps / vocab * batch.smoothing_sum if eps else label
        return _GradientTerms(
            softmax=ce_scale if isinstance(softmax, float) and softmax == 1.0 else ce_scale * softmax,
            label=ce_scale * label if eps or m else None,
            smoothing=ce_scale * (scale * eps / vocab) if eps else None,
            z_loss=z_scale * (2 * m * scale) if m else None,
        )


def _matmul_scale(spec: LossSpec) -> float:
    """The factor on the raw logits that the logits matmul applies itself (its alpha and, with a bias,
    its beta), so that it costs no pass of its own: the logit scale, over the softcap with one."""
    return spec.logit_scale if spec.softcap is None else spec.logit_scale / spec.softcap


def _to_logits_(scaled: torch.Tensor, spec: LossSpec, tanh: torch.Tensor | None) -> None:
    """Turn the logits matmul's output (raw times ``_matmul_scale``) into the logits the softmax
    sees, in place. With a softcap, ``tanh`` (None when no gradient is wanted) keeps
    tanh(s raw / cap) for ``_apply_softcap_chain_rule_``."""
    if spec.softcap is None:
        return
    if tanh is None:
        scaled.tanh_().mul_(spec.softcap)
    else:
        torch.tanh(scaled, out=tanh)
        torch.mul(tanh, spec.softcap, out=scaled)


def _apply_softcap_chain_rule_(grad: torch.Tensor, tanh: torch.Tensor) -> None:
    """grad *= d(cap tanh(x / cap))/dx = 1 - tanh(x / cap)^2, in one pass (tanh's own backward op)."""
    torch.ops.aten.tanh_backward.grad_input(grad, tanh, grad_input=grad)


# On the CPU, float32 matmuls go through oneDNN where torch has it (``harness.onednn``: about twice
# torch.mm's rate on the project's AMD CPU machine). Its linear returns a new tensor, so the head
# is cut into blocks of classes: each product is a small temporary, copied into place (or added to
# the weight gradient) while it is in cache, and oneDNN's reorder of a weight operand covers a
# block, never the whole head. Larger blocks add memory, not speed
# (docs/measurements/2026-12-02-chunked-onednn.md).
ONEDNN_BLOCK_BYTES = 2**20
# What they and the allocator's slack add at the peak, left to them in the chunk's budget so that
# buffers and temporaries together keep to it (measured on the floor case, same page).
ONEDNN_WORKSPACE_BYTES = 12 * 2**20


def onednn_vocab_block(tokens: int, dim: int) -> int:
    """Classes per oneDNN product: its (tokens, block) and (block, D) float32 temporaries take about
    ``ONEDNN_BLOCK_BYTES`` (each at least 64 classes, a multiple of 64)."""
    return max(64, ONEDNN_BLOCK_BYTES // (4 * max(tokens, dim)) // 64 * 64)


def _onednn_logits_matmul(out, hidden, weight, bias, scale):
    """(hidden @ weight.T + bias) * scale through oneDNN, a block of classes at a time, written into
    ``out`` (float32, CPU), which is returned; a product of one block needs no copy and is returned
    itself."""
    linear, size = onednn_linear(), onednn_vocab_block(*hidden.shape)
    if size >= weight.shape[0] and scale == 1.0:
        return linear(hidden, weight, bias, "none", [], "")
    for start in range(0, weight.shape[0], size):
        block = slice(start, start + size)
        part = linear(hidden, weight[block], None if bias is None else bias[block], "none", [], "")
        if scale == 1.0:
            out[:, block].copy_(part)
        else:
            torch.mul(part, scale, out=out[:, block])
    return out


def _onednn_gradient_matmuls(grad, weight, hidden_scaled, alpha, grad_h, grad_w, first):
    """grad_h = (grad @ weight) * alpha and grad_w (+)= grad.T @ hidden_scaled, a block of classes at
    a time while the block of ``grad`` is in cache; grad_h is accumulated over the blocks in a
    (tokens, D) temporary. Returns the weight-gradient accumulator: the first chunk's product of one
    block becomes it, with no copy.

    oneDNN is slower than torch.mm on the weight gradient of a chunk of more tokens than D (its K
    longer than its N), so such chunks keep torch.mm for it; and it reads a transposed source
    slowly, so the block of the gradient is transposed first (figures:
    docs/measurements/2026-12-02-chunked-onednn.md)."""
    linear = onednn_linear()
    onednn_weight_grad = grad_w is not None and grad.shape[0] <= weight.shape[1]
    if grad_w is not None and not onednn_weight_grad:
        _accumulate_weight_grad(grad_w, grad, hidden_scaled, first)
    hidden_t = hidden_scaled.t().contiguous() if onednn_weight_grad else None  # (D, tokens): oneDNN's weight operand
    acc, size = None, onednn_vocab_block(grad.shape[0], weight.shape[1])
    for start in range(0, weight.shape[0], size):
        block = slice(start, start + size)
        grad_block = grad[:, block]
        if grad_h is not None:
            part = linear(grad_block, weight[block].t(), None, "none", [], "")
            acc = part if acc is None else acc.add_(part)
        if onednn_weight_grad:
            part = linear(grad_block.t().contiguous(), hidden_t, None, "none", [], "")
            if first and size >= weight.shape[0]:
                grad_w = part
            elif first:
                grad_w[block].copy_(part)
            else:
                grad_w[block].add_(part)
    if grad_h is not None:
        torch.mul(acc, alpha, out=grad_h)
    return grad_w


def _logits_matmul(
    out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> None:
    """``out`` (float32) = (hidden @ weight.T + bias) * scale."""
    if hidden.dtype == out.dtype:
        if bias is not None:
            torch.addmm(bias, hidden, weight.t(), beta=scale, alpha=scale, out=out)
        elif scale == 1.0:
            torch.mm(hidden, weight.t(), out=out)
        else:  # with beta = 0 the matmul ignores out's old contents, NaNs included
            out.addmm_(hidden, weight.t(), beta=0, alpha=scale)
        return
    if out.is_cuda:
        torch.mm(hidden, weight.t(), out_dtype=out.dtype, out=out)
        if bias is not None:
            out.add_(bias)
    else:  # no mixed-dtype matmul on the CPU: round to the input dtype first, as torch-eager does
        out.copy_(torch.nn.functional.linear(hidden, weight, bias))
    if scale != 1.0:
        out.mul_(scale)


def _accumulate_weight_grad(grad_w: torch.Tensor, grad: torch.Tensor, hidden: torch.Tensor, first: bool) -> None:
    """grad_w (float32) += grad.T @ hidden, accumulated in float32; the first chunk overwrites
    (no separate pass to zero the (V, D) accumulator)."""
    if grad.dtype == grad_w.dtype and hidden.dtype == grad_w.dtype:
        if first:
            torch.mm(grad.t(), hidden, out=grad_w)
        else:
            grad_w.addmm_(grad.t(), hidden)
    elif first:  # CUDA: the matmul accumulates into float32 itself
        torch.mm(grad.t(), hidden, out_dtype=grad_w.dtype, out=grad_w)
    else:
        torch.addmm(grad_w, grad.t(), hidden, out_dtype=grad_w.dtype, out=grad_w)


def _rows_label_log_probability(
    hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: LossSpec
):
    """log p at the label of a few rows, z_y - logsumexp(z), recomputed from their logits."""
    logits = torch.empty(hidden.shape[0], weight.shape[0], dtype=torch.float32, device=hidden.device)
    _logits_matmul(logits, hidden, weight, bias, _matmul_scale(spec))
    _to_logits_(logits, spec, None)
    return logits.gather(1, labels) - torch.logsumexp(logits, 1, keepdim=True)


# Below this log p at the label, p has lost precision to float32's subnormals (or underflowed to
# 0), so the token's log p at the label is recomputed from its logits instead of read off p.
LOG_TINY_PROBABILITY = math.log(1e-30)


def _chunked_pass(hidden, weight, bias, batch, spec, chunk_size, needs, onednn, token_scale=None):
    """Run every chunk; return per-token (ce, z) before any reduction (z is None without z-loss) and
    the requested gradients (float32 accumulators for weight and bias). ``onednn``: the float32 CPU
    matmuls go through oneDNN (``onednn_linear``)."""
    # One contiguous copy per pass, if any, instead of a strided matmul (or a copy) per chunk; oneDNN
    # reads a strided bias as if it were contiguous.
    hidden, weight = hidden.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    num_tokens, vocab = hidden.shape[0], weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    eps, m = spec.label_smoothing, spec.z_loss_multiplier
    need_h, need_w, need_b = needs
    want_grad = need_h or need_w or need_b
    ce_all = torch.empty(num_tokens, 1, dtype=torch.float32, device=device)
    z_all = torch.empty_like(ce_all) if m else None
    grad_h = torch.empty_like(hidden) if need_h else None
    # Zeros only for an empty batch: otherwise the first chunk's matmul overwrites them.
    new_accumulator = torch.zeros if num_tokens == 0 else torch.empty
    grad_w = new_accumulator(weight.shape, dtype=torch.float32, device=device) if need_w else None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=device) if need_b else None
    if num_tokens == 0:
        return ce_all[:, 0], None if z_all is None else z_all[:, 0], grad_h, grad_w, grad_b
    if chunk_size is None:
        chunk_size = default_chunk_size(
            num_tokens, vocab, hidden.shape[1], dtype=dtype, spec=spec, has_bias=bias is not None, want_grad=want_grad,
            workspace_bytes=ONEDNN_WORKSPACE_BYTES if onednn else 0,
        )
    rows = min(chunk_size, num_tokens)
    # The chunk's buffers, allocated once and reused by every chunk. The float32 ones (logits, and a
    # softcap's tanh) are one allocation: glibc returns the heap's free top to the system once it
    # exceeds a threshold that adapts to twice the largest allocation freed, which two equal buffers
    # freed together exceed, and the next call would fault all their pages in again.
    keep_tanh = want_grad and spec.softcap is not None
    float_bufs = torch.empty(2 if keep_tanh else 1, rows, vocab, dtype=torch.float32, device=device)
    logits_buf, tanh_buf = float_bufs[0], float_bufs[1] if keep_tanh else None
    low_precision = dtype != torch.float32
    grad_buf = torch.empty(rows, vocab, dtype=dtype, device=device) if want_grad and low_precision else None
    hidden_for_w = hidden.float() if need_w and low_precision and device.type != "cuda" else hidden
    matmul_scale = _matmul_scale(spec)
    if want_grad:
        terms = _GradientTerms.of(batch, spec, vocab, token_scale)
        if terms.label is None:  # beta = alpha: the gradient over alpha is p - 1 at the label
            minus_ones = torch.full((rows, 1), -1.0, device=device)

    for start in range(0, num_tokens, rows):
        end = min(start + rows, num_tokens)
        z = logits_buf[: end - start]
        tanh = None if tanh_buf is None else tanh_buf[: end - start]
        if onednn:
            z = _onednn_logits_matmul(z, hidden[start:end], weight, bias, matmul_scale)
        else:
            _logits_matmul(z, hidden[start:end], weight, bias, matmul_scale)
        _to_logits_(z, spec, tanh)

        # Row statistics: softmax in place (each exp computed once); logsumexp = z_y - log p_y.
        y = batch.safe_labels[start:end]
        if eps or m:  # the label's logit, before the softmax overwrites it
            z_y = z.gather(1, y)
        if eps:  # -sum_j w_j log p_j = sum(w) (lse - max) - sum_j w_j (z_j - max): shifted, so no large sums cancel
            shift = z.amax(1, keepdim=True)
            shifted_dot = z.sub_(shift) @ batch.smoothing_weights
        torch.softmax(z, 1, out=z)
        log_p_y = z.gather(1, y).log_()
        if log_p_y.amin().item() < LOG_TINY_PROBABILITY:
            tiny = (log_p_y[:, 0] < LOG_TINY_PROBABILITY).nonzero()[:, 0]
            log_p_y[tiny] = _rows_label_log_probability(hidden[tiny + start], y[tiny], weight, bias, spec)
        ce = torch.neg(log_p_y, out=ce_all[start:end])
        if batch.label_weights is not None:
            ce.mul_(batch.label_weights[start:end])
        if eps:
            ce.mul_(1 - eps).add_(eps / vocab * (batch.smoothing_sum * ((z_y - shift) - log_p_y) - shifted_dot))
        if m:
            lse = z_y - log_p_y
            torch.mul(lse.square(), m, out=z_all[start:end])
        if not want_grad:
            continue

        # d(loss)/dz = alpha * p - beta at the label - gamma * w. The buffer holds it divided by
        # alpha, which is applied on the matmuls' small operands instead of in a pass of its own.
        alpha = terms.softmax[start:end]
        if m:
            alpha = alpha + terms.z_loss[start:end] * lse
        grad = z  # p, turned in place into the gradient over alpha
        if terms.label is None:
            grad.scatter_add_(1, y, minus_ones[: end - start])
        else:
            inverse = torch.where(alpha != 0, alpha.reciprocal(), 0.0)
            grad.scatter_add_(1, y, -(terms.label[start:end] * inverse))
            if eps:
                grad.addmm_(terms.smoothing[start:end] * inverse, batch.smoothing_weights.t(), alpha=-1)
        if tanh is not None:
            _apply_softcap_chain_rule_(grad, tanh)

        if need_b:
            grad_b.addmv_(grad.t(), alpha[:, 0])
        if grad_buf is not None:  # the copy to the input dtype applies alpha on the way
            matmul_grad = torch.mul(grad, alpha, out=grad_buf[: end - start])
            if need_h:
                torch.mm(matmul_grad, weight, out=grad_h[start:end])
            if need_w:
                on_cuda = hidden_for_w.dtype != torch.float32
                _accumulate_weight_grad(grad_w, matmul_grad if on_cuda else grad,
                                        hidden[start:end] if on_cuda else hidden_for_w[start:end] * alpha,
                                        first=start == 0)
        elif onednn:
            grad_w = _onednn_gradient_matmuls(grad, weight, hidden[start:end] * alpha if need_w else None, alpha,
                                              grad_h[start:end] if need_h else None, grad_w, first=start == 0)
        else:
            if need_h:
                torch.mm(grad, weight, out=grad_h[start:end]).mul_(alpha)
            if need_w:
                _accumulate_weight_grad(grad_w, grad, hidden[start:end] * alpha, first=start == 0)
    return ce_all[:, 0], None if z_all is None else z_all[:, 0], grad_h, grad_w, grad_b


def _reduce(ce, z, batch: _Batch, spec: LossSpec):
    """The loss and z-loss from per-token terms (z None: no z-loss, its terms 0), as
    ``harness.semantics.loss_from_logits`` reduces them."""
    ce = torch.where(batch.valid, ce, 0.0)
    z = torch.zeros_like(ce) if z is None else z * batch.valid
    if spec.reduction == "sum":
        ce, z = ce.sum(), z.sum()
    elif spec.reduction == "mean":  # an empty or all-ignored batch gives 0/0 = NaN, as the reference
        ce, z = ce.sum() / batch.ce_denominator, z.sum() / batch.num_valid
    return (ce + z if spec.z_loss_multiplier else ce), z


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, spec, chunk_size, onednn, compute_grads):
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        needs = tuple(n and compute_grads for n in needs)
        defer = spec.reduction == "none"
        batch = _Batch.of(labels, spec, weight.shape[0])
        ce, z, grad_h, grad_w, grad_b = _chunked_pass(
            hidden, weight, bias, batch, spec, chunk_size, (False, False, False) if defer else needs, onednn
        )
        loss, z_loss = _reduce(ce, z, batch, spec)
        # The inputs are saved (references, no memory) for a recomputation; the forward's gradients
        # are kept outside save_for_backward, to be handed over to the first backward.
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.grads = None if defer else (grad_h, grad_w, grad_b)
        ctx.spec, ctx.chunk_size, ctx.needs, ctx.defer, ctx.onednn = spec, chunk_size, needs, defer, onednn
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(z_loss)
        return loss, z_loss

    @staticmethod
    def backward(ctx, grad_loss, _grad_z_loss):
        if ctx.grads is not None:
            # The first backward takes the forward's gradients over: no copy, and autograd may
            # keep them as .grad, which later backwards accumulate into in place, so ctx lets go.
            grads, ctx.grads = ctx.grads, None
        else:  # reduction="none" (a per-token upstream gradient), or again through a retained graph
            hidden, weight, bias, labels = ctx.saved_tensors
            batch = _Batch.of(labels, ctx.spec, weight.shape[0])
            upstream = grad_loss if ctx.defer else None
            _, _, *grads = _chunked_pass(
                hidden, weight, bias, batch, ctx.spec, ctx.chunk_size, ctx.needs, ctx.onednn, token_scale=upstream
            )
        grad_h, grad_w, grad_b = grads
        # The forward's gradients are for an upstream gradient of 1; scaled in place (these buffers
        # belong to this backward alone now). The usual 1 is skipped where reading it is free (the
        # CPU; a GPU would sync), sparing a pass over the (V, D) weight gradient.
        if not ctx.defer and not (grad_loss.device.type == "cpu" and grad_loss.item() == 1.0):
            for grad in grads:
                if grad is not None:
                    grad.mul_(grad_loss)
        weight_dtype, bias_dtype = ctx.dtypes
        grad_w = None if grad_w is None else grad_w.to(weight_dtype)
        grad_b = None if grad_b is None else grad_b.to(bias_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


SUPPORTED = ("bias", "ignore_index", "label_smoothing", "z_loss", "logit_scale", "softcap", "loss_div_factor",
             "class_weight")


class Chunked(Implementation):
    name = "chunked"
    family = "native"
    summary = "project's pure-PyTorch chunked loss: gradients computed chunk by chunk in the forward"

    def __init__(self, chunk_size: int | None = None, *, onednn: bool = True) -> None:
        """``onednn=False`` keeps float32 CPU matmuls on torch.mm, the path of a torch without oneDNN."""
        self.chunk_size = chunk_size
        self.onednn = onednn

    def with_chunk_size(self, chunk_size):
        return Chunked(chunk_size=chunk_size, onednn=self.onednn)

    def capabilities(self, device):
        return Capabilities(supported_options=SUPPORTED)

    def compute(self, hidden, weight, labels, spec, bias):
        chunk_size = None if self.chunk_size is None else max(1, self.chunk_size)
        onednn = (self.onednn and hidden.device.type == "cpu" and hidden.dtype == torch.float32
                  and onednn_linear() is not None)
        loss, z_loss = _ChunkedLinearCrossEntropy.apply(
            hidden, weight, bias, labels, spec, chunk_size, onednn, torch.is_grad_enabled()
        )
        return LossOutput(loss, z_loss)
