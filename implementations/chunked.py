"""The project's own memory-efficient LM-head loss in pure PyTorch.

Tokens are processed in chunks, and each chunk's vocabulary in spans of classes. Each chunk's logits
are written by the matmul into one float32 buffer, which two steps turn, in place, into the
gradient of the logits:

1. logits and statistics, span by span: the options that change the logits (the logit scale, and
   a softcap's 1 / cap, as the matmul's own scalar factor; then ``_to_logits_``), then
   exp(z - m_s) in place with m_s the row's largest logit in the span, its sum, the label's logit
   and (with smoothing) sum_j w_j (z_j - m_s). The spans' statistics give each token's loss,
   z-loss and log-sum-exp (``_Pass.combine``: -log p_y = log(sum_j exp(z_j - M)) - (z_y - M), no
   exp at the label, so an underflowing probability loses nothing);
2. the gradient, span by span: exp(z - m_s) times one per-token factor is alpha p (alpha: the
   per-token scale of the softmax's term), then the label's and the smoothing's terms and the chain
   rule of the options that changed the logits; then the span's products: its share of the
   hidden-state gradient, its rows of the weight and bias gradients (float32 accumulators).

Peak extra memory is the chunk's buffers, sized from a budget relative to the lower bound (the
gradients of hidden and weight), plus the gradients themselves.

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
buffer. On CUDA the logits matmul writes float32 directly, the gradient is written into a buffer of
the input dtype for the two gradient matmuls, and the weight gradient is accumulated in float32 by
the matmul itself (``out_dtype``). PyTorch's CPU matmuls have no ``out_dtype``, so there the logits
are rounded to the input dtype first (as torch-eager's are) and the gradients' products are made in
float32, from float32 copies of the chunk's hidden states and of the weight, a block at a time.

Float32 on the CPU: the matmuls go through oneDNN where torch has it (``harness.onednn``), in
blocks of classes, since it runs at about twice torch.mm's rate on the project's AMD CPU machine;
``Chunked(onednn=False)`` keeps torch.mm, as a torch without oneDNN does.

On the CPU each step's spans are shared among worker threads, one per intra-op thread, each running
its ops on one thread and taking the next span when it finishes one: no op waits at a barrier for
a thread that the machine's other work has descheduled (see ``CLASS_TASKS_PER_WORKER``).
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
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
    float32, kept for its chain rule, and, for low-precision inputs, the gradient in the input dtype
    for a GPU's matmuls (kept free on a CPU too, where the products' temporaries are smaller)."""
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
# buffers and temporaries together keep to it (measured on the floor case, same page); each worker
# thread has temporaries of its own, so a pass reserves this once per worker.
ONEDNN_WORKSPACE_BYTES = 12 * 2**20


def onednn_vocab_block(tokens: int, dim: int) -> int:
    """Classes per oneDNN product: its (tokens, block) and (block, D) float32 temporaries take about
    ``ONEDNN_BLOCK_BYTES`` (each at least 64 classes, a multiple of 64)."""
    return max(64, ONEDNN_BLOCK_BYTES // (4 * max(tokens, dim)) // 64 * 64)


def _onednn_logits_matmul(out, hidden, weight, bias, scale):
    """``out`` (float32, CPU) = (hidden @ weight.T + bias) * scale through oneDNN, a block of classes at a time."""
    linear, size = onednn_linear(), onednn_vocab_block(*hidden.shape)
    for start in range(0, weight.shape[0], size):
        block = slice(start, start + size)
        part = linear(hidden, weight[block], None if bias is None else bias[block], "none", [], "")
        if scale == 1.0:
            out[:, block].copy_(part)
        else:
            torch.mul(part, scale, out=out[:, block])


def _blocked_hidden_grad(grad, weight, linear):
    """grad @ weight in float32, a block of classes at a time through ``linear`` (oneDNN's, or
    torch's on float32 copies of low-precision weight blocks), summed in a (tokens, D) temporary."""
    size = onednn_vocab_block(grad.shape[0], weight.shape[1])
    acc = None
    for start in range(0, weight.shape[0], size):
        block = slice(start, start + size)
        part = linear(grad[:, block], weight[block].float().t())
        acc = part if acc is None else acc.add_(part)
    return acc


def _onednn_weight_grad(grad_w, grad, hidden_t, first):
    """grad_w (+)= grad.T @ hidden_t.T through oneDNN, a block of classes at a time. ``hidden_t`` is
    (D, tokens), oneDNN's weight operand; it reads a transposed source slowly, so each block of
    ``grad`` is transposed first (docs/measurements/2026-12-02-chunked-onednn.md)."""
    linear, size = onednn_linear(), onednn_vocab_block(grad.shape[0], hidden_t.shape[0])
    for start in range(0, grad.shape[1], size):
        block = slice(start, start + size)
        part = linear(grad[:, block].t().contiguous(), hidden_t, None, "none", [], "")
        if first:
            grad_w[block].copy_(part)
        else:
            grad_w[block].add_(part)


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


# On the CPU, a chunk's work is shared among worker threads, as many as torch's intra-op threads,
# each running its ops on one OpenMP thread, instead of every op being split among the threads.
# An op split among threads ends at a barrier, and the floor case makes thousands of them: on a
# busy machine one thread is often descheduled and the other waits for it at each barrier (2.6-12
# x the quiet time beside one other process; docs/measurements/2026-12-07-chunked-under-load.md).
# Both steps of a chunk are cut into spans of the vocabulary, CLASS_TASKS_PER_WORKER per worker,
# every token of the chunk in each (oneDNN reorders a block of the weight for every product, which
# a product of more tokens repays better); a worker takes the next span when it finishes one, so a
# descheduled thread holds up the step's end by one span at most. 4 and 16 spans per worker were
# no faster on the floor case, quiet or beside one other process.
CLASS_TASKS_PER_WORKER = 8


@functools.cache
def _openmp():
    """threadpoolctl's handle on the OpenMP runtime of torch's CPU ops, or None (no threadpoolctl,
    or a torch built without OpenMP). OpenMP's thread count belongs to the thread that sets it."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    openmp = ThreadpoolController().select(user_api="openmp")
    return openmp if openmp.lib_controllers else None


def cpu_workers(device: torch.device) -> int:
    """Worker threads of a pass on ``device``: torch's intra-op thread count on the CPU where each
    thread's OpenMP count can be set, else 1 (the calling thread, each op using every intra-op thread)."""
    if device.type != "cpu" or torch.get_num_threads() == 1 or _openmp() is None:
        return 1
    return torch.get_num_threads()


def _start_worker(local: threading.local, index: int, cpu: int | None) -> None:
    # torch sets a thread's OpenMP count on the thread's first parallel op (to torch.set_num_threads's
    # value, where it was called): that comes first, so that the limit of one thread stays.
    torch.get_num_threads()
    _openmp().limit(limits=1)
    torch.set_grad_enabled(False)  # as in the autograd function that calls the pass: no graph
    local.index = index
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})  # this thread only


def _worker_cpus(count: int) -> list[int] | None:
    """The CPU of each worker: one each where there are as many workers as CPUs this process may
    run on, else None (unpinned). Beside another busy process, unpinned workers are often both put on
    one CPU while the other process has the other to itself, and the pass gets half the machine
    instead of three quarters (docs/measurements/2026-12-07-chunked-under-load.md). With fewer
    workers than CPUs they stay unpinned: two workers pinned to the two hyperthreads of a core
    would share it even on an idle machine."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return cpus if len(cpus) == count else None


class _Workers:
    """Runs each task of a list, on ``count`` worker threads or, with a count of 1, in the calling
    thread; ``map`` returns once all are done (the tasks of a chunk's next step depend on them). A
    task's first argument is the index of the worker that runs it, for buffers of its own."""

    def __init__(self, count: int) -> None:
        self._local = threading.local()
        self._local.index = 0
        indices, cpus = itertools.count(), _worker_cpus(count)

        def start() -> None:
            index = next(indices)
            _start_worker(self._local, index, None if cpus is None else cpus[index])

        self._pool = None if count == 1 else ThreadPoolExecutor(count, initializer=start)
        # While the workers run the steps, the calling thread's own ops (between steps, on (tokens,
        # D) tensors) stay on one thread too: a team of threads would wait at its barrier as well.
        self._caller_limit = None if count == 1 else _openmp().limit(limits=1)

    def map(self, task, arguments) -> None:
        if self._pool is None:
            for args in arguments:
                task(0, *args)
        else:
            for _ in self._pool.map(lambda args: task(self._local.index, *args), arguments):
                pass  # re-raises a task's exception here

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._caller_limit.restore_original_limits()


def _spans(start: int, end: int, parts: int, multiple: int = 1) -> list[tuple[int, int]]:
    """[start, end) cut into at most ``parts`` spans, even, each a multiple of ``multiple`` but the last."""
    step = max(multiple, math.ceil((end - start) / parts / multiple) * multiple)
    return [(s, min(s + step, end)) for s in range(start, end, step)]


@dataclass(frozen=True)
class _SpanStatistics:
    """What the logits step leaves per span of classes and token, (spans, chunk) float32 rows (a
    task writes its own row): the row's largest logit m_s in the span, sum of exp(z - m_s), the
    label's logit where the label is in the span (else 0), the smoothing's sum of w_j (z_j - m_s),
    and, written between the steps, the factor that turns exp(z - m_s) into the gradient's alpha p."""

    max: torch.Tensor
    exp_sum: torch.Tensor
    label_logit: torch.Tensor
    smoothing_dot: torch.Tensor
    probability_scale: torch.Tensor

    @staticmethod
    def empty(spans: int, rows: int, device) -> _SpanStatistics:
        return _SpanStatistics(*torch.empty(5, spans, rows, dtype=torch.float32, device=device))


@dataclass(frozen=True)
class _ChunkOperands:
    """A chunk's hidden states as the products of the gradient step take them, made once per chunk:
    float32 on the CPU (``hidden``), and transposed, (D, tokens), for oneDNN's weight gradient."""

    hidden: torch.Tensor | None
    hidden_t: torch.Tensor | None


@dataclass(frozen=True)
class _Pass:
    """What a pass's tasks read and write. A chunk takes two steps, each a task per span of classes:
    ``logits`` (the logits and their per-span statistics), then, after ``combine`` has made the
    tokens' loss and log-sum-exp from the spans' statistics, ``gradient`` (the gradient in place of
    the logits, and its products: the span's share of the hidden-state gradient, its rows of the
    weight and bias gradients). Tasks of a step write disjoint slices."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    batch: _Batch
    spec: LossSpec
    terms: _GradientTerms | None  # None: no gradient wanted
    onednn: bool
    need_h: bool
    spans: list[tuple[int, int]]
    span_smoothing_sums: torch.Tensor | None  # (spans, 1) float32: sum of w over each span; with smoothing
    ce: torch.Tensor  # (N,) float32, written by ``combine``; so are z_loss and alpha
    z_loss: torch.Tensor | None
    alpha: torch.Tensor  # (N,) float32: the per-token factor of p in the gradient
    stats: _SpanStatistics
    logits: torch.Tensor  # (chunk, V) float32: the logits, exp(z - m_s), then the gradient
    tanh: torch.Tensor | None  # (chunk, V) float32: a softcap's tanh, for its chain rule
    low_precision_grad: torch.Tensor | None  # (chunk, V) input dtype: the gradient for a GPU's matmuls
    grad_h: torch.Tensor | None
    grad_h_parts: torch.Tensor | None  # (workers, chunk, D) float32: each worker's sum of its spans' shares
    grad_w: torch.Tensor | None  # (V, D) float32 accumulator
    grad_b: torch.Tensor | None  # (V,) float32 accumulator

    def _labels_in_span(self, k: int, chunk_start: int, chunk_end: int):
        """The chunk's labels as indices into span k (clamped into it), and which are in it."""
        start, end = self.spans[k]
        labels = self.batch.safe_labels[chunk_start:chunk_end]
        return (labels - start).clamp_(0, end - start - 1), (labels >= start) & (labels < end)

    def logits_step(self, _worker: int, k: int, chunk_start: int, chunk_end: int) -> None:
        """Span k's logits for the chunk's tokens, replaced by exp(z - m_s), and its statistics."""
        spec, stats, (start, end) = self.spec, self.stats, self.spans[k]
        tokens = chunk_end - chunk_start
        z = self.logits[:tokens, start:end]
        tanh = None if self.tanh is None else self.tanh[:tokens, start:end]
        hidden, weight = self.hidden[chunk_start:chunk_end], self.weight[start:end]
        bias = None if self.bias is None else self.bias[start:end]
        if self.onednn:
            _onednn_logits_matmul(z, hidden, weight, bias, _matmul_scale(spec))
        else:
            _logits_matmul(z, hidden, weight, bias, _matmul_scale(spec))
        _to_logits_(z, spec, tanh)
        index, in_span = self._labels_in_span(k, chunk_start, chunk_end)
        torch.mul(z.gather(1, index), in_span, out=stats.label_logit[k, :tokens, None])
        row_max = torch.amax(z, 1, keepdim=True, out=stats.max[k, :tokens, None])
        z.sub_(row_max)
        if spec.label_smoothing:  # shifted by the span's max, so that no large sums cancel
            torch.mm(z, self.batch.smoothing_weights[start:end], out=stats.smoothing_dot[k, :tokens, None])
        torch.sum(z.exp_(), 1, keepdim=True, out=stats.exp_sum[k, :tokens, None])

    def combine(self, chunk_start: int, chunk_end: int) -> None:
        """The chunk's tokens' cross-entropy, z-loss and alpha from the spans' statistics, and each
        span's factor for the gradient step. -log p_y = log(sum_j exp(z_j - M)) - (z_y - M), M the
        row's largest logit: no exp at the label, so a probability that underflows loses nothing."""
        spec, stats, batch = self.spec, self.stats, self.batch
        eps, m, vocab = spec.label_smoothing, spec.z_loss_multiplier, self.weight.shape[0]
        tokens, rows = chunk_end - chunk_start, slice(chunk_start, chunk_end)
        span_max = stats.max[:, :tokens]
        row_max = span_max.amax(0)
        log_total = (stats.exp_sum[:, :tokens] * (span_max - row_max).exp_()).sum(0).log_()
        ce = torch.sub(log_total, stats.label_logit[:, :tokens].sum(0) - row_max, out=self.ce[rows])
        if batch.label_weights is not None:
            ce.mul_(batch.label_weights[rows, 0])
        if eps:  # -sum_j w_j log p_j = sum(w) log_total - sum_j w_j (z_j - M)
            shifted_dot = (stats.smoothing_dot[:, :tokens] + (span_max - row_max) * self.span_smoothing_sums).sum(0)
            ce.mul_(1 - eps).add_(eps / vocab * (batch.smoothing_sum * log_total - shifted_dot))
        lse = row_max + log_total
        if m:
            torch.mul(lse.square(), m, out=self.z_loss[rows])
        if self.terms is None:
            return
        alpha = self.alpha[rows]
        if m:
            torch.add(self.terms.softmax[rows, 0], self.terms.z_loss[rows, 0] * lse, out=alpha)
        else:
            alpha.copy_(self.terms.softmax[rows, 0])
        # p_j = exp(z_j - m_s) exp((m_s - M) - log_total): no rounding of a large lse in the factor.
        torch.mul((span_max - row_max).sub_(log_total).exp_(), alpha, out=stats.probability_scale[:, :tokens])

    def operands(self, chunk_start: int, chunk_end: int) -> _ChunkOperands:
        """The chunk's hidden states for the gradient step's products (``_ChunkOperands``)."""
        hidden = self.hidden[chunk_start:chunk_end]
        if hidden.is_cuda:
            return _ChunkOperands(hidden, None)
        hidden = hidden.float()
        if self.grad_w is not None and self._weight_grad_through_onednn(chunk_end - chunk_start):
            return _ChunkOperands(hidden, hidden.t().contiguous())
        return _ChunkOperands(hidden, None)

    def _weight_grad_through_onednn(self, tokens: int) -> bool:
        """oneDNN is slower than torch.mm on the weight gradient of a chunk of more tokens than D (its
        K longer than its N), so such chunks keep torch.mm (docs/measurements/2026-12-02-chunked-onednn.md)."""
        return self.onednn and tokens <= self.weight.shape[1]

    def gradient_step(self, worker: int, k: int, chunk_start: int, chunk_end: int, operands: _ChunkOperands) -> None:
        """d(loss)/dz = alpha p - beta [j == y] - gamma w_j over span k, in place of exp(z - m_s), then
        its products."""
        terms, (start, end) = self.terms, self.spans[k]
        tokens, rows = chunk_end - chunk_start, slice(chunk_start, chunk_end)
        grad = self.logits[:tokens, start:end]
        grad.mul_(self.stats.probability_scale[k, :tokens, None])
        index, in_span = self._labels_in_span(k, chunk_start, chunk_end)
        beta = self.alpha[rows, None] if terms.label is None else terms.label[rows]
        grad.scatter_add_(1, index, torch.where(in_span, -beta, 0.0))
        if self.spec.label_smoothing:
            grad.addmm_(terms.smoothing[rows], self.batch.smoothing_weights[start:end].t(), alpha=-1)
        if self.tanh is not None:
            _apply_softcap_chain_rule_(grad, self.tanh[:tokens, start:end])
        if self.grad_b is not None:
            self.grad_b[start:end].add_(grad.sum(0))
        if grad.is_cuda:
            self._gpu_products(grad, chunk_start, chunk_end, operands)
        else:
            self._cpu_products(worker, grad, start, end, chunk_start, chunk_end, operands)

    def _gpu_products(self, grad, chunk_start, chunk_end, operands) -> None:
        """A GPU's pass has one span, the whole vocabulary: its products write the gradients whole;
        low-precision inputs' matmuls take the gradient in their dtype and accumulate in float32."""
        if self.low_precision_grad is not None:
            grad = self.low_precision_grad[: chunk_end - chunk_start].copy_(grad)
        if self.need_h:
            torch.mm(grad, self.weight, out=self.grad_h[chunk_start:chunk_end])
        if self.grad_w is not None:
            _accumulate_weight_grad(self.grad_w, grad, operands.hidden, chunk_start == 0)

    def _cpu_products(self, worker, grad, start, end, chunk_start, chunk_end, operands) -> None:
        """Span [start, end)'s products in float32: its share of the hidden-state gradient (added to
        the worker's part, or written whole with one span) and its rows of the weight gradient."""
        if self.need_h:
            linear = _onednn_linear_function() if self.onednn else torch.nn.functional.linear
            share = _blocked_hidden_grad(grad, self.weight[start:end], linear)
            if self.grad_h_parts is None:
                self.grad_h[chunk_start:chunk_end].copy_(share)
            else:
                self.grad_h_parts[worker, : chunk_end - chunk_start].add_(share)
        if self.grad_w is None:
            return
        grad_w, first = self.grad_w[start:end], chunk_start == 0
        if operands.hidden_t is not None:
            _onednn_weight_grad(grad_w, grad, operands.hidden_t, first)
        else:
            _accumulate_weight_grad(grad_w, grad, operands.hidden, first)

    def sum_hidden_grad_parts(self, chunk_start: int, chunk_end: int) -> None:
        """The chunk's rows of the hidden-state gradient: the workers' parts summed (several spans)."""
        if self.grad_h_parts is not None:
            parts = self.grad_h_parts[:, : chunk_end - chunk_start]
            self.grad_h[chunk_start:chunk_end].copy_(parts.sum(0))


def _onednn_linear_function():
    """oneDNN's linear as ``torch.nn.functional.linear``'s signature (input, weight, bias=None)."""
    linear = onednn_linear()
    return lambda x, w, b=None: linear(x, w, b, "none", [], "")


def _chunked_pass(hidden, weight, bias, batch, spec, chunk_size, needs, onednn, workers, token_scale=None):
    """Run every chunk; return per-token (ce, z) before any reduction (z is None without z-loss) and
    the requested gradients (float32 accumulators for weight and bias). ``onednn``: the float32 CPU
    matmuls go through oneDNN (``onednn_linear``); ``workers``: threads sharing each chunk's tasks."""
    # One contiguous copy per pass, if any, instead of a strided matmul (or a copy) per chunk; oneDNN
    # reads a strided bias as if it were contiguous.
    hidden, weight = hidden.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    num_tokens, dim, vocab = *hidden.shape, weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    need_h, need_w, need_b = needs
    want_grad = need_h or need_w or need_b
    ce_all = torch.empty(num_tokens, dtype=torch.float32, device=device)
    z_all = torch.empty_like(ce_all) if spec.z_loss_multiplier else None
    grad_h = torch.empty_like(hidden) if need_h else None
    # Zeros only for an empty batch: otherwise the first chunk's matmul overwrites them.
    new_accumulator = torch.zeros if num_tokens == 0 else torch.empty
    grad_w = new_accumulator(weight.shape, dtype=torch.float32, device=device) if need_w else None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=device) if need_b else None
    if num_tokens == 0:
        return ce_all, z_all, grad_h, grad_w, grad_b
    if chunk_size is None:
        chunk_size = default_chunk_size(
            num_tokens, vocab, dim, dtype=dtype, spec=spec, has_bias=bias is not None, want_grad=want_grad,
            workspace_bytes=workers * ONEDNN_WORKSPACE_BYTES if onednn else 0,
        )
    rows = min(chunk_size, num_tokens)
    spans = _spans(0, vocab, workers * CLASS_TASKS_PER_WORKER if workers > 1 else 1, multiple=64)
    # The chunk's buffers, allocated once and reused by every chunk. The float32 ones (logits, and a
    # softcap's tanh) are one allocation: glibc returns the heap's free top to the system once it
    # exceeds a threshold that adapts to twice the largest allocation freed, which two equal buffers
    # freed together exceed, and the next call would fault all their pages in again.
    keep_tanh = want_grad and spec.softcap is not None
    float_bufs = torch.empty(2 if keep_tanh else 1, rows, vocab, dtype=torch.float32, device=device)
    low_precision = want_grad and dtype != torch.float32 and hidden.is_cuda
    smoothing = batch.smoothing_weights
    work = _Pass(
        hidden, weight, bias, batch, spec,
        terms=_GradientTerms.of(batch, spec, vocab, token_scale) if want_grad else None,
        onednn=onednn, need_h=need_h, spans=spans,
        span_smoothing_sums=None if smoothing is None else torch.stack([smoothing[s:e].sum() for s, e in spans])[:, None],
        ce=ce_all, z_loss=z_all, alpha=torch.empty_like(ce_all), stats=_SpanStatistics.empty(len(spans), rows, device),
        logits=float_bufs[0], tanh=float_bufs[1] if keep_tanh else None,
        low_precision_grad=torch.empty(rows, vocab, dtype=dtype, device=device) if low_precision else None,
        grad_h=grad_h,
        grad_h_parts=torch.empty(workers, rows, dim, device=device) if need_h and len(spans) > 1 else None,
        grad_w=grad_w, grad_b=grad_b,
    )
    with _Workers(workers) as pool:
        for chunk_start in range(0, num_tokens, rows):
            chunk_end = min(chunk_start + rows, num_tokens)
            pool.map(work.logits_step, [(k, chunk_start, chunk_end) for k in range(len(spans))])
            work.combine(chunk_start, chunk_end)
            if want_grad:
                if work.grad_h_parts is not None:
                    work.grad_h_parts.zero_()
                operands = work.operands(chunk_start, chunk_end)
                pool.map(work.gradient_step, [(k, chunk_start, chunk_end, operands) for k in range(len(spans))])
                work.sum_hidden_grad_parts(chunk_start, chunk_end)
    return ce_all, z_all, grad_h, grad_w, grad_b


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
    def forward(ctx, hidden, weight, bias, labels, spec, chunk_size, onednn, workers, compute_grads):
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        needs = tuple(n and compute_grads for n in needs)
        defer = spec.reduction == "none"
        batch = _Batch.of(labels, spec, weight.shape[0])
        ce, z, grad_h, grad_w, grad_b = _chunked_pass(
            hidden, weight, bias, batch, spec, chunk_size, (False, False, False) if defer else needs, onednn,
            workers,
        )
        loss, z_loss = _reduce(ce, z, batch, spec)
        # The inputs are saved (references, no memory) for a recomputation; the forward's gradients
        # are kept outside save_for_backward, to be handed over to the first backward.
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.grads = None if defer else (grad_h, grad_w, grad_b)
        ctx.spec, ctx.chunk_size, ctx.needs, ctx.defer = spec, chunk_size, needs, defer
        ctx.onednn, ctx.workers = onednn, workers
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
                hidden, weight, bias, batch, ctx.spec, ctx.chunk_size, ctx.needs, ctx.onednn, ctx.workers,
                token_scale=upstream,
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
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


SUPPORTED = ("bias", "ignore_index", "label_smoothing", "z_loss", "logit_scale", "softcap", "loss_div_factor",
             "class_weight")


class Chunked(Implementation):
    name = "chunked"
    family = "native"
    summary = "project's pure-PyTorch chunked loss: gradients computed chunk by chunk in the forward"

    def __init__(self, chunk_size: int | None = None, *, onednn: bool = True, workers: int | None = None) -> None:
        """``onednn=False`` keeps float32 CPU matmuls on torch.mm, the path of a torch without oneDNN;
        ``workers`` sets the worker threads of a CPU pass (default ``cpu_workers``; 1: each op uses
        every intra-op thread, the path where OpenMP's per-thread count cannot be set)."""
        self.chunk_size = chunk_size
        self.onednn = onednn
        self.workers = workers

    def with_chunk_size(self, chunk_size):
        return Chunked(chunk_size=chunk_size, onednn=self.onednn, workers=self.workers)

    def capabilities(self, device):
        return Capabilities(supported_options=SUPPORTED)

    def compute(self, hidden, weight, labels, spec, bias):
        chunk_size = None if self.chunk_size is None else max(1, self.chunk_size)
        onednn = (self.onednn and hidden.device.type == "cpu" and hidden.dtype == torch.float32
                  and onednn_linear() is not None)
        workers = cpu_workers(hidden.device) if self.workers is None or hidden.device.type != "cpu" else self.workers
        loss, z_loss = _ChunkedLinearCrossEntropy.apply(
            hidden, weight, bias, labels, spec, chunk_size, onednn, workers, torch.is_grad_enabled()
        )
        return LossOutput(loss, z_loss)
