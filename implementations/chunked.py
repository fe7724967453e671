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

On the CPU each chunk's work is shared among worker threads, one per intra-op thread, each running
its ops on one thread: first spans of the chunk's tokens (logits, statistics, gradient, the
hidden-state gradient), then spans of the vocabulary (the weight and bias gradients). No op waits
at a barrier for a thread that the machine's other work has descheduled (see ``CLASS_TASKS_PER_WORKER``).
"""

from __future__ import annotations

import functools
import math
import os
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


def _onednn_hidden_grad(out, grad, weight, alpha):
    """``out`` = (grad @ weight) * alpha through oneDNN, a block of classes at a time, summed in a
    (tokens, D) temporary."""
    linear, size = onednn_linear(), onednn_vocab_block(grad.shape[0], weight.shape[1])
    acc = None
    for start in range(0, weight.shape[0], size):
        block = slice(start, start + size)
        part = linear(grad[:, block], weight[block].t(), None, "none", [], "")
        acc = part if acc is None else acc.add_(part)
    torch.mul(acc, alpha, out=out)


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

# On the CPU, a chunk's work is shared among worker threads, as many as torch's intra-op threads,
# each running its ops on one OpenMP thread, instead of every op being split among the threads.
# An op split among threads ends at a barrier, and the floor case makes thousands of them: on a
# busy machine one thread is often descheduled and the other waits for it at each barrier (2.6-12
# x the quiet time beside one other process; docs/measurements/2026-12-07-chunked-under-load.md).
# A worker takes the next task when it finishes one, so a descheduled thread delays only its own.
# A chunk's vocabulary is cut into CLASS_TASKS_PER_WORKER spans per worker, so that a late task can be
# taken over. Its tokens are cut into one span per worker (of at least MIN_TASK_TOKENS): oneDNN
# reorders a block of the weight for every product, which a span of fewer tokens repays less (two
# spans per worker took 9% longer on the floor case, four 35%; docs/measurements/2026-12-07-chunked-under-load.md).
# A chunk of fewer than 2 x MIN_TASK_TOKENS tokens is one task and leaves the other workers idle:
# large vocabularies with a small D, whose budget allows chunks of a few dozen tokens (N = 1024,
# D = 64, V = 128256: chunks of 61 tokens, 901 ms with 16 against 1303 with 32).
ROW_TASKS_PER_WORKER = 1
CLASS_TASKS_PER_WORKER = 4
MIN_TASK_TOKENS = 16


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


def _start_worker(cpu: int | None) -> None:
    # torch sets a thread's OpenMP count on the thread's first parallel op (to torch.set_num_threads's
    # value, where it was called): that comes first, so that the limit of one thread stays.
    torch.get_num_threads()
    _openmp().limit(limits=1)
    torch.set_grad_enabled(False)  # as in the autograd function that calls the pass: no graph
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
    thread; ``map`` returns once all are done (the tasks of a chunk's next step depend on them)."""

    def __init__(self, count: int) -> None:
        self._pool = None
        if count > 1:
            cpus = iter(_worker_cpus(count) or [None] * count)  # each new thread takes the next
            self._pool = ThreadPoolExecutor(count, initializer=lambda: _start_worker(next(cpus)))

    def map(self, task, arguments) -> None:
        if self._pool is None:
            for args in arguments:
                task(*args)
        else:
            for _ in self._pool.map(lambda args: task(*args), arguments):
                pass  # re-raises a task's exception here

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def _spans(start: int, end: int, parts: int, multiple: int = 1) -> list[tuple[int, int]]:
    """[start, end) cut into at most ``parts`` spans, even, each a multiple of ``multiple`` but the last."""
    step = max(multiple, math.ceil((end - start) / parts / multiple) * multiple)
    return [(s, min(s + step, end)) for s in range(start, end, step)]


@dataclass(frozen=True)
class _Pass:
    """What a pass's tasks read and write. A chunk takes two steps: ``rows`` tasks (spans of its
    tokens: logits, statistics, the gradient in place in ``logits``, the hidden-state gradient),
    then ``classes`` tasks (spans of the vocabulary: the weight and bias gradients). Tasks of a step
    write disjoint slices."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    batch: _Batch
    spec: LossSpec
    terms: _GradientTerms | None  # None: no gradient wanted
    onednn: bool
    need_h: bool
    ce: torch.Tensor  # (N, 1) float32, written by the rows tasks; so are z_loss and alpha
    z_loss: torch.Tensor | None
    alpha: torch.Tensor  # (N, 1) float32: the per-token scale of the gradient kept in ``logits``
    logits: torch.Tensor  # (chunk, V) float32: the logits, then the gradient over alpha
    tanh: torch.Tensor | None  # (chunk, V) float32: a softcap's tanh, for its chain rule
    low_precision_grad: torch.Tensor | None  # (chunk, V) input dtype: the gradient for its matmuls
    grad_h: torch.Tensor | None
    grad_w: torch.Tensor | None  # (V, D) float32 accumulator
    grad_b: torch.Tensor | None  # (V,) float32 accumulator

    def rows(self, start: int, end: int, chunk_start: int) -> None:
        """Tokens [start, end) of the chunk that starts at ``chunk_start``."""
        spec, batch, weight, bias = self.spec, self.batch, self.weight, self.bias
        eps, m, vocab = spec.label_smoothing, spec.z_loss_multiplier, weight.shape[0]
        rows = slice(start - chunk_start, end - chunk_start)
        z, tanh = self.logits[rows], None if self.tanh is None else self.tanh[rows]
        if self.onednn:
            _onednn_logits_matmul(z, self.hidden[start:end], weight, bias, _matmul_scale(spec))
        else:
            _logits_matmul(z, self.hidden[start:end], weight, bias, _matmul_scale(spec))
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
            log_p_y[tiny] = _rows_label_log_probability(self.hidden[tiny + start], y[tiny], weight, bias, spec)
        ce = torch.neg(log_p_y, out=self.ce[start:end])
        if batch.label_weights is not None:
            ce.mul_(batch.label_weights[start:end])
        if eps:
            ce.mul_(1 - eps).add_(eps / vocab * (batch.smoothing_sum * ((z_y - shift) - log_p_y) - shifted_dot))
        if m:
            lse = z_y - log_p_y
            torch.mul(lse.square(), m, out=self.z_loss[start:end])
        if self.terms is not None:
            self._gradient_rows(z, tanh, y, lse if m else None, start, end, rows)

    def _gradient_rows(self, grad, tanh, y, lse, start, end, rows) -> None:
        """d(loss)/dz = alpha p - beta [j == y] - gamma w_j in place of p, divided by alpha (applied on
        the matmuls' small operands instead of in a pass of its own); then these tokens' rows of the
        hidden-state gradient. ``rows``: their rows in the chunk's buffers."""
        terms = self.terms
        alpha = self.alpha[start:end]
        if lse is None:
            alpha.copy_(terms.softmax[start:end])
        else:
            torch.add(terms.softmax[start:end], terms.z_loss[start:end] * lse, out=alpha)
        if terms.label is None:  # beta = alpha: the gradient over alpha is p - 1 at the label
            grad.scatter_add_(1, y, torch.full_like(alpha, -1.0))
        else:
            inverse = torch.where(alpha != 0, alpha.reciprocal(), 0.0)
            grad.scatter_add_(1, y, -(terms.label[start:end] * inverse))
            if self.spec.label_smoothing:
                grad.addmm_(terms.smoothing[start:end] * inverse, self.batch.smoothing_weights.t(), alpha=-1)
        if tanh is not None:
            _apply_softcap_chain_rule_(grad, tanh)
        if self.low_precision_grad is not None:  # the copy to the input dtype applies alpha on the way
            matmul_grad = torch.mul(grad, alpha, out=self.low_precision_grad[rows])
            if self.need_h:
                torch.mm(matmul_grad, self.weight, out=self.grad_h[start:end])
        elif self.need_h and self.onednn:
            _onednn_hidden_grad(self.grad_h[start:end], grad, self.weight, alpha)
        elif self.need_h:
            torch.mm(grad, self.weight, out=self.grad_h[start:end]).mul_(alpha)

    def scaled_hidden(self, chunk_start: int, chunk_end: int) -> torch.Tensor | None:
        """The chunk's hidden states as the weight gradient's matmul takes them (None: no weight
        gradient): times alpha, in float32 on the CPU; transposed, (D, tokens), for oneDNN."""
        if self.grad_w is None:
            return None
        hidden = self.hidden[chunk_start:chunk_end]
        if self.low_precision_grad is not None and hidden.is_cuda:
            return hidden  # alpha is in low_precision_grad; the matmul accumulates in float32
        scaled = hidden.float() * self.alpha[chunk_start:chunk_end]
        return scaled.t().contiguous() if self._weight_grad_through_onednn(chunk_end - chunk_start) else scaled

    def _weight_grad_through_onednn(self, tokens: int) -> bool:
        """oneDNN is slower than torch.mm on the weight gradient of a chunk of more tokens than D (its
        K longer than its N), so such chunks keep torch.mm (docs/measurements/2026-12-02-chunked-onednn.md)."""
        return self.onednn and tokens <= self.weight.shape[1]

    def classes(self, start: int, end: int, chunk_start: int, chunk_end: int, hidden: torch.Tensor | None) -> None:
        """Classes [start, end) of the weight and bias gradients, from the chunk that spans tokens
        [chunk_start, chunk_end); ``hidden`` is ``scaled_hidden``'s. The first chunk overwrites the
        weight gradient's accumulator (no pass to zero it)."""
        tokens, first = chunk_end - chunk_start, chunk_start == 0
        grad = self.logits[:tokens, start:end]
        if self.grad_b is not None:
            self.grad_b[start:end].addmv_(grad.t(), self.alpha[chunk_start:chunk_end, 0])
        if self.grad_w is None:
            return
        grad_w = self.grad_w[start:end]
        if self._weight_grad_through_onednn(tokens):
            _onednn_weight_grad(grad_w, grad, hidden, first)
        elif self.low_precision_grad is not None and grad.is_cuda:
            _accumulate_weight_grad(grad_w, self.low_precision_grad[:tokens, start:end], hidden, first)
        else:
            _accumulate_weight_grad(grad_w, grad, hidden, first)


def _chunked_pass(hidden, weight, bias, batch, spec, chunk_size, needs, onednn, workers, token_scale=None):
    """Run every chunk; return per-token (ce, z) before any reduction (z is None without z-loss) and
    the requested gradients (float32 accumulators for weight and bias). ``onednn``: the float32 CPU
    matmuls go through oneDNN (``onednn_linear``); ``workers``: threads sharing each chunk's tasks."""
    # One contiguous copy per pass, if any, instead of a strided matmul (or a copy) per chunk; oneDNN
    # reads a strided bias as if it were contiguous.
    hidden, weight = hidden.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    num_tokens, vocab = hidden.shape[0], weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    need_h, need_w, need_b = needs
    want_grad = need_h or need_w or need_b
    ce_all = torch.empty(num_tokens, 1, dtype=torch.float32, device=device)
    z_all = torch.empty_like(ce_all) if spec.z_loss_multiplier else None
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
            workspace_bytes=workers * ONEDNN_WORKSPACE_BYTES if onednn else 0,
        )
    rows = min(chunk_size, num_tokens)
    # The chunk's buffers, allocated once and reused by every chunk. The float32 ones (logits, and a
    # softcap's tanh) are one allocation: glibc returns the heap's free top to the system once it
    # exceeds a threshold that adapts to twice the largest allocation freed, which two equal buffers
    # freed together exceed, and the next call would fault all their pages in again.
    keep_tanh = want_grad and spec.softcap is not None
    float_bufs = torch.empty(2 if keep_tanh else 1, rows, vocab, dtype=torch.float32, device=device)
    low_precision = want_grad and dtype != torch.float32
    work = _Pass(
        hidden, weight, bias, batch, spec,
        terms=_GradientTerms.of(batch, spec, vocab, token_scale) if want_grad else None,
        onednn=onednn, need_h=need_h, ce=ce_all, z_loss=z_all, alpha=torch.empty_like(ce_all),
        logits=float_bufs[0], tanh=float_bufs[1] if keep_tanh else None,
        low_precision_grad=torch.empty(rows, vocab, dtype=dtype, device=device) if low_precision else None,
        grad_h=grad_h, grad_w=grad_w, grad_b=grad_b,
    )
    class_spans = _spans(0, vocab, workers * CLASS_TASKS_PER_WORKER if workers > 1 else 1, multiple=64)
    with _Workers(workers) as pool:
        for chunk_start in range(0, num_tokens, rows):
            chunk_end = min(chunk_start + rows, num_tokens)
            row_tasks = max(1, min(workers * ROW_TASKS_PER_WORKER, (chunk_end - chunk_start) // MIN_TASK_TOKENS))
            pool.map(work.rows, [(s, e, chunk_start) for s, e in _spans(chunk_start, chunk_end, row_tasks)])
            if need_w or need_b:
                scaled = work.scaled_hidden(chunk_start, chunk_end)
                pool.map(work.classes, [(s, e, chunk_start, chunk_end, scaled) for s, e in class_spans])
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
