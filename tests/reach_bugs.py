"""Kernel bugs that show only on the inputs users really pass: real sizes, batch structure, layouts,
padding, call patterns, confident predictions (issue 25's dimensions).

``chunked_kernel`` is a correct fused loss written the way a Triton or CUDA kernel and its Python
launcher are: the launcher turns ``(N, D)`` / ``(B, T, D)`` inputs of any layout into token rows
and works out what the reduction makes of each token; the kernel walks 256-token chunks, forms
float32 logits of the input-dtype operands (a ``tl.dot``), saves each token's logsumexp, and its
backward recomputes each chunk's logits, rounds their gradient to the input dtype for the two
gradient matmuls and accumulates the weight and bias gradients in float32.

Every other plugin here is that kernel with exactly one bug, a mistake that shipped in a real
kernel or is one line away from one. Each is exact on a quick test (small ``(N, D)`` inputs at the
defaults, one forward then its backward) and wrong, by far more than any rounding, on the input
its docstring names: a user's ordinary input, but one the gate of issue 25 did not build.
``tests/test_reach_bugs.py`` shows each one wrong on that input; ``BUGS`` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOKEN_CHUNK = 256  # tokens per program of the kernel, and per chunk of the chunk-wise mean
K_BLOCK = 64  # hidden features per step of the logits' K loop
LANE_BLOCK = 4096  # tokens per block of the kernel whose last lane is masked off
GRID_LIMIT = 2**16  # programs a launch grid axis holds before its index wraps

# Per-process state of the call-pattern bugs, as a kernel library's module-level caches are.
_GRADIENT_BUFFERS: dict = {}
_WORKSPACES: dict = {}
_WEIGHT_COPIES: dict = {}


@dataclass(frozen=True, eq=False)
class Options:
    ignore_index: int
    reduction: str
    label_smoothing: float
    z_loss_multiplier: float
    softcap: float | None
    class_weight: torch.Tensor | None


@dataclass(frozen=True, eq=False)
class Tokens:
    """What the launcher hands the kernel about the ``(N,)`` tokens: a class id each (ignored ones
    read class 0), which count, the cross-entropy weight of each (its class weight, 0 if ignored),
    the factor of its cross-entropy and of its z-loss in a reduced loss, and the float32 class
    weights the kernel uses (None: all 1)."""

    safe: torch.Tensor
    valid: torch.Tensor
    target: torch.Tensor
    ce_scale: torch.Tensor
    z_scale: torch.Tensor
    class_weight: torch.Tensor | None


def _wide(tensor):
    """float32 for 16-bit and float32 inputs, float64 for float64 ones (the accumulation dtype)."""
    return tensor if tensor is None or tensor.dtype == torch.float64 else tensor.float()


def _row_major_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.insert(0, step)
        step *= size
    return tuple(strides)


def _read_row_major(tensor: torch.Tensor) -> torch.Tensor:
    """What a kernel reads that indexes ``tensor``'s memory as if it were contiguous: its storage from
    its offset on, row-major; memory past the storage's end is read as zeros."""
    available = tensor.untyped_storage().nbytes() // tensor.element_size() - tensor.storage_offset()
    if available >= tensor.numel():
        return tensor.as_strided(tensor.shape, _row_major_strides(tensor.shape))
    present = tensor.as_strided((max(available, 0),), (1,))
    return torch.cat([present, present.new_zeros(tensor.numel() - present.numel())]).view(tensor.shape)


# --- the launcher -------------------------------------------------------------------------------------


def _hidden_rows(hidden: torch.Tensor, bug: str) -> torch.Tensor:
    if bug == "rows_read_at_n_times_d":
        packed = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
        return _read_row_major(packed).reshape(-1, hidden.shape[-1])
    rows = hidden.reshape(-1, hidden.shape[-1])
    if bug == "token_index_wraps_at_65536":
        rows = rows[torch.arange(rows.shape[0], device=rows.device) % GRID_LIMIT]
    return rows


def _label_rows(labels: torch.Tensor, bug: str) -> torch.Tensor:
    if bug == "labels_read_row_major":
        packed = labels if labels.stride(-1) == 1 else labels.contiguous()
        return _read_row_major(packed).reshape(-1).long()
    if bug == "labels_flattened_sequence_first" and labels.dim() == 2:
        return labels.T.reshape(-1).long()
    return labels.reshape(-1).long()


def _class_weights(options: Options, vocab: int, dtype, device, bug: str) -> torch.Tensor | None:
    class_weight = None if options.class_weight is None else options.class_weight.to(dtype)
    if bug == "ignored_class_weight_zeroed" and 0 <= options.ignore_index < vocab:
        class_weight = torch.ones(vocab, dtype=dtype, device=device) if class_weight is None else class_weight.clone()
        class_weight[options.ignore_index] = 0.0  # masks the ignored tokens' nll, and the smoothing's class too
    return class_weight


def _tokens(labels: torch.Tensor, shape: torch.Size, options: Options, class_weight, dtype, bug: str) -> Tokens:
    """The per-token facts of flat ``labels`` for the kernel (``shape``: the labels' own shape), in ``dtype``."""
    valid = labels != options.ignore_index
    safe = labels.masked_fill(~valid, 0)
    target = valid.to(dtype) if class_weight is None else class_weight[safe] * valid
    ones = torch.ones_like(target)
    ce_scale = z_scale = ones
    if options.reduction == "mean":
        ce_scale, z_scale = _mean_factors(labels, shape, valid, target, bug)
    return Tokens(safe, valid, target, ce_scale, z_scale, class_weight)


def _mean_factors(labels, shape, valid, target, bug):
    """Each token's factor in the mean: 1 / (the class-weight sum) for its cross-entropy, 1 / (the
    count of tokens not ignored) for its z-loss."""
    count = valid.to(target.dtype)
    ones = torch.ones_like(target)
    if bug == "mean_per_sequence" and len(shape) == 2:
        rows = shape[0]
        return ((1 / (rows * target.view(shape).sum(1, keepdim=True))).expand(shape).reshape(-1),
                (1 / (rows * count.view(shape).sum(1, keepdim=True))).expand(shape).reshape(-1))
    if bug == "mean_per_row_reweighted" and len(shape) == 2:
        return (_reweighted(target.view(shape)).reshape(-1), _reweighted(count.view(shape)).reshape(-1))
    if bug == "mean_per_chunk_reweighted":
        n = labels.numel()
        return _reweighted(_chunks(target)).reshape(-1)[:n], _reweighted(_chunks(count)).reshape(-1)[:n]
    if bug == "z_count_assumes_padding":
        # The ignore_index sorts first (it is negative or 0), so the smallest label is taken to be it.
        return ones / target.sum(), ones / (labels != labels.min()).sum()
    return ones / target.sum(), ones / count.sum()


def _chunks(values: torch.Tensor) -> torch.Tensor:
    """``(N,)`` values as rows of ``TOKEN_CHUNK``, the last padded with zeros."""
    padded = -(-values.numel() // TOKEN_CHUNK) * TOKEN_CHUNK
    return torch.cat([values, values.new_zeros(padded - values.numel())]).view(-1, TOKEN_CHUNK)


def _reweighted(weights: torch.Tensor) -> torch.Tensor:
    """Factors of each row's mean reweighted by the row's share of the total: ``(1 / row) * (row / total)``,
    the global mean whenever no row's total is 0."""
    row = weights.sum(1, keepdim=True)
    return ((1 / row) * (row / weights.sum())).expand(weights.shape)


def _loss(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
          z_loss_multiplier=0.0, softcap=None, class_weight=None, bug=""):
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    options = Options(ignore_index, reduction, label_smoothing, z_loss_multiplier, softcap, class_weight)
    rows = _hidden_rows(hidden, bug)
    flat = _label_rows(labels, bug)
    dtype = _wide(hidden[..., :0]).dtype
    class_weights = _class_weights(options, weight.shape[0], dtype, flat.device, bug)
    tokens = _tokens(flat, labels.shape, options, class_weights, dtype, bug)
    if bug == "grad_accumulator_reset_per_forward" and weight.requires_grad:
        weight.fp32_grad_accumulator = torch.zeros_like(_wide(weight.detach()))  # zeroed by every forward
    loss = _ChunkedLoss.apply(rows, weight, bias, tokens, options, bug, weight)
    if reduction == "none" and bug != "none_loss_flat":
        return loss.reshape(labels.shape)
    return loss


# --- the kernel ---------------------------------------------------------------------------------------


def _logits(h, weight, bias, bug):
    """Raw float32 logits of a chunk: input-dtype operands, float32 products and sums."""
    if bug == "hidden_sum_in_input_dtype":  # the K loop's accumulator declared in the input dtype
        raw = torch.zeros(h.shape[0], weight.shape[0], dtype=_wide(h).dtype, device=h.device)
        for k in range(0, h.shape[1], K_BLOCK):
            raw = _wide((raw + _wide(h[:, k:k + K_BLOCK]) @ _wide(weight[:, k:k + K_BLOCK]).T).to(h.dtype))
    else:
        raw = _wide(h) @ _wide(weight).T
    return raw if bias is None else raw + _wide(bias)


def _capped(x, softcap):
    return x if softcap is None else softcap * torch.tanh(x / softcap)


def _lanes(s: int, e: int, bug: str, like: torch.Tensor) -> torch.Tensor | float:
    """1 for the tokens of chunk ``s:e`` the kernel computes, 0 for a masked-off lane."""
    if bug != "last_token_of_4096_block_dropped":
        return 1.0
    lane = torch.arange(s, e, device=like.device) % LANE_BLOCK
    return (lane < LANE_BLOCK - 1).to(like.dtype)  # off by one: < BLOCK - 1 keeps all but the last


def _chunk_losses(z, lse, tokens: Tokens, s: int, e: int, options: Options, dtype, bug):
    """Per-token cross-entropy and z-loss of chunk ``s:e``."""
    safe, valid, target = tokens.safe[s:e], tokens.valid[s:e], tokens.target[s:e]
    target_logit = z.gather(1, safe[:, None]).squeeze(1)
    if bug == "loss_from_rounded_statistics":  # lse and z_y each stored in the input dtype, then subtracted
        nll = _wide(lse.to(dtype)) - _wide(target_logit.to(dtype))
    elif bug == "loss_as_minus_log_probability":  # -log(p_y) in float32, not lse - z_y
        nll = -(target_logit - lse).exp().log()
    else:
        nll = lse - target_logit
    ce = nll * target
    eps, vocab = options.label_smoothing, z.shape[1]
    if eps:
        cw = tokens.class_weight
        spread = vocab * lse - z.sum(1) if cw is None else cw.sum() * lse - z @ cw
        ce = (1 - eps) * ce + eps / vocab * torch.where(valid, spread, 0.0)
    z_loss = options.z_loss_multiplier * torch.where(valid, lse.square(), 0.0)
    lanes = _lanes(s, e, bug, z)
    return ce * lanes, z_loss * lanes


def _chunk_gradient(z, lse, tokens: Tokens, s: int, e: int, ce_scale, z_scale, options: Options, dtype, bug):
    """d(sum ce_scale ce + z_scale zloss) / d(raw logits) of chunk ``s:e``, in float32."""
    safe, valid, target = tokens.safe[s:e], tokens.valid[s:e], tokens.target[s:e]
    eps, vocab, cw = options.label_smoothing, z.shape[1], tokens.class_weight
    p = (z - lse[:, None]).exp()
    nll_scale = (ce_scale * target * (1 - eps))[:, None]
    p_target = p.gather(1, safe[:, None])
    if bug == "target_gradient_from_rounded_probability":  # p_y - 1 formed from p_y stored in the input dtype
        p_target = _wide(p_target.to(dtype))
    grad = (nll_scale * p).scatter(1, safe[:, None], nll_scale * (p_target - 1))
    if eps:
        weight_sum = vocab if cw is None else cw.sum()
        grad = grad + (ce_scale * valid * eps / vocab)[:, None] * (weight_sum * p - (1.0 if cw is None else cw))
    if options.z_loss_multiplier:
        grad = grad + (z_scale * valid * 2 * options.z_loss_multiplier * lse)[:, None] * p
    if options.softcap is not None:
        grad = grad * (1 - (z / options.softcap).square())
    lanes = _lanes(s, e, bug, z)
    return grad * (lanes[:, None] if isinstance(lanes, torch.Tensor) else lanes)


class _ChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, tokens, options, bug, weight_leaf):
        n, dtype = h.shape[0], h.dtype
        if bug == "weight_copy_cached_by_pointer":  # a float32 copy of the head, cached per data pointer
            key = (weight.data_ptr(), tuple(weight.shape), weight.dtype)
            weight = _WEIGHT_COPIES.setdefault(key, _wide(weight).clone())
        lse = torch.empty(n, dtype=_wide(h[:0]).dtype, device=h.device)
        ce, z_loss = torch.zeros_like(lse), torch.zeros_like(lse)
        for s in range(0, n, TOKEN_CHUNK):
            e = min(s + TOKEN_CHUNK, n)
            z = _capped(_logits(h[s:e], weight, bias, bug), options.softcap)
            lse[s:e] = torch.logsumexp(z, -1)
            ce[s:e], z_loss[s:e] = _chunk_losses(z, lse[s:e], tokens, s, e, options, dtype, bug)
        ctx.save_for_backward(h, weight, bias, lse)
        ctx.tokens, ctx.options, ctx.bug, ctx.weight_leaf = tokens, options, bug, weight_leaf
        if bug == "gradient_buffer_per_shape":  # the logits' gradient formed here, kept in a buffer per shape
            key = (n, weight.shape[0], dtype)
            if key not in _GRADIENT_BUFFERS:
                _GRADIENT_BUFFERS[key] = torch.empty(n, weight.shape[0], dtype=dtype)
            buffer = _GRADIENT_BUFFERS[key]
            for s in range(0, n, TOKEN_CHUNK):
                e = min(s + TOKEN_CHUNK, n)
                z = _capped(_logits(h[s:e], weight, bias, bug), options.softcap)
                buffer[s:e] = _chunk_gradient(z, lse[s:e], tokens, s, e, tokens.ce_scale[s:e], tokens.z_scale[s:e],
                                              options, dtype, bug).to(dtype)
            ctx.buffer = buffer
        if options.reduction == "none":
            return ce + z_loss
        return (ce * tokens.ce_scale).sum() + (z_loss * tokens.z_scale).sum()

    @staticmethod
    def backward(ctx, grad_output):
        h, weight, bias, lse = ctx.saved_tensors
        tokens, options, bug = ctx.tokens, ctx.options, ctx.bug
        n, vocab, dtype = h.shape[0], weight.shape[0], h.dtype
        if options.reduction == "none":
            read = _read_row_major(grad_output) if bug == "upstream_read_row_major" else grad_output
            upstream = _wide(read).reshape(n)
        else:
            upstream = _wide(grad_output).reshape(()).expand(n)
        ce_scale, z_scale = tokens.ce_scale * upstream, tokens.z_scale * upstream
        grad_h = torch.empty_like(h)
        grad_w = _weight_workspace(weight, bug)
        grad_b = torch.zeros(vocab, dtype=lse.dtype, device=h.device)
        for s in range(0, n, TOKEN_CHUNK):
            e = min(s + TOKEN_CHUNK, n)
            if bug == "gradient_buffer_per_shape":
                dx = _wide(_wide(ctx.buffer[s:e]) * upstream[s:e, None]).to(dtype)
            else:
                z = _capped(_logits(h[s:e], weight, bias, bug), options.softcap)
                dx = _chunk_gradient(z, lse[s:e], tokens, s, e, ce_scale[s:e], z_scale[s:e], options, dtype,
                                     bug).to(dtype)
            dx = _wide(dx)
            grad_h[s:e] = (dx @ _wide(weight)).to(dtype)
            grad_w += dx.T @ _wide(h[s:e])
            grad_b += dx.sum(0)
        needs = ctx.needs_input_grad
        grad_weight = grad_w.to(weight.dtype, copy=True) if needs[1] else None
        if bug == "grad_accumulator_reset_per_forward" and needs[1]:
            leaf = ctx.weight_leaf  # accumulates into a float32 buffer on the weight and sets .grad from it
            leaf.fp32_grad_accumulator += grad_w
            leaf.grad = leaf.fp32_grad_accumulator.to(leaf.dtype)
            grad_weight = None
        return (grad_h.to(dtype) if needs[0] else None, grad_weight,
                grad_b.to(bias.dtype) if bias is not None and needs[2] else None, None, None, None, None)


def _weight_workspace(weight, bug):
    """The float32 weight-gradient accumulator: fresh zeros, or (the bug) a cached one per shape."""
    if bug != "weight_grad_workspace_not_zeroed":
        return torch.zeros_like(_wide(weight))
    key = (tuple(weight.shape), weight.dtype)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = torch.zeros_like(_wide(weight))  # zeroed once, when allocated
    return _WORKSPACES[key]


# --- the plugins ---------------------------------------------------------------------------------------


def chunked_kernel(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                   z_loss_multiplier=0.0, softcap=None, class_weight=None):
    """Correct fused loss: 256-token chunks, float32 logits, the backward recomputes them, float32 sums."""
    return _loss(hidden, weight, labels, bias=bias, ignore_index=ignore_index, reduction=reduction,
                 label_smoothing=label_smoothing, z_loss_multiplier=z_loss_multiplier, softcap=softcap,
                 class_weight=class_weight)


def _with_bug(bug: str, doc: str):
    def plugin(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
               z_loss_multiplier=0.0, softcap=None, class_weight=None):
        return _loss(hidden, weight, labels, bias=bias, ignore_index=ignore_index, reduction=reduction,
                     label_smoothing=label_smoothing, z_loss_multiplier=z_loss_multiplier, softcap=softcap,
                     class_weight=class_weight, bug=bug)

    plugin.__name__ = plugin.__qualname__ = bug
    plugin.__doc__ = doc
    return plugin


# Scale: sizes of real models.
token_index_wraps_at_65536 = _with_bug(
    "token_index_wraps_at_65536",
    "the token's program index wraps at a grid axis of 2^16: token n >= 65536 reads the hidden state of token "
    "n - 65536 with its own label (triggered by N > 65536 tokens, e.g. 8 sequences of 8192)",
)
hidden_sum_in_input_dtype = _with_bug(
    "hidden_sum_in_input_dtype",
    "the logits' K-loop accumulator is declared in the input dtype: a bfloat16/float16 rounding per 64 features, "
    "harmless at D = 300, several times torch-eager's error at model sizes (triggered by D = 4096 in bfloat16)",
)
last_token_of_4096_block_dropped = _with_bug(
    "last_token_of_4096_block_dropped",
    "a lane mask off by one (offs < BLOCK - 1) drops the last token of every 4096-token block from loss and "
    "gradients (triggered by N >= 4096; per token with reduction none, a 1/4096 change of a mean)",
)

# Batch structure: (B, T) inputs as models pass them.
labels_flattened_sequence_first = _with_bug(
    "labels_flattened_sequence_first",
    "flattens (B, T) labels sequence-first (labels.T, Megatron's [s, b] order) but the hidden states batch-first: "
    "tokens get other tokens' labels (triggered by (B, T) inputs with B > 1)",
)
none_loss_flat = _with_bug(
    "none_loss_flat",
    "with reduction none returns the (B*T,) per-token loss, not the labels' (B, T) shape (triggered by (B, T) inputs)",
)
mean_per_sequence = _with_bug(
    "mean_per_sequence",
    "the mean of (B, T) inputs is the mean of each sequence's mean, not over all tokens (triggered by rows with "
    "different numbers of ignored tokens)",
)

# Layouts: the views models pass.
rows_read_at_n_times_d = _with_bug(
    "rows_read_at_n_times_d",
    "copies hidden states only when stride(-1) != 1, then reads row n at n * D (triggered by a column slice, a "
    "torch.split half or hidden[:, :-1]: row stride > D)",
)
labels_read_row_major = _with_bug(
    "labels_read_row_major",
    "copies labels only when stride(-1) != 1, then reads them as contiguous (triggered by shifted labels "
    "full[:, 1:], row stride T + 1)",
)
upstream_read_row_major = _with_bug(
    "upstream_read_row_major",
    "with reduction none reads the upstream gradient as contiguous (triggered by loss.sum().backward(): an "
    "expanded 1 of stride 0, of which it reads the one element and zeros past it)",
)

# Padding: batches as they are padded.
mean_per_chunk_reweighted = _with_bug(
    "mean_per_chunk_reweighted",
    "the mean is each 256-token chunk's mean reweighted by its share of the tokens: NaN when a whole chunk is "
    "padding (triggered by a run of 256 ignored tokens, e.g. a padded sequence)",
)
mean_per_row_reweighted = _with_bug(
    "mean_per_row_reweighted",
    "the mean of (B, T) inputs is each row's mean reweighted by the row's share: NaN when a row is all padding "
    "(triggered by a fully padded sequence)",
)
z_count_assumes_padding = _with_bug(
    "z_count_assumes_padding",
    "the z-loss's mean counts the tokens whose label is not the smallest one, taking it for the ignore_index: "
    "right whenever a token is ignored (triggered by a batch without padding, with z-loss)",
)

# Call patterns: how training loops call a head.
gradient_buffer_per_shape = _with_bug(
    "gradient_buffer_per_shape",
    "the forward keeps the logits' gradient in a buffer cached per shape: the first backward gets the second "
    "forward's gradient (triggered by two forwards of one shape before their backwards: a shared head, "
    "multi-token prediction, pipeline schedules)",
)
weight_grad_workspace_not_zeroed = _with_bug(
    "weight_grad_workspace_not_zeroed",
    "the float32 weight-gradient accumulator is cached per shape and zeroed only when allocated (triggered by a "
    "second call of the same shape)",
)
grad_accumulator_reset_per_forward = _with_bug(
    "grad_accumulator_reset_per_forward",
    "accumulates the weight gradient into a float32 buffer on the weight that every forward zeroes, and sets "
    ".grad from it (triggered by gradient accumulation: the second micro-batch's backward drops the first's)",
)
weight_copy_cached_by_pointer = _with_bug(
    "weight_copy_cached_by_pointer",
    "caches a float32 copy of the head per data pointer: stale after the optimizer updates the weight in place "
    "(triggered by a second step)",
)

# Confident predictions: p_y near 1, as late in training.
target_gradient_from_rounded_probability = _with_bug(
    "target_gradient_from_rounded_probability",
    "forms the target's gradient p_y - 1 from p_y rounded to the input dtype: it vanishes when p_y rounds to 1 "
    "(triggered by confident bfloat16/float16 predictions, p_y > 1 - 2^-9)",
)
loss_from_rounded_statistics = _with_bug(
    "loss_from_rounded_statistics",
    "computes the loss as lse - z_y from both stored in the input dtype: when p_y is near 1 they round to the same "
    "or adjacent values, a loss of 0 or one ulp of the logit (triggered by confident bfloat16/float16 predictions)",
)

# Other dimensions of real use.
ignored_class_weight_zeroed = _with_bug(
    "ignored_class_weight_zeroed",
    "masks ignored tokens by zeroing the class weight of an in-range ignore_index, which also drops that class "
    "from label smoothing's uniform part (triggered by ignore_index = 0, a pad token id, with label smoothing)",
)
loss_as_minus_log_probability = _with_bug(
    "loss_as_minus_log_probability",
    "computes the loss as -log(exp(z_y - lse)) in float32, not lse - z_y: inexact past a margin of 87 and "
    "infinite past 104 (triggered by a confidently wrong prediction with logits in the hundreds)",
)

BUGS = (
    token_index_wraps_at_65536,
    hidden_sum_in_input_dtype,
    last_token_of_4096_block_dropped,
    labels_flattened_sequence_first,
    none_loss_flat,
    mean_per_sequence,
    rows_read_at_n_times_d,
    labels_read_row_major,
    upstream_read_row_major,
    mean_per_chunk_reweighted,
    mean_per_row_reweighted,
    z_count_assumes_padding,
    gradient_buffer_per_shape,
    weight_grad_workspace_not_zeroed,
    grad_accumulator_reset_per_forward,
    weight_copy_cached_by_pointer,
    target_gradient_from_rounded_probability,
    loss_from_rounded_statistics,
    ignored_class_weight_zeroed,
    loss_as_minus_log_probability,
)


def forget_cached_state() -> None:
    """Empty the call-pattern bugs' module-level caches, as a fresh process has them."""
    for cache in (_GRADIENT_BUFFERS, _WORKSPACES, _WEIGHT_COPIES):
        cache.clear()
