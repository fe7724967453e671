"""Known failures and limitations of built-in implementations, each matched by its signature.

- A **known failure** is a genuine numerical or contract failure of a peer package (or two
  packages that do not work together: then the exact error it raises is its signature). It
  excuses a mismatch only when the mismatch looks exactly like the failure described: the property, the
  compared tensor, the dtype and the *shape of the error* (for Liger-Kernel's retained-graph bug,
  the second backward accumulating ``(c + c^2) g`` instead of ``2 c g``). Anything else that
  differs, on the same property and tensor, still fails. The property then shows "known-failure"
  with a reproducer and does not fail ``check``'s exit status. Its ``example`` is a case that
  shows it: ``tests/test_check_known.py`` expects exactly the status "known-failure" there, so a
  fix (a pass) or a new bug (a fail) shows up, and the entry is updated.
- A **known limitation** is documented behaviour that refuses a case loudly: it raises an error
  of a given type whose message contains a given text. Only that error makes the case
  "unsupported" (counted as refused at run time); any other error fails the property.

Entries apply to the built-in implementation of that name only: a plugin cannot take a built-in's
name (``harness.registry``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from harness.case import Case, Inputs, make_inputs
from harness.check.evaluation import case_largest_logit, evaluate, term_magnitudes
from harness.check.tolerance import Allowance, logit_rounding_factor, mismatch
from harness.semantics import apply_norm, in_float64, loss_from_logits, transform_logits
from harness.spec import DTYPES, LossOutput, LossSpec, unit_roundoff
from implementations.distributed import MegatronVocabParallel
from implementations.vocab_parallel.ranks import megatron_smoothing


@dataclass(frozen=True)
class Mismatch:
    """One compared tensor out of bounds, with the evidence a signature reads.

    ``expected`` is what the tensor should have been: the reference, or the other side of an
    identity. ``actual`` is None when no gradient arrived.
    """

    property_id: str
    case: Case
    tensor: str
    message: str
    actual: torch.Tensor | None = None
    expected: torch.Tensor | None = None
    allowed: Allowance | None = None
    terms: torch.Tensor | None = None
    loss_scale: float = 1.0


@dataclass(frozen=True)
class KnownFailure:
    """A known failure, by its signature: either the exact shape of the mismatch (``matches``), or,
    for a known loss of precision, how much more error it causes per element (``extra``): a
    mismatch within its allowance plus the ``extra`` of every known failure that applies to it is
    explained by them, and one beyond it is a failure."""

    implementations: tuple[str, ...]
    reason: str
    signature: str  # what a matching mismatch looks like, in one line
    example: str  # "property: case" that shows it
    matches: Callable[[Mismatch], bool] | None = None
    extra: Callable[[Mismatch], torch.Tensor | None] | None = None
    devices: tuple[str, ...] = ()  # where it shows; empty: everywhere
    # A failure that raises instead: (the exception's class name, a text its message contains).
    raises: tuple[str, str] | None = None

    def explains_error(self, exc: BaseException) -> bool:
        return self.raises is not None and type(exc).__name__ == self.raises[0] and self.raises[1] in str(exc)


def explain(mismatch_: Mismatch, known: tuple[KnownFailure, ...]) -> tuple[KnownFailure, ...]:
    """The known failures that together explain a mismatch (empty: none do, it is a failure)."""
    for entry in known:
        if entry.matches is not None and entry.matches(mismatch_):
            return (entry,)
    if mismatch_.actual is None or mismatch_.allowed is None or mismatch_.expected is None:
        return ()
    extras = [(entry, entry.extra(mismatch_)) for entry in known if entry.extra is not None]
    extras = [(entry, extra) for entry, extra in extras if extra is not None]
    if not extras:
        return ()
    total = sum(extra.double().reshape(mismatch_.expected.shape) for _, extra in extras)
    widened = dataclasses.replace(mismatch_.allowed, bound=mismatch_.allowed.bound + total,
                                  norm=mismatch_.allowed.norm + float(total.norm()))
    if mismatch(mismatch_.tensor, mismatch_.actual, mismatch_.expected, widened) is None:
        return tuple(entry for entry, _ in extras)
    return ()


@dataclass(frozen=True)
class KnownLimitation:
    implementations: tuple[str, ...]
    reason: str
    properties: tuple[str, ...]
    error_type: str  # the exception's class name
    message: str  # a text the exception's message contains
    devices: tuple[str, ...] = ()
    case: str = "N=6,D=5,V=33,seed=10"  # a case of its first property that shows it (the tests run it)

    def matches(self, property_id: str, exc: BaseException) -> bool:
        return (
            property_id in self.properties
            and type(exc).__name__ == self.error_type
            and self.message in str(exc)
        )


# --- signatures -------------------------------------------------------------------------------


def _no_head_gradient_with_a_frozen_backbone(m: Mismatch) -> bool:
    return (
        m.property_id == "autograd/grad-subsets"
        and m.tensor in ("grad_weight", "grad_bias")
        and m.actual is None
        and "hidden" not in m.case.grads
    )


def _second_backward_scales_the_saved_gradient_again(m: Mismatch) -> bool:
    """Two backwards of ``c * loss`` gave ``(c + c^2) g`` (the weight and bias) or ``2 c^2 g`` (the
    hidden states, whose ``.grad`` is the saved buffer itself) where ``2 c g`` (the other side) was due."""
    if m.property_id != "autograd/retain-graph" or m.case.reduction not in ("mean", "sum"):
        return False
    if m.actual is None or m.expected is None or m.allowed is None or not m.tensor.startswith("grad_"):
        return False
    c = m.loss_scale
    factor = c if m.tensor == "grad_hidden" else (1 + c) / 2
    return mismatch(m.tensor, m.actual, m.expected * factor, m.allowed) is None


def aspect_ratio_chunk_count(case: Case) -> int:
    """How many token chunks liger-kernel 0.8.5 and F.linear_cross_entropy (torch 2.13) cut a case
    into: both size a chunk so that its logits match the hidden states in memory,
    ``next_pow2(ceil(N / ceil(V / D)))`` tokens, unless the case sets the chunk size."""
    tokens, dim, vocab = case.num_tokens, case.dim, case.vocab
    if case.chunk is not None:
        return -(-tokens // case.chunk)
    inc_factor = -(-vocab // dim)
    chunk = min(1 << max(0, (-(-tokens // inc_factor) - 1).bit_length()), tokens)
    return -(-tokens // chunk)


def _sides(m: Mismatch, tensors: tuple[str, ...], dtypes: tuple[str, ...]) -> int:
    """How many results a mismatch of one of ``tensors`` in one of ``dtypes`` compares with exact
    values: 1 against the reference, 2 for the two sides of an identity (0: not such a mismatch)."""
    if m.tensor not in tensors or m.case.dtype not in dtypes or m.actual is None or m.terms is None:
        return 0
    return 1 if m.property_id.startswith(("equivalence/", "precision/", "autograd/grad-subsets")) else 2


def _weight_gradient_summed_in_the_input_dtype(m: Mismatch) -> torch.Tensor | None:
    """Each chunk's weight/bias gradient added into an accumulator of the input dtype: up to one
    rounding of the input dtype per chunk, of the size of the terms."""
    sides = _sides(m, ("grad_weight", "grad_bias"), ("bfloat16", "float16"))
    if not sides:
        return None
    return sides * aspect_ratio_chunk_count(m.case) * unit_roundoff(m.case.torch_dtype) * m.terms.double().abs()


def _stores_truncated_to_bfloat16(m: Mismatch) -> torch.Tensor | None:
    """Every bfloat16 value the kernels store is rounded toward zero: up to one unit in the last
    place (2 u) of each stored value, all in the same direction, so up to 2 u of the terms of any
    result computed from them and of the result itself."""
    tensors = ("loss", "z_loss", "grad_hidden", "grad_weight", "grad_bias")
    sides = _sides(m, tensors, ("bfloat16",))
    if not sides:
        return None
    return sides * 2 * unit_roundoff(torch.bfloat16) * (m.terms.double().abs().reshape(m.expected.shape)
                                                        + m.expected.double().abs())


def _chunks_summed_in_the_input_dtype(m: Mismatch) -> torch.Tensor | None:
    """The loss accumulator is bfloat16 for bfloat16 inputs and takes two roundings per chunk (the
    target logits added, the logsumexps subtracted); the weight and bias gradients take up to one
    rounding of the input dtype per chunk, in bfloat16 and float16."""
    if m.tensor == "loss":
        sides = _sides(m, ("loss",), ("bfloat16",))
    else:
        sides = _sides(m, ("grad_weight", "grad_bias"), ("bfloat16", "float16"))
    if not sides:
        return None
    chunks = aspect_ratio_chunk_count(m.case)
    if m.tensor == "loss":  # per token (none), the target logit is rounded before the logsumexp is subtracted
        roundings = 1 if m.case.reduction == "none" else 2 * chunks + 1
    else:
        roundings = chunks
    return sides * roundings * unit_roundoff(m.case.torch_dtype) * m.terms.double().abs()


def _softcap_in_the_input_dtype(m: Mismatch) -> torch.Tensor | None:
    """x / cap, its tanh and the product by cap each rounded to the input dtype: up to three
    roundings of every capped logit, so of the terms of every result."""
    tensors = ("loss", "z_loss", "grad_hidden", "grad_weight", "grad_bias")
    if m.case.option("softcap") is None:
        return None
    return _extra_logit_roundings(m, tensors, 3)


@functools.lru_cache(maxsize=8)
def _reference_with_z_loss_at_ignored_tokens(case: Case) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The float64 results of ``case`` (reduction none) when the z-loss is not masked: every token,
    ignored or not, adds ``m lse^2`` to its loss and z-loss; and the size of their terms (the
    tolerance's term model with every token counted, an ignored token's label taken as a class
    other than ignore_index)."""
    inputs = make_inputs(case, reference=True)
    counted = make_inputs(case, reference=True)
    ignore_index = case.option("ignore_index")
    counted.labels = torch.where(counted.labels == ignore_index, int(ignore_index == 0), counted.labels)
    terms = term_magnitudes(counted, case.torch_dtype)

    def unmasked(i) -> LossOutput:
        spec = in_float64(i.spec)
        logits = F.linear(apply_norm(i.hidden.flatten(0, -2), spec), i.weight, i.bias)
        ce = loss_from_logits(logits, i.labels.flatten(), spec.replace(z_loss_multiplier=0.0)).loss
        z_loss = spec.z_loss_multiplier * torch.logsumexp(transform_logits(logits, spec), -1).square()
        z_loss = z_loss / spec.loss_div_factor
        return LossOutput((ce + z_loss).view(i.labels.shape), z_loss.view(i.labels.shape))

    return evaluate(unmasked, inputs).tensors(), terms


def _z_loss_of_ignored_tokens_kept(m: Mismatch) -> bool:
    """With reduction none, the loss, the z-loss and the gradients are those of a z-loss that also
    counts the ignored tokens (and nothing else differs): within the allowance plus the term
    model's cap, 8 roundoffs of the terms, at every token that term reaches. An identity's two
    sides share the convention: they may differ by those roundoffs only."""
    if (m.case.reduction != "none" or not m.case.option("z_loss") or m.case.ignored == "none" or m.actual is None
            or m.expected is None or m.allowed is None):
        return False
    results, terms = _reference_with_z_loss_at_ignored_tokens(m.case)
    if m.tensor not in results:
        return False
    roundoffs = 8 * unit_roundoff(m.case.torch_dtype) * terms[m.tensor].double()
    if _sides(m, tuple(results), tuple(DTYPES)) == 1:
        expected, extra = results[m.tensor], roundoffs.reshape(results[m.tensor].shape)
    else:  # the sides may be permuted or scaled copies: the largest of those roundoffs, twice
        expected, extra = m.expected.double(), 2 * roundoffs.max().expand(m.expected.shape)
    widened = dataclasses.replace(m.allowed, bound=m.allowed.bound + extra, norm=m.allowed.norm + float(extra.norm()))
    return mismatch(m.tensor, m.actual, expected, widened) is None


def _extra_logit_roundings(m: Mismatch, tensors: tuple[str, ...], roundings: int, backward: int = 0):
    """The extra of ``roundings`` more input-dtype roundings of every logit (bfloat16, float16), for a
    mismatch of one of ``tensors``, plus ``backward`` more roundings of the result's own terms."""
    sides = _sides(m, tensors, ("bfloat16", "float16"))
    if not sides:
        return None
    factor = logit_rounding_factor(roundings, m.case.torch_dtype, case_largest_logit(m.case)) + backward
    return sides * factor * unit_roundoff(m.case.torch_dtype) * m.terms.double().abs()


def _class_scale_in_the_input_dtype(m: Mismatch) -> torch.Tensor | None:
    """The logits rounded to the input dtype, then multiplied by the class scale and rounded again:
    one more rounding of every logit, so of the terms of every result. The class scale's own
    gradient is autograd's backward of that product, in the input dtype too: the logits' gradient
    rounded to it, times the logits, rounded again (torch-eager forms it in float32), so two more
    roundings of each of its terms; the raw logits' gradient, the logits' gradient times the scale,
    is rounded once more than torch-eager's, so one more for hidden's and the weight's."""
    tensors = ("loss", "z_loss", "grad_hidden", "grad_weight", "grad_class_scale")
    if not m.case.option("class_scale"):
        return None
    backward = {"grad_class_scale": 2, "grad_hidden": 1, "grad_weight": 1}.get(m.tensor, 0)
    return _extra_logit_roundings(m, tensors, 1, backward)


def _strided_head_linear_rounds_twice(m: Mismatch) -> torch.Tensor | None:
    """The matmul rounded to the input dtype before the bias is added: one more rounding of every
    logit, so of the terms of every result."""
    tensors = ("loss", "z_loss", "grad_hidden", "grad_weight", "grad_bias", "grad_norm_weight", "grad_norm_bias")
    if not (m.case.strided and m.case.option("bias")):
        return None
    return _extra_logit_roundings(m, tensors, 1)


# OLMo-core's heads whose loss is its own cross_entropy_loss (the fused one's is Liger-Kernel's).
OLMO_CORE_LOSS = ("olmo-core", "olmo-core-normalized")


def _megatron_shards(num_tokens: int, vocab: int) -> tuple[int, int]:
    """(P, K): the adapter's world size for this many tokens, and the classes of each rank's shard."""
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
    world_size, shard = _megatron_shards(flat.numel(), vocab)
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


def _megatron_may_underflow(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, spec: LossSpec,
                            bias: torch.Tensor | None) -> torch.Tensor:
    """Per token (``labels``' shape): whether a probability on rank 0's shard may be 0 in float32,
    for a token not ignored: one below float32's smallest normal number (a subnormal is within a
    rounding of the logits of underflowing)."""
    _, shard = _megatron_shards(labels.numel(), weight.shape[0])
    with torch.no_grad():
        logits = transform_logits(F.linear(hidden, weight, bias), spec)
        smallest = logits[..., :shard].amin(-1) - torch.logsumexp(logits, -1)  # the least log p on rank 0
    return (smallest < math.log(torch.finfo(torch.float32).tiny)) & (labels != spec.ignore_index)


def _megatron_loss_function(inputs: Inputs) -> LossOutput:
    return megatron_loss_model(inputs.hidden, inputs.weight, inputs.labels, inputs.spec, inputs.bias)


@dataclass(frozen=True)
class _MegatronSide:
    """``megatron_loss_model``'s results on one side of a comparison, and whether its loss may be +inf."""

    tensors: dict[str, torch.Tensor | None]
    may_underflow: torch.Tensor  # per token for reduction none, else one flag


def _megatron_whole(case: Case) -> _MegatronSide:
    """The model on the case's float64 inputs (the side the reference is compared with)."""
    inputs = make_inputs(case, reference=True)
    outcome = evaluate(_megatron_loss_function, inputs)
    may = _megatron_may_underflow(inputs.hidden, inputs.weight, inputs.labels, inputs.spec, inputs.bias)
    return _MegatronSide(outcome.tensors(), may if case.reduction == "none" else may.any())


def _megatron_split(case: Case) -> _MegatronSide:
    """The model summed over the split of invariance/sum-split, whose parts may have another P
    than the whole batch (P follows the token count), so other shards and another smoothing."""
    from harness.check.properties import token_groups  # imported here: properties imports this module

    inputs = make_inputs(case, reference=True)
    total, may = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.bool)
    for index in token_groups(case, 2):
        part = (inputs.hidden.reshape(-1, case.dim)[index], inputs.weight, inputs.labels.reshape(-1)[index],
                inputs.spec, inputs.bias)
        loss = megatron_loss_model(*part).loss
        total, may = total + loss.detach(), may | _megatron_may_underflow(*part).any()
        if inputs.gradient_inputs:
            loss.backward()
    grads = {f"grad_{name}": tensor.grad for name, tensor in inputs.gradient_inputs.items()}
    return _MegatronSide({"loss": total, **grads}, may)


@functools.lru_cache(maxsize=4)
def _megatron_sides(property_id: str, case: Case) -> tuple[_MegatronSide, _MegatronSide | None] | None:
    """The model's (actual, expected) sides of a comparison, None where the failure cannot show:
    against the reference, the expected side is the reference itself (None in that place)."""
    if property_id.startswith(("equivalence/", "precision/", "autograd/grad-subsets")):
        return _megatron_whole(case), None
    if property_id == "invariance/sum-split":  # the other identities keep the token count, so P
        return _megatron_split(case), _megatron_whole(case)
    return None


def _as_megatron_smooths(m: Mismatch) -> bool:
    """Each side of the comparison is ``megatron_loss_model``'s (the difference within the
    allowance), where a loss may be +inf if a token's probability on rank 0's shard may be 0 in
    float32, since Megatron takes the log of the probabilities themselves."""
    if not m.case.option("label_smoothing") or m.actual is None or m.expected is None or m.allowed is None:
        return False
    sides = _megatron_sides(m.property_id, m.case)
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


# Liger-Kernel's function, with its default accumulation and with accum_dtype=torch.float32.
LIGER = ("liger", "liger-fp32-accum")
MEGATRON = ("megatron-vocab-parallel",)

KNOWN_FAILURES = (
    KnownFailure(
        OLMO_CORE_LOSS,
        "ai2-olmo-core 3.0.0's cross_entropy_loss masks the z-loss of ignored tokens only when it reduces "
        "(mean, sum): with reduction none every ignored token keeps z_loss_multiplier x logsumexp^2 in its "
        "loss and its z-loss, and sends that term's gradient to the hidden states and the head",
        "reduction none with z-loss: the results are those of a z-loss counted at ignored tokens too",
        "equivalence/float32: B=2,T=9,D=33,V=257,dtype=float32,reduction=none,z_loss=0.01,ignored=some,seed=4",
        matches=_z_loss_of_ignored_tokens_kept,
    ),
    KnownFailure(
        ("olmo-core",),
        "torch 2.13's F.linear on a CPU, for a (B, T, D) input (what LMHead's w_out gets) with a non-contiguous "
        "weight and bias, rounds the matmul to the input dtype before adding the bias (with contiguous ones, or "
        "the (N, D) input torch-eager flattens to, it rounds once): one more rounding of every logit in "
        "bfloat16 and float16",
        "CPU, bfloat16/float16, strided inputs with a bias: results off by up to one more input-dtype rounding "
        "of their terms",
        "equivalence/bfloat16: N=1,D=1,V=140,dtype=bfloat16,reduction=mean,bias=1,scale=100.0,strided=1,seed=0",
        extra=_strided_head_linear_rounds_twice,
        devices=("cpu",),
    ),
    KnownFailure(
        ("olmo-core-normalized",),
        "ai2-olmo-core 3.0.0's NormalizedLMHead multiplies the logits by sz in the model's dtype "
        "(lm_head.py: logits = sz * self.w_out(x)) and upcasts only in the loss, where torch-eager scales the "
        "float32 logits: one more rounding of every logit in bfloat16 and float16, and the gradients of sz and of "
        "the raw logits formed in that dtype",
        "bfloat16/float16 with a class scale: results off by up to one more input-dtype rounding of their terms "
        "(hidden's and the weight's by up to two, the class scale's by up to three; more where logits are "
        "so large that a rounding moves a probability by a factor)",
        "equivalence/bfloat16: N=1,D=1,V=3,dtype=bfloat16,reduction=mean,class_scale=1,seed=0",
        extra=_class_scale_in_the_input_dtype,
    ),
    KnownFailure(
        ("olmo-core-fused",),
        "ai2-olmo-core 3.0.0's fused_linear loss unpacks three outputs from "
        "LigerFusedLinearCrossEntropyFunction.apply; liger-kernel 0.8 returns four, so the head raises at "
        "its first call. It works with liger-kernel 0.6.4 to 0.7.0 (three outputs)",
        "every call raises ValueError: too many values to unpack (expected 3)",
        "equivalence/float32: N=6,D=5,V=33,dtype=float32,reduction=mean,ignored=some,seed=10",
        raises=("ValueError", "too many values to unpack (expected 3)"),
    ),
    KnownFailure(
        LIGER,
        "liger-kernel 0.8.5 computes the head's gradients only when the hidden states require grad: "
        "with a frozen backbone the weight and bias get no gradient at all, silently",
        "grad-subsets, hidden frozen: no gradient arrives at the weight or the bias",
        "autograd/grad-subsets: N=5,D=3,V=17,dtype=float32,reduction=mean,bias=1,grads=weight+bias,seed=5",
        matches=_no_head_gradient_with_a_frozen_backbone,
    ),
    KnownFailure(
        LIGER,
        "liger-kernel 0.8.5 multiplies the gradients saved in the forward by the upstream gradient in "
        "place (element_mul_kernel): a second backward through a retained graph of c x loss scales them "
        "by c again",
        "retain-graph, mean or sum: the two backwards accumulate (c + c^2) g at the weight and bias and "
        "2 c^2 g at the hidden states, instead of 2 c g",
        "autograd/retain-graph: N=6,D=5,V=33,dtype=float32,reduction=mean,bias=1,ignored=some,seed=10",
        matches=_second_backward_scales_the_saved_gradient_again,
    ),
    KnownFailure(
        ("liger",),
        "liger-kernel 0.8.5 accumulates the weight and bias gradients across its token chunks in the "
        "input dtype unless accum_dtype=torch.float32 is passed (its default is None); "
        "`liger-fp32-accum` is that configuration, the one OLMo-core uses",
        "bfloat16/float16: grad_weight/grad_bias off by up to one input-dtype rounding of the terms per chunk",
        "precision/at-scale: N=2048,D=64,V=2048,dtype=bfloat16,reduction=sum,bias=1,seed=21",
        extra=_weight_gradient_summed_in_the_input_dtype,
    ),
    KnownFailure(
        LIGER,
        "Triton 3.9's interpreter casts float32 to bfloat16 by truncation (runtime/interpreter.py: "
        "cast_impl passes no rounding mode to _convert_float), where a GPU rounds to nearest even: on a "
        "CPU every bfloat16 value a Triton kernel stores is rounded toward zero",
        "CPU, bfloat16: results off by up to one bfloat16 unit in the last place of their terms, all one way",
        "equivalence/bfloat16: N=257,D=300,V=511,dtype=bfloat16,reduction=mean,bias=1,ignored=some,scale=100.0,"
        "strided=1,seed=2016",
        extra=_stores_truncated_to_bfloat16,
        devices=("cpu",),
    ),
    KnownFailure(
        ("torch-linear-ce",),
        "F.linear_cross_entropy's chunked path (torch 2.13) keeps the loss of bfloat16 inputs in a "
        "bfloat16 accumulator (linear_cross_entropy.py: output_dtype is the input dtype for bfloat16, "
        "float32 only for float16) and adds every chunk's target logits and logsumexps into it; its "
        "weight and bias gradients lose up to one input-dtype rounding per chunk in bfloat16 and "
        "float16. No option changes it: acc_dtype and acc_policy govern the intermediates only",
        "bfloat16: the loss off by up to two roundings of its terms per chunk (one per token with "
        "reduction none); bfloat16/float16: grad_weight/grad_bias by up to one per chunk",
        "precision/at-scale: N=2048,D=64,V=2048,dtype=bfloat16,reduction=sum,bias=1,seed=21",
        extra=_chunks_summed_in_the_input_dtype,
    ),
    KnownFailure(
        ("cce",),
        "cut-cross-entropy 25.1.1's torch_compile impl (what `cce` runs on a CPU) soft-caps the logits "
        "in the input dtype and upcasts after (torch_compile.py: softcapping(logits, softcap), then "
        "logits.float()), where its CUDA kernels and torch-eager cap in float32",
        "CPU, bfloat16/float16 with a softcap: results off by up to three input-dtype roundings of their terms",
        "equivalence/bfloat16: N=1,D=7,V=2,dtype=bfloat16,reduction=mean,softcap=5.0,seed=0",
        extra=_softcap_in_the_input_dtype,
        devices=("cpu",),
    ),
    KnownFailure(
        ("hf-gemma2",),
        "transformers 5.23's Gemma2ForCausalLM soft-caps the logits in the model's dtype (modeling_gemma2.py: "
        "logits / final_logit_softcapping, tanh, * final_logit_softcapping on the lm_head output) and upcasts "
        "only in the loss (ForCausalLMLoss: logits.float()), where torch-eager caps the float32 logits",
        "bfloat16/float16 with a softcap: results off by up to three input-dtype roundings of their terms",
        "equivalence/bfloat16: B=2,T=37,D=65,V=257,dtype=bfloat16,reduction=mean,softcap=30.0,ignored=some,"
        "scale=16.0,seed=2153",
        extra=_softcap_in_the_input_dtype,
    ),
    KnownFailure(
        MEGATRON,
        "megatron-core 0.16.1's vocab_parallel_cross_entropy smooths over each rank's shard only "
        "(cross_entropy.py: vocab_size = exp_logits.size(-1), log_probs.mean(dim=-1), no all-reduce): with "
        "K = V / P, the smoothing term is the mean log-probability of the rank's own K classes, the factor "
        "a K / (K - 1), and the backward subtracts s / K; every rank has a loss of its own",
        "label smoothing, against the reference: the loss is rank 0's shard-local one and the gradients "
        "each rank's own, as megatron_loss_model computes them",
        "equivalence/float32: N=6,D=5,V=8,reduction=mean,label_smoothing=0.1,seed=0",
        matches=_smoothing_on_the_local_shard,
    ),
    KnownFailure(
        MEGATRON,
        "megatron-core 0.16.1's vocab_parallel_cross_entropy takes the log of the float32 softmax for label "
        "smoothing (cross_entropy.py: log_probs = torch.log(exp_logits) after exp_logits.div_(sum_exp_logits)): "
        "a probability that underflows to 0 (logits spread by more than about 103) gives log 0 = -inf, so the "
        "loss is +inf where F.cross_entropy is finite; the gradients do not use it",
        "label smoothing, against the reference: the loss +inf where a token's probability on rank 0's shard "
        "is below float32's smallest normal, otherwise as megatron_loss_model",
        "equivalence/float32: N=129,D=66,V=129,dtype=float32,reduction=mean,ignore_index=0,label_smoothing=0.5,"
        "ignored=some,scale=16.0,seed=1115",
        matches=_log_of_an_underflowed_probability,
    ),
)

# Every property that runs a backward (the class-weight bug of loss_parallel shows in each of them).
PROPERTY_IDS_WITH_GRADIENTS = (
    "equivalence/float32", "equivalence/bfloat16", "equivalence/float16", "equivalence/large-vocab",
    "precision/at-scale", "autograd/grad-subsets", "autograd/scaled-loss", "autograd/retain-graph",
    "autograd/no-grad", "autograd/inputs-unchanged", "autograd/tied-weights", "invariance/sum-split",
    "invariance/permutation",
)

KNOWN_LIMITATIONS = (
    KnownLimitation(
        ("torch-linear-ce",),
        "F.linear_cross_entropy frees its saved gradients after one backward unless "
        "LinearCrossEntropyOptions(allow_retain_graph=True) (documented; the default is False)",
        ("autograd/retain-graph",),
        "RuntimeError",
        "linear_cross_entropy chunked backward called twice",
    ),
    KnownLimitation(
        ("torch-compile",),
        "torch.compile donates the saved buffers of its backward by default: a second backward "
        "(retain_graph=True) raises and names the switch, torch._functorch.config.donated_buffer=False",
        ("autograd/retain-graph",),
        "RuntimeError",
        "compiled with non-empty donated buffers",
    ),
    KnownLimitation(
        ("dtensor-loss-parallel",),
        "torch 2.13's loss_parallel() fails in backward with class weights when a token is ignored with a "
        "negative ignore_index (not documented; a bug): _nll_loss_and_log_softmax_backward gathers the class "
        "weights at the raw target (torch.gather(w, channel_dim, target)) where the forward uses safe_target",
        PROPERTY_IDS_WITH_GRADIENTS,
        "RuntimeError",
        "loss_parallel backward: index -",
        case="N=6,D=5,V=33,class_weight=1,ignored=some,seed=10",
    ),
    KnownLimitation(
        MEGATRON,
        "megatron-core 0.16.1's vocab_parallel_cross_entropy divides by K - 1 for label smoothing, K the "
        "classes of the rank's shard (cross_entropy.py: label_smoothing * vocab_size / (vocab_size - 1)): a "
        "shard of one class (V = P) raises ZeroDivisionError",
        PROPERTY_IDS_WITH_GRADIENTS,
        "ZeroDivisionError",
        "float division by zero",
        case="N=1,D=1,V=2,label_smoothing=0.1,seed=0",
    ),
    KnownLimitation(
        ("cce",),
        "on a CPU, cut-cross-entropy runs its torch.compile implementation, whose backward donates "
        "its saved buffers: a second backward (retain_graph=True) raises",
        ("autograd/retain-graph",),
        "RuntimeError",
        "compiled with non-empty donated buffers",
        devices=("cpu",),
    ),
)


def _applies(entry: KnownFailure | KnownLimitation, implementation: str, device: str) -> bool:
    return implementation in entry.implementations and (not entry.devices or device in entry.devices)


def known_failures(implementation: str, device: str) -> tuple[KnownFailure, ...]:
    return tuple(k for k in KNOWN_FAILURES if _applies(k, implementation, device))


def known_limitations(implementation: str, device: str) -> tuple[KnownLimitation, ...]:
    return tuple(k for k in KNOWN_LIMITATIONS if _applies(k, implementation, device))
