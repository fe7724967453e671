"""Subtle kernel bugs, one per plugin, each of a kind kernel authors really make.

``fused_chunked`` is a correct fused LM-head loss written the way Triton and CUDA kernels are: it
never materialises the ``(N, V)`` logits. It walks 64-token chunks and 128-class vocabulary
blocks, keeps an online (running max, running sum) logsumexp per token, and recomputes each
block's logits in the backward to form ``dlogits`` in float32, casts it to the input dtype for the
two gradient GEMMs (as a tensor-core kernel does) and accumulates the gradients in float32.

Every other plugin here is that kernel with exactly one bug, switched on by name. Each one
passes a quick test (the minimal case, the defaults, small shapes) and shows only where a real
kernel's structure or one option's composition with another is reached: a single class, a
partial block past 64, a low-precision partial sum over thousands of tokens, two options
composed the wrong way. ``CI=true python -m harness check --impl tests.subtle_bugs:NAME`` must
reject every one (``tests/test_subtle_bugs.py``) and pass ``fused_chunked``.
"""

from __future__ import annotations

import torch

TOKEN_BLOCK = 64
VOCAB_BLOCK = 128
K_BLOCK = 64
FLOAT32_SPLIT = 4096  # classes per split of the vocabulary in one bug's float32 fast path


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round to ``dtype`` and come back to float32, as storing to an accumulator of that dtype does."""
    return tensor.to(dtype).float()


class _FusedLoss(torch.autograd.Function):
    """Forward: row statistics (logsumexp, target logit, class-weighted logit sum) block by block.
    Backward: each block's logits again, ``dlogits``, and its share of the three gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, class_weight, options):
        bug, dtype = options["bug"], hidden.dtype
        n, vocab = hidden.shape[0], weight.shape[0]
        eps = options["label_smoothing"]
        valid, target_weight = _token_weights(labels, class_weight, options)
        lse = torch.empty(n)
        lse_raw = torch.empty(n)  # of the logits before the softcap
        nll = torch.zeros(n)
        smooth = torch.zeros(n)
        running_dtype = dtype if bug == "running_sum_in_input_dtype" else torch.float32
        for s in range(0, n, TOKEN_BLOCK):
            e = min(s + TOKEN_BLOCK, n)
            h, t = hidden[s:e], labels[s:e]
            m, total = torch.full((e - s,), -torch.inf), torch.zeros(e - s)
            m_raw, total_raw = m.clone(), total.clone()
            target_logit, weighted_logit_sum = torch.zeros(e - s), torch.zeros(e - s)
            for v0 in range(0, vocab, VOCAB_BLOCK):
                v1 = min(v0 + VOCAB_BLOCK, vocab)
                raw, y = _block_logits(h, weight, bias, v0, v1, options)
                lanes = y
                if bug == "vocab_tail_padded_with_zero" and v1 - v0 < VOCAB_BLOCK:
                    lanes = torch.cat([y, y.new_zeros(e - s, VOCAB_BLOCK - (v1 - v0))], 1)  # not -inf
                m, total = _online_update(m, total, lanes, running_dtype, bug)
                m_raw, total_raw = _online_update(m_raw, total_raw, raw, torch.float32, "")
                hit = t[:, None] == torch.arange(v0, v1)[None, :]
                target_logit += (y * hit).sum(1)
                w = _smoothing_weights(class_weight, v0, v1, options)
                if bug == "smoothing_over_v_minus_one":
                    w = w * ~hit
                weighted_logit_sum += (y * w).sum(1)
            lse[s:e] = m + total.log()
            lse_raw[s:e] = m_raw + total_raw.log()
            nll[s:e] = (lse[s:e] - target_logit) * target_weight[s:e]
            mass, spread = _smoothing_mass(class_weight, vocab, options)
            smooth[s:e] = (mass * lse[s:e] - weighted_logit_sum) / spread
        z_lse = lse_raw if bug == "z_loss_on_uncapped_logits" else lse
        z_valid = valid
        if bug == "z_loss_not_masked_for_none" and options["reduction"] == "none":
            z_valid = torch.ones_like(valid)
        dens = _denominators(valid, target_weight, options)
        ctx.save_for_backward(hidden, weight, bias, labels, class_weight, lse, z_lse, valid, z_valid, target_weight)
        ctx.options, ctx.dens = options, dens
        ce_den, smooth_den, z_den = dens
        per_token = [(1 - eps) * nll * valid / ce_den, eps * smooth * valid / smooth_den,
                     options["z_loss_multiplier"] * z_lse.square() * z_valid / z_den]
        if options["reduction"] == "none":
            return sum(per_token)
        if bug == "loss_sum_in_input_dtype":  # per-chunk partial sums added into a low-precision total
            total_loss = torch.zeros(())
            for s in range(0, n, TOKEN_BLOCK):
                part = sum(_cast(p[s : s + TOKEN_BLOCK], dtype).sum() for p in per_token)
                total_loss = _cast(total_loss + part, dtype)
            return total_loss
        return sum(p.sum() for p in per_token)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, labels, class_weight, lse, z_lse, valid, z_valid, target_weight = ctx.saved_tensors
        options, (ce_den, smooth_den, z_den) = ctx.options, ctx.dens
        bug, dtype = options["bug"], hidden.dtype
        n, vocab = hidden.shape[0], weight.shape[0]
        eps, zm, cap = options["label_smoothing"], options["z_loss_multiplier"], options["softcap"]
        upstream = grad_out.float().expand(n)
        if bug == "none_reduction_scaled_by_first_grad" and options["reduction"] == "none":
            upstream = grad_out.float()[0].expand(n)
        low = {"hidden_grad_accumulated_in_input_dtype": "hidden", "weight_grad_accumulated_in_input_dtype": "weight",
               "bias_grad_accumulated_in_input_dtype": "bias"}.get(bug)
        grad_h = torch.zeros(n, hidden.shape[1])
        grad_w = torch.zeros(vocab, hidden.shape[1])
        grad_b = torch.zeros(vocab)
        mass, spread = _smoothing_mass(class_weight, vocab, options)
        z_factor = 1.0 if bug == "z_loss_gradient_missing_factor_two" else 2.0
        for s in range(0, n, TOKEN_BLOCK):
            e = min(s + TOKEN_BLOCK, n)
            h, t, g = hidden[s:e], labels[s:e], upstream[s:e, None]
            ok, z_ok, row_w = valid[s:e, None], z_valid[s:e, None], target_weight[s:e, None]
            for v0 in range(0, vocab, VOCAB_BLOCK):
                v1 = min(v0 + VOCAB_BLOCK, vocab)
                raw, y = _block_logits(h, weight, bias, v0, v1, options)
                p = (y - lse[s:e, None]).exp()
                hit = t[:, None] == torch.arange(v0, v1)[None, :]
                if bug == "last_class_gradient":
                    hit &= t[:, None] < vocab - 1  # a bound check off by one
                w = _smoothing_weights(class_weight, v0, v1, options)
                if bug == "smoothing_over_v_minus_one":
                    w = w * ~hit
                nll_part = (1 - eps) / ce_den * row_w * (p - hit.float())
                smooth_part = eps / smooth_den * (mass * p - w) / spread
                dy = g * ok * (nll_part + smooth_part)
                if bug == "ignored_tokens_in_gradient":
                    dy = dy + g * ~ok * p / ce_den
                dx_z = 0.0
                if bug == "z_loss_on_uncapped_logits":
                    dx_z = g * z_ok * z_factor * zm / z_den * z_lse[s:e, None] * (raw - z_lse[s:e, None]).exp()
                else:
                    dy = dy + g * z_ok * z_factor * zm / z_den * z_lse[s:e, None] * p
                if cap is not None:
                    capped = raw if bug == "softcap_derivative_of_raw_logits" else y
                    dy = dy * (1 - (capped / cap).square())
                dx = _cast(dy + dx_z, dtype)  # dlogits in the input dtype, for the tensor-core GEMMs
                grad_h[s:e] = _accumulate(grad_h[s:e], dx @ weight[v0:v1].float(), dtype if low == "hidden" else None)
                if not (bug == "weight_grad_skips_partial_token_chunk" and e - s < TOKEN_BLOCK):
                    grad_w[v0:v1] = _accumulate(grad_w[v0:v1], dx.T @ h.float(), dtype if low == "weight" else None)
                if bug == "bias_grad_overwritten_per_chunk":
                    grad_b[v0:v1] = dx.sum(0)
                else:
                    grad_b[v0:v1] = _accumulate(grad_b[v0:v1], dx.sum(0), dtype if low == "bias" else None)
        grads = (grad_h.to(dtype), grad_w.to(weight.dtype), None if bias is None else grad_b.to(bias.dtype))
        return (*(grad if needed else None for grad, needed in zip(grads, ctx.needs_input_grad)), None, None, None)


def _accumulate(accumulator, partial, low_dtype):
    """``accumulator + partial``, stored in float32 (or rounded to ``low_dtype``: the bug)."""
    total = accumulator + partial
    return total if low_dtype is None else _cast(total, low_dtype)


def _token_weights(labels, class_weight, options):
    """Which tokens count, and each one's weight in the mean (its class weight, or 1)."""
    bug = options["bug"]
    ignore_index = -100 if bug == "hardcoded_ignore_index" else options["ignore_index"]
    valid = labels != ignore_index
    if bug == "label_zero_is_padding":
        valid &= labels != 0
    if class_weight is None:
        return valid, valid.float()
    return valid, class_weight.float()[labels.clamp(0, class_weight.numel() - 1)] * valid


def _smoothing_weights(class_weight, v0, v1, options):
    """Per-class weights of label smoothing's uniform part, for one vocabulary block."""
    if class_weight is None or options["bug"] == "smoothing_ignores_class_weight":
        return torch.ones(1, v1 - v0)
    return class_weight[v0:v1].float()[None, :]


def _smoothing_mass(class_weight, vocab, options):
    """(total smoothing weight, count it is spread over): eps/count of it goes to each class."""
    if options["bug"] == "smoothing_over_v_minus_one":
        return vocab - 1.0, vocab - 1.0  # eps / (V - 1) on each of the V - 1 other classes
    if class_weight is None or options["bug"] == "smoothing_ignores_class_weight":
        return float(vocab), float(vocab)
    return float(class_weight.float().sum()), float(vocab)


def _denominators(valid, target_weight, options):
    """What the mean divides the nll part, the smoothing part and the z-loss by (1 otherwise)."""
    if options["reduction"] != "mean":
        return 1.0, 1.0, 1.0
    count, weight_sum = valid.sum().float(), target_weight.sum()
    z_den = weight_sum if options["bug"] == "z_loss_mean_over_class_weight" else count
    smooth_den = count if options["bug"] == "smoothing_mean_over_token_count" else weight_sum
    return weight_sum, smooth_den, z_den


def _block_logits(h, weight, bias, v0, v1, options):
    """Raw and soft-capped float32 logits of one vocabulary block, accumulated in float32."""
    bug, cap = options["bug"], options["softcap"]
    if bug == "k_tail_dropped" and h.shape[1] > K_BLOCK:
        kept = h.shape[1] // K_BLOCK * K_BLOCK  # the K loop runs over whole blocks only
        raw = h[:, :kept].float() @ weight[v0:v1, :kept].float().T
    else:
        raw = h.float() @ weight[v0:v1].float().T
    b = None if bias is None else bias[v0:v1].float()
    if bug == "float32_bias_offset_per_split" and bias is not None and h.dtype == torch.float32:
        start = v0 % FLOAT32_SPLIT  # the split-local offset, where the global one was meant
        b = bias[start:start + v1 - v0]
    if bug == "softcap_before_bias":
        y = raw if cap is None else cap * torch.tanh(raw / cap)
        return raw if b is None else raw + b, y if b is None else y + b
    raw = raw if b is None else raw + b
    return raw, raw if cap is None else cap * torch.tanh(raw / cap)


def _online_update(m, total, lanes, running_dtype, bug):
    """One step of the online logsumexp: running max ``m`` and running sum ``total`` of exp(x - m)."""
    new_m = torch.maximum(m, lanes.max(1).values)
    if bug == "max_not_subtracted":
        return torch.zeros_like(m), total + lanes.exp().sum(1)
    rescale = 1.0 if bug == "online_softmax_without_rescale" else (m - new_m).exp()
    return new_m, _cast(total * rescale + (lanes - new_m[:, None]).exp().sum(1), running_dtype)


def _fused_loss(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                z_loss_multiplier=0.0, softcap=None, class_weight=None, bug=""):
    options = dict(bug=bug, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                   z_loss_multiplier=z_loss_multiplier, softcap=softcap)
    if bug == "assumes_contiguous_inputs":  # reads through the data pointer with row-major strides
        hidden, weight, labels = (t.as_strided(t.shape, _row_major_strides(t.shape)) for t in (hidden, weight, labels))
    loss = _FusedLoss.apply(hidden.flatten(0, -2), weight, bias, labels.flatten(), class_weight, options)
    return loss.view(labels.shape) if reduction == "none" else loss


def _row_major_strides(shape):
    strides, step = [], 1
    for size in reversed(shape):
        strides.insert(0, step)
        step *= size
    return tuple(strides)


def fused_chunked(hidden, weight, labels, **options):
    """Correct fused chunked loss: online logsumexp over 128-class blocks, float32 accumulation."""
    return _fused_loss(hidden, weight, labels, **options)


def _with_bug(bug: str, doc: str):
    def plugin(hidden, weight, labels, **options):
        return _fused_loss(hidden, weight, labels, bug=bug, **options)

    plugin.__name__ = plugin.__qualname__ = bug
    plugin.__doc__ = doc
    return plugin


# Each bug, one plugin: ``tests.subtle_bugs:NAME``.

# One class.
last_class_gradient = _with_bug(
    "last_class_gradient", "the target is not subtracted in the gradient of class V-1 (a bound check off by one)"
)
label_zero_is_padding = _with_bug(
    "label_zero_is_padding", "label 0 is treated as padding and ignored, as if it were the pad token"
)
hardcoded_ignore_index = _with_bug("hardcoded_ignore_index", "ignores label -100 whatever ignore_index says")

# Low-precision partial sums: show over thousands of tokens, or many blocks.
loss_sum_in_input_dtype = _with_bug(
    "loss_sum_in_input_dtype", "adds each 64-token chunk's loss into a total kept in the input dtype"
)
weight_grad_accumulated_in_input_dtype = _with_bug(
    "weight_grad_accumulated_in_input_dtype", "accumulates the weight gradient over chunks in the input dtype"
)
bias_grad_accumulated_in_input_dtype = _with_bug(
    "bias_grad_accumulated_in_input_dtype", "accumulates the bias gradient over chunks in the input dtype"
)
hidden_grad_accumulated_in_input_dtype = _with_bug(
    "hidden_grad_accumulated_in_input_dtype", "accumulates the hidden gradient over vocab blocks in the input dtype"
)
running_sum_in_input_dtype = _with_bug(
    "running_sum_in_input_dtype", "keeps the online softmax's running sum in the input dtype"
)
max_not_subtracted = _with_bug(
    "max_not_subtracted", "sums exp(logit) without subtracting the running max: overflows past logits of 88"
)

# Two options composed the wrong way.
softcap_before_bias = _with_bug("softcap_before_bias", "applies the softcap to x W^T and adds the bias after it")
smoothing_ignores_class_weight = _with_bug(
    "smoothing_ignores_class_weight", "label smoothing's uniform part is not class-weighted"
)
smoothing_mean_over_token_count = _with_bug(
    "smoothing_mean_over_token_count", "with class weights, the mean divides the smoothing part by the token count"
)
z_loss_on_uncapped_logits = _with_bug(
    "z_loss_on_uncapped_logits", "the z-loss uses the logsumexp of the logits before the softcap"
)
z_loss_mean_over_class_weight = _with_bug(
    "z_loss_mean_over_class_weight", "with class weights, the mean divides the z-loss by the class-weight sum"
)
z_loss_not_masked_for_none = _with_bug(
    "z_loss_not_masked_for_none", "with reduction none, ignored tokens carry their z-loss"
)
softcap_derivative_of_raw_logits = _with_bug(
    "softcap_derivative_of_raw_logits", "the softcap's derivative 1 - (x/c)^2 uses the logits before the cap"
)
smoothing_over_v_minus_one = _with_bug(
    "smoothing_over_v_minus_one", "label smoothing spreads eps over the V-1 other classes, not all V"
)
z_loss_gradient_missing_factor_two = _with_bug(
    "z_loss_gradient_missing_factor_two", "the z-loss gradient is m*lse*p, not 2*m*lse*p"
)
ignored_tokens_in_gradient = _with_bug(
    "ignored_tokens_in_gradient", "ignored tokens get loss 0 but their softmax still reaches the gradients"
)
none_reduction_scaled_by_first_grad = _with_bug(
    "none_reduction_scaled_by_first_grad", "with reduction none, every token's gradient is scaled by grad_output[0]"
)

# Past a 64-wide block.
vocab_tail_padded_with_zero = _with_bug(
    "vocab_tail_padded_with_zero", "the partial last vocab block's masked lanes hold logit 0, not -inf"
)
weight_grad_skips_partial_token_chunk = _with_bug(
    "weight_grad_skips_partial_token_chunk", "the weight gradient skips the partial last 64-token chunk"
)
bias_grad_overwritten_per_chunk = _with_bug(
    "bias_grad_overwritten_per_chunk", "each 64-token chunk overwrites the bias gradient instead of adding to it"
)
online_softmax_without_rescale = _with_bug(
    "online_softmax_without_rescale", "the running sum is not rescaled when a later vocab block raises the max"
)
assumes_contiguous_inputs = _with_bug(
    "assumes_contiguous_inputs", "reads hidden, weight and labels as if contiguous (the slices a model passes are not)"
)
k_tail_dropped = _with_bug(
    "k_tail_dropped", "the logits' K loop covers whole 64-wide blocks of D only: the last D % 64 features are lost"
)
float32_bias_offset_per_split = _with_bug(
    "float32_bias_offset_per_split",
    "float32 inputs take a path that splits V into 4096 classes and reads each split's bias from the first's offset",
)

BUGS = (
    last_class_gradient,
    label_zero_is_padding,
    hardcoded_ignore_index,
    loss_sum_in_input_dtype,
    weight_grad_accumulated_in_input_dtype,
    bias_grad_accumulated_in_input_dtype,
    hidden_grad_accumulated_in_input_dtype,
    running_sum_in_input_dtype,
    max_not_subtracted,
    softcap_before_bias,
    smoothing_ignores_class_weight,
    smoothing_mean_over_token_count,
    z_loss_on_uncapped_logits,
    z_loss_mean_over_class_weight,
    z_loss_not_masked_for_none,
    softcap_derivative_of_raw_logits,
    smoothing_over_v_minus_one,
    z_loss_gradient_missing_factor_two,
    ignored_tokens_in_gradient,
    none_reduction_scaled_by_first_grad,
    vocab_tail_padded_with_zero,
    weight_grad_skips_partial_token_chunk,
    bias_grad_overwritten_per_chunk,
    online_softmax_without_rescale,
    k_tail_dropped,
    float32_bias_offset_per_split,
    assumes_contiguous_inputs,
)
