"""Known issues of Megatron-core 0.16.1's ``vocab_parallel_cross_entropy`` and torch's ``loss_parallel()``.

Megatron smooths labels over each rank's shard only; its signature recomputes that loss and those
gradients in float64 (``megatron_loss_model``) and excuses only a result that matches them. The
model is specific to this peer, so it lives beside its adapter, not in the gate.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F

from harness.case import Case, Inputs, make_inputs
from harness.known import KnownFailure, KnownLimitation, Mismatch
from harness.semantics import transform_logits
from harness.spec import LossOutput, LossSpec
from implementations.vocab_parallel.ranks import megatron_smoothing

PACKAGE = "megatron-core 0.16.1"
# Every property that runs a backward (loss_parallel's class-weight bug shows in each of them).
PROPERTIES_WITH_GRADIENTS = (
    "equivalence/float32", "equivalence/bfloat16", "equivalence/float16", "equivalence/large-vocab",
    "equivalence/model-sizes", "precision/at-scale", "autograd/grad-subsets", "autograd/scaled-loss",
    "autograd/retain-graph", "autograd/no-grad", "autograd/inputs-unchanged", "autograd/tied-weights",
    "invariance/sum-split", "invariance/permutation", "autograd/interleaved", "autograd/training-steps",
)


def megatron_shards(num_tokens: int, vocab: int) -> tuple[int, int]:
    """(P, K): the adapter's world size for this many tokens, and the classes of each rank's shard."""
    from implementations.distributed import MegatronVocabParallel

    world_size = MegatronVocabParallel().world_size(num_tokens, vocab)
    return world_size, vocab // world_size


def megatron_loss_model(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, spec: LossSpec,
                        bias: torch.Tensor | None) -> LossOutput:
    """What ``megatron-vocab-parallel`` returns, in float64: Megatron-core 0.16.1's smoothing is
    local to each rank's shard of K = V / P classes. Rank r's loss is ``(1 - s) nll - s mean_{j in
    shard r} log p_j`` with ``s = a K / (K - 1)`` (``a`` the adapter's ``megatron_smoothing``), and
    its backward gives its own columns ``p - (1 - s) onehot - s / K``, the gradient of its own loss.
    The loss is rank 0's (the one the adapter returns); the gradients are every rank's through its
    own columns, as the adapter gathers them."""
    vocab = weight.shape[0]
    flat = labels.reshape(-1).long()
    world_size, shard = megatron_shards(flat.numel(), vocab)
    smoothing = megatron_smoothing(spec.label_smoothing, vocab) * shard / (shard - 1)
    logits = transform_logits(F.linear(hidden.reshape(-1, hidden.shape[-1]), weight, bias), spec)
    valid = flat != spec.ignore_index
    safe = torch.where(valid, flat, 0)[:, None]
    ranks = []
    for rank in range(world_size):
        own = torch.zeros(vocab, dtype=torch.bool)
        own[rank * shard:(rank + 1) * shard] = True
        log_probs = torch.where(own, logits, logits.detach()).log_softmax(-1)  # gradients to its own columns
        ranks.append((1 - smoothing) * -log_probs.gather(1, safe)[:, 0]
                     - smoothing * log_probs[:, rank * shard:(rank + 1) * shard].mean(-1))
    per_token = ranks[0].detach() + sum(loss - loss.detach() for loss in ranks)  # rank 0's value, all gradients
    per_token = torch.where(valid, per_token, 0.0)
    if spec.reduction == "none":
        loss = per_token.view(labels.shape)
    else:
        loss = per_token.sum() / (valid.sum() if spec.reduction == "mean" else 1)
    return LossOutput(loss / spec.loss_div_factor, None)


def _may_underflow(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, spec: LossSpec,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """Per token (``labels``' shape): whether a probability on rank 0's shard may be 0 in float32,
    for a token not ignored: one below float32's smallest normal number (a subnormal is within a
    rounding of the logits of underflowing)."""
    _, shard = megatron_shards(labels.numel(), weight.shape[0])
    with torch.no_grad():
        logits = transform_logits(F.linear(hidden, weight, bias), spec)
        smallest = logits[..., :shard].amin(-1) - torch.logsumexp(logits, -1)  # the least log p on rank 0
    return (smallest < math.log(torch.finfo(torch.float32).tiny)) & (labels != spec.ignore_index)


def _model_loss(inputs: Inputs) -> LossOutput:
    return megatron_loss_model(inputs.hidden, inputs.weight, inputs.labels, inputs.spec, inputs.bias)


@dataclasses.dataclass(frozen=True)
class _Side:
    """``megatron_loss_model``'s results on one side of a comparison, and whether its loss may be +inf."""

    tensors: dict[str, torch.Tensor | None]
    may_underflow: torch.Tensor  # per token for reduction none, else one flag


def _whole(case: Case) -> _Side:
    """The model on the case's float64 inputs (the side the reference is compared with)."""
    from harness.check.evaluation import evaluate

    inputs = make_inputs(case, reference=True)
    outcome = evaluate(_model_loss, inputs)
    may = _may_underflow(inputs.hidden, inputs.weight, inputs.labels, inputs.spec, inputs.bias)
    return _Side(outcome.tensors(), may if case.reduction == "none" else may.any())


def _split(case: Case) -> _Side:
    """The model summed over the split of invariance/sum-split, whose parts may have another P
    than the whole batch (P follows the token count), so other shards and another smoothing."""
    from harness.check.properties import token_groups

    inputs = make_inputs(case, reference=True)
    total, may = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.bool)
    for index in token_groups(case, 2):
        part = (inputs.hidden.reshape(-1, case.dim)[index], inputs.weight, inputs.labels.reshape(-1)[index],
                inputs.spec, inputs.bias)
        loss = megatron_loss_model(*part).loss
        total, may = total + loss.detach(), may | _may_underflow(*part).any()
        if inputs.gradient_inputs:
            loss.backward()
    grads = {f"grad_{name}": tensor.grad for name, tensor in inputs.gradient_inputs.items()}
    return _Side({"loss": total, **grads}, may)


@functools.lru_cache(maxsize=4)
def _sides(property_id: str, case: Case, identity: bool) -> tuple[_Side, _Side | None] | None:
    """The model's (actual, expected) sides of a comparison, None where the failure cannot show:
    against the reference, the expected side is the reference itself (None in that place)."""
    if not identity:
        return _whole(case), None
    if property_id == "invariance/sum-split":  # the other identities keep the token count, so P
        return _split(case), _whole(case)
    return None


def _as_megatron_smooths(m: Mismatch) -> bool:
    """Each side of the comparison is ``megatron_loss_model``'s (the difference within the
    allowance), where a loss may be +inf if a token's probability on rank 0's shard may be 0 in
    float32, since Megatron takes the log of the probabilities themselves."""
    from harness.check.tolerance import mismatch

    if not m.case.option("label_smoothing") or m.actual is None or m.expected is None or m.allowed is None:
        return False
    sides = _sides(m.property_id, m.case, m.identity)
    if sides is None:
        return False
    results = []
    for side, value in zip(sides, (m.actual, m.expected)):
        if side is None:  # the reference
            results.append(value.double())
            continue
        model = side.tensors[m.tensor].double()
        if m.tensor == "loss":
            model = torch.where(value.isposinf() & side.may_underflow, math.inf, model)
        results.append(model)
    model_actual, model_expected = results
    if bool(model_expected.isinf().any()):  # the whole batch's loss is +inf: nothing to hold the split's to
        return True
    # The model's difference between the sides, moved onto the expected side.
    shifted = torch.where(model_actual.isinf(), model_actual, m.expected.double() + model_actual - model_expected)
    return mismatch(m.tensor, m.actual, shifted, m.allowed) is None


def _has_inf(m: Mismatch) -> bool:
    return any(bool(t.isinf().any()) for t in (m.actual, m.expected) if t is not None)


def _smoothing_on_the_local_shard(m: Mismatch) -> bool:
    return not _has_inf(m) and _as_megatron_smooths(m)


def _log_of_an_underflowed_probability(m: Mismatch) -> bool:
    return _has_inf(m) and _as_megatron_smooths(m)


MEGATRON_ISSUES = (
    KnownFailure(
        "megatron-core 0.16.1's vocab_parallel_cross_entropy smooths over each rank's shard only (cross_entropy.py: "
        "vocab_size = exp_logits.size(-1), log_probs.mean(dim=-1), no all-reduce): with K = V / P, the smoothing "
        "term is the mean log-probability of the rank's own K classes, the factor a K / (K - 1), and the backward "
        "subtracts s / K; every rank has a loss of its own",
        "label smoothing, against the reference: the loss is rank 0's shard-local one and the gradients each "
        "rank's own, as megatron_loss_model computes them",
        "equivalence/float32: N=6,D=5,V=8,reduction=mean,label_smoothing=0.1,seed=0",
        PACKAGE,
        matches=_smoothing_on_the_local_shard,
    ),
    KnownFailure(
        "megatron-core 0.16.1's vocab_parallel_cross_entropy takes the log of the float32 softmax for label "
        "smoothing (cross_entropy.py: log_probs = torch.log(exp_logits) after exp_logits.div_(sum_exp_logits)): "
        "a probability that underflows to 0 (logits spread by more than about 103) gives log 0 = -inf, so the "
        "loss is +inf where F.cross_entropy is finite; the gradients do not use it",
        "label smoothing, against the reference: the loss +inf where a token's probability on rank 0's shard "
        "is below float32's smallest normal, otherwise as megatron_loss_model",
        "equivalence/float32: N=129,D=66,V=129,dtype=float32,reduction=mean,ignore_index=0,label_smoothing=0.5,"
        "ignored=some,scale=16.0,seed=1115",
        PACKAGE,
        matches=_log_of_an_underflowed_probability,
    ),
    KnownLimitation(
        "megatron-core 0.16.1's vocab_parallel_cross_entropy divides by K - 1 for label smoothing, K the classes "
        "of the rank's shard (cross_entropy.py: label_smoothing * vocab_size / (vocab_size - 1)): a shard of one "
        "class (V = P) raises ZeroDivisionError",
        PROPERTIES_WITH_GRADIENTS, "ZeroDivisionError", "float division by zero", PACKAGE,
        case="N=1,D=1,V=2,label_smoothing=0.1,seed=0",
    ),
)

LOSS_PARALLEL_ISSUES = (
    KnownLimitation(
        "torch 2.13's loss_parallel() fails in backward with class weights when a token is ignored with a "
        "negative ignore_index (not documented; a bug): _nll_loss_and_log_softmax_backward gathers the class "
        "weights at the raw target (torch.gather(w, channel_dim, target)) where the forward uses safe_target",
        PROPERTIES_WITH_GRADIENTS, "RuntimeError", "loss_parallel backward: index -", "torch 2.13",
        case="N=6,D=5,V=33,class_weight=1,ignored=some,seed=10",
    ),
)
