"""Vocab-parallel heads across processes: the ``distributed`` family.

When one device cannot hold the head, trainers shard the vocabulary over P tensor-parallel ranks:
each holds about V/P rows of the weight (and of the bias and class weights), computes its own
logits, and the softmax's maximum, sum and target logit are all-reduced. The implementations:

- ``dtensor-loss-parallel``: torch's ``loss_parallel()`` over the class-sharded logits as a
  ``DTensor`` (how torchtitan and OLMo-core's tensor-parallel heads compute the loss);
- ``chunked-vocab-parallel``: the project's chunked loss with the weight sharded by vocabulary,
  written from the math in ``implementations.vocab_parallel.ranks``: every option;
- ``megatron-vocab-parallel``: Megatron-core's ``vocab_parallel_cross_entropy``, when
  megatron-core is installed (the ``megatron`` extra, part of ``all``: it installs and imports on
  a CPU). Its label smoothing is local to each rank's shard: a known failure of the gate
  (declared beside it, ``implementations.vocab_parallel.megatron_known``).

How they run: ``compute`` hands each rank its shard through a persistent pool of P processes
(``implementations.vocab_parallel.pool``; gloo on CPU, NCCL on GPUs) and wraps the result in an
autograd function, so the gate sees one implementation with the usual contract: the loss, and
gradients of hidden, weight and bias gathered from the shards (the weight and bias gradients are
the ranks' rows concatenated; the hidden-state gradient is all-reduced among the ranks). With
reduction ``mean`` or ``sum`` the ranks compute the gradients in the forward and backward scales
them; with ``none`` backward sends the per-token upstream gradient for a second pass.

**P and the shards.** P is 2 when the batch has an even number of tokens and 3 when odd, so every
run of the gate uses both (the reproducer's N says which). The shards are contiguous ranges of
classes, split as each library assumes (``implementations.vocab_parallel.shards``):
``chunked-vocab-parallel`` balanced (the first V mod P ranks hold one class more),
``dtensor-loss-parallel`` as DTensor's ``Shard`` (ceil(V / P) per rank, the last ones fewer,
possibly none), ``megatron-vocab-parallel`` equal (V divisible by P; other cases are refused).
Most of the gate's vocabularies are odd or prime, so most shards are uneven.

The sweep runs them under ``torchrun --nproc-per-node P`` instead (``vocab_parallel.torchrun``).
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from harness.adapter import Availability, Capabilities, Implementation
from harness.errors import UnsupportedCase
from harness.spec import ORIGINAL_OPTIONS, LossOutput, LossSpec
from implementations.vocab_parallel.ranks import Reply, Request
from implementations.vocab_parallel.shards import split_vocab

WORLD_SIZES = (2, 3)
# The options each adapter here implements; the peers' gaps are in their UNSUPPORTED tables below.
SUPPORTED = ORIGINAL_OPTIONS
CHUNKED_SUPPORTED = (*ORIGINAL_OPTIONS, "logit_scale")  # the project's own loss: every option


def world_size_for(num_tokens: int) -> int:
    """P for a batch of ``num_tokens`` tokens: 2 when even, 3 when odd."""
    return WORLD_SIZES[num_tokens % len(WORLD_SIZES)]


def equal_shards_world_size(num_tokens: int, vocab: int, who: str) -> int:
    """P for a library that assumes V / P classes on every rank (it derives rank r's first class as
    r V / P): the usual P when it divides V, else the other one that does; else the case is refused."""
    preferred = world_size_for(num_tokens)
    for world_size in (preferred, *[p for p in WORLD_SIZES if p != preferred]):
        if vocab % world_size == 0:
            return world_size
    raise UnsupportedCase(f"{who} assumes V divisible by P (equal vocabulary shards); V = {vocab} is divisible "
                          f"by none of {', '.join(map(str, WORLD_SIZES))}")


def _gathered(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if parts[0] is None else torch.cat(parts)


class _VocabParallelLoss(torch.autograd.Function):
    """The P ranks' loss as one autograd node (gradients from the ranks, not from autograd here)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, spec, run, grad_enabled):
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        needs = tuple(n and grad_enabled for n in needs)
        defer = spec.reduction == "none"
        upstream = None if defer or not any(needs) else torch.ones(())
        loss, z_loss, grads = run(hidden, weight, bias, labels, spec, needs, upstream)
        if defer:
            ctx.save_for_backward(hidden, weight, bias, labels)
        else:
            ctx.save_for_backward(*grads)
        ctx.spec, ctx.run, ctx.needs, ctx.defer = spec, run, needs, defer
        ctx.mark_non_differentiable(z_loss)
        return loss, z_loss

    @staticmethod
    def backward(ctx, grad_loss, _grad_z_loss):
        if ctx.defer:
            hidden, weight, bias, labels = ctx.saved_tensors
            _, _, grads = ctx.run(hidden, weight, bias, labels, ctx.spec, ctx.needs, grad_loss)
        else:
            # Scaled copies: the saved gradients stay as they were for a second backward.
            grads = tuple(None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)
        grad_h, grad_w, grad_b = grads
        return grad_h, grad_w, grad_b, None, None, None, None


class VocabParallel(Implementation):
    """Base of the family: P ranks, each with its shard; subclasses name the rank-side computation
    (``rank_family``, see ``vocab_parallel.ranks``) and the split its library assumes."""

    family = "distributed"
    has_logits_path = False  # the point is never to gather the (N, V) logits; generation is another path
    torchrun_module = "implementations.vocab_parallel.torchrun"  # the sweep's job: one process per rank
    rank_family = ""
    split = "balanced"

    def __init__(self, chunk_size: int | None = None) -> None:
        self.chunk_size = chunk_size

    def world_size(self, num_tokens: int, vocab: int) -> int:
        return world_size_for(num_tokens)

    def shards(self, vocab: int, world_size: int):
        return split_vocab(vocab, world_size, self.split)

    def full_class_weight(self) -> bool:
        """Whether every rank takes all V class weights (else its own entries)."""
        return False

    def compute(self, hidden, weight, labels, spec, bias):
        world_size = self.world_size(hidden.shape[0], weight.shape[0])
        backend = "gloo"
        if hidden.device.type == "cuda":
            if torch.cuda.device_count() < world_size:
                raise UnsupportedCase(f"{self.name} with P = {world_size} needs {world_size} GPUs for NCCL; "
                                      f"this machine has {torch.cuda.device_count()}")
            backend = "nccl"

        def run(hidden, weight, bias, labels, spec, needs, upstream):
            return self._run(world_size, backend, hidden, weight, bias, labels, spec, needs, upstream)

        loss, z_loss = _VocabParallelLoss.apply(hidden, weight, bias, labels, spec, run, torch.is_grad_enabled())
        return LossOutput(loss, z_loss if self._reports_z_loss(spec) else None)

    def _reports_z_loss(self, spec: LossSpec) -> bool:
        return True

    def _run(self, world_size, backend, hidden, weight, bias, labels, spec, needs, upstream):
        from implementations.vocab_parallel.pool import pool_for

        def cpu(t):  # a copy of its own: torch.save would send a view's whole storage
            return None if t is None else t.detach().to("cpu", copy=True).contiguous()

        class_weight = spec.class_weight
        rank_spec = spec.replace(class_weight=None)
        requests = []
        for shard in self.shards(weight.shape[0], world_size):
            rows = slice(shard.start, shard.stop)
            own_weights = None
            if class_weight is not None:
                own_weights = class_weight if self.full_class_weight() else class_weight[rows]
            requests.append(Request(
                family=self.rank_family, hidden=cpu(hidden), labels=cpu(labels), weight=cpu(weight[rows]),
                bias=None if bias is None else cpu(bias[rows]), class_weight=cpu(own_weights), spec=rank_spec,
                vocab=weight.shape[0], start=shard.start, needs=needs, upstream=cpu(upstream),
                chunk_size=self.chunk_size,
            ))
        replies: list[Reply] = pool_for(world_size, backend).run(requests)
        device = hidden.device
        first = replies[0]
        grads = (
            None if first.grad_hidden is None else first.grad_hidden.to(device),
            _gathered([r.grad_weight for r in replies]),
            _gathered([r.grad_bias for r in replies]),
        )
        grads = tuple(None if g is None else g.to(device) for g in grads)
        z_loss = first.z_loss if first.z_loss is not None else torch.zeros_like(first.loss)
        return first.loss.to(device), z_loss.to(device), grads


class ChunkedVocabParallel(VocabParallel):
    name = "chunked-vocab-parallel"
    summary = "the project's chunked loss with the head sharded by vocabulary over P gloo ranks (every option)"
    rank_family = "chunked"
    split = "balanced"

    def capabilities(self, device):
        return Capabilities(supported_options=CHUNKED_SUPPORTED)

    def with_chunk_size(self, chunk_size):
        return ChunkedVocabParallel(chunk_size=chunk_size)


# torch 2.13's loss_parallel(): "label_smoothing: Currently not supported" (it raises).
DTENSOR_UNSUPPORTED = {
    "label_smoothing": "torch's loss_parallel() does not support label_smoothing (documented as not supported "
                       "in torch 2.13; it raises a mixed Tensor/DTensor error)",
}


class DTensorLossParallel(VocabParallel):
    name = "dtensor-loss-parallel"
    summary = "torch's loss_parallel(): F.cross_entropy on class-sharded DTensor logits over P gloo ranks"
    rank_family = "dtensor"
    split = "ceil"  # DTensor's Shard placement: it derives each rank's first class id from it

    def availability(self):
        import torch.distributed as dist

        if not dist.is_available():
            return Availability(False, "this torch build has no torch.distributed")
        return Availability(True, "gloo ranks on CPU, NCCL on GPUs")

    def capabilities(self, device):
        return Capabilities(supported_options=SUPPORTED, unsupported_options=DTENSOR_UNSUPPORTED)

    def full_class_weight(self):
        return True  # loss_parallel takes the class weights replicated

    def known_issues(self, device):
        from implementations.vocab_parallel.megatron_known import LOSS_PARALLEL_ISSUES

        return LOSS_PARALLEL_ISSUES

    def shards(self, vocab, world_size):
        shards = super().shards(vocab, world_size)
        if any(shard.size == 0 for shard in shards):
            # Not run: the empty rank raises while the others wait in a collective until gloo's timeout.
            raise UnsupportedCase(
                f"torch's loss_parallel() fails on a rank that holds no class (V = {vocab} over P = {world_size} "
                f"leaves rank {world_size - 1} empty under DTensor's split): IndexError on the empty shard"
            )
        return shards


@functools.lru_cache(maxsize=1)
def _megatron_import_error() -> str | None:
    """Why megatron-core cannot be used here (None: it imports)."""
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
        return ("megatron-core is not installed (pip install 'lmhead-bench[megatron]'; megatron-core 0.16.1 "
                "installs and imports on a CPU)")
    try:
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure makes it unavailable, with its reason
        return f"megatron-core does not import here: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    return None


MEGATRON_UNSUPPORTED = {
    "z_loss": "vocab_parallel_cross_entropy computes the cross-entropy only (Megatron's z-loss is the MoE router's)",
    "logit_scale": "neither vocab_parallel_cross_entropy nor Megatron-core 0.16.1's output layer scales the logits",
    "class_weight": "vocab_parallel_cross_entropy takes no class weights",
}


class MegatronVocabParallel(VocabParallel):
    name = "megatron-vocab-parallel"
    summary = "Megatron-core's vocab_parallel_cross_entropy over P gloo ranks (ignored tokens masked by the caller)"
    rank_family = "megatron"
    split = "balanced"  # with V divisible by P (required), every split is the equal one

    def availability(self):
        reason = _megatron_import_error()
        return Availability(False, reason) if reason else Availability(True, "megatron-core on gloo ranks")

    def capabilities(self, device):
        return Capabilities(supported_options=SUPPORTED, unsupported_options=MEGATRON_UNSUPPORTED)

    def known_issues(self, device):
        from implementations.vocab_parallel.megatron_known import MEGATRON_ISSUES

        return MEGATRON_ISSUES

    def world_size(self, num_tokens, vocab):
        # Megatron pads the vocabulary with trainable rows to a multiple of P instead.
        return equal_shards_world_size(num_tokens, vocab, "megatron-core's vocab_parallel_cross_entropy")

    def _reports_z_loss(self, spec):
        return False


