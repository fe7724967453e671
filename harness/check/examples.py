"""The cases every run of the gate checks first, before anything Hypothesis draws.

They are built to principles, one per dimension of real use, not to a list of known bugs, so that
even the smallest (ci) run reaches the structure of a real kernel and the way it is called:

- **options**: every option alone, every pair of options and all of them at once in each
  reduction, in every dtype: the bugs of composing two options (in the wrong order, one
  normalised by the other's weights, one applied to tokens the other masks) show only when both
  are on. Options that act on ignored tokens have some; the others alone have none, and all of
  them at once run both with padding and without (a packed pretraining batch has none). Option
  values are the strong ones (logits of size 16 against a softcap of 5, so that the cap bites).
- **block edges**: N, D and V at, one below and one past power-of-two block sizes (63/64/65,
  127/129, ... up to N, D = 300 and V = 4097), where a kernel's tail handling is, each with
  ordinary logits, logits in the tens and logits past float32's exp range (88.7);
- **layouts and batch structure**: the block-edge cases rotate through every layout (contiguous,
  every other element, the sliced views a model passes, sequence-first transposed), with ``(B, T)``
  inputs passed as given, and the per-token upstream gradient in each of its forms (random,
  the stride-0 ones of ``loss.sum().backward()``, a non-contiguous view);
- **padding as batches have it**: runs of padding (a whole sequence, chunk-sized runs),
  right-padded sequences of different lengths, and none at all, with the options that care;
- **confident predictions**: the label's probability near 1 (late in training) in every dtype;
- **past 2^16 classes** (``equivalence/large-vocab``): every block of classes crossed, and each
  per-class input (bias, class weights) sliced with them;
- **real sizes** (``equivalence/model-sizes``): past 2^16 tokens with a small head, and the hidden
  sizes of real models (2048 to 8192) with few tokens;
- **thousands of tokens** (``precision/at-scale``): partial sums kept in the input dtype add up;
- **call patterns** (``autograd/interleaved``, ``autograd/training-steps``): several forwards before
  their backwards, repeated calls with new values, gradients accumulated over micro-batches;
- **each dtype its own seeds**, so the three dtypes do not see the same inputs;
- **each subset of the inputs requiring grad in every dtype** (``autograd/grad-subsets``);
- the labels always include the first and the last class (``harness.case.make_labels``).

An implementation that lacks an option gets the examples without it (``strategies.fit_to``);
duplicates that leaves are run once.
"""

from __future__ import annotations

import itertools

from harness.case import LAYOUTS, Case
from harness.check.strategies import LOGIT_SCALES
from harness.spec import OPTION_BY_NAME, OPTIONS, REDUCTIONS

DTYPE_SEEDS = {"float32": 1000, "bfloat16": 2000, "float16": 3000}

# (tokens, D, V), each straddling a power-of-two block edge in N, D or V.
BLOCK_EDGE_SHAPES = (
    ((65,), 63, 1025),
    ((64,), 65, 129),
    ((63,), 129, 257),
    ((129,), 127, 513),
    ((127,), 64, 2049),
    ((3, 43), 33, 4097),  # 129 tokens as (B, T)
    ((257,), 300, 511),
    ((300,), 96, 1023),
    ((255,), 257, 65),
)
# 2 x 2 x 3 x 11: divisible by the 2 and 3 ranks of the distributed family, and past 128 (a block edge).
VOCAB_DIVIDED_BY_RANKS = 132

# Shapes for the option examples: each past a 64-wide block in N, D and V.
OPTION_SHAPES = (((67,), 72, 131), ((2, 37), 65, 257), ((70,), 96, 193), ((129,), 66, 129))


def option_fields(options: tuple[str, ...], variant: int) -> dict:
    """Case fields turning ``options`` on, with the ``variant``-th of each option's values."""
    fields: dict = {}
    for option in options:
        values = OPTION_BY_NAME[option].values
        fields[option] = values[variant % len(values)]
    if "softcap" in options:
        fields["scale"] = 16.0  # logits beyond the cap, so that it bites
    return fields


def _option_case(options: tuple[str, ...], index: int, dtype: str, seed: int, ignored: str = "some") -> Case:
    tokens, dim, vocab = OPTION_SHAPES[index % len(OPTION_SHAPES)]
    fields = {"scale": 16.0 if index % 3 == 0 else 1.0, **option_fields(options, index)}
    return Case.build(tokens=tokens, dim=dim, vocab=vocab, dtype=dtype, reduction=REDUCTIONS[index % 3],
                      ignored=ignored, seed=seed, **fields)


def _padding_for(options: tuple[str, ...]) -> str:
    """An option alone runs without padding, unless it acts on ignored tokens (ignore_index)."""
    return "some" if any(OPTION_BY_NAME[o].acts_on_ignored_tokens for o in options) else "none"


# Per-token upstream gradients of the block-edge cases with reduction none, in turn.
UPSTREAM_ROTATION = ("random", "expanded", "strided")


def equivalence_examples(dtype: str) -> list[Case]:
    seed = DTYPE_SEEDS[dtype]
    cases = [Case.build(tokens=(1,), dim=1, vocab=2, dtype=dtype, seed=seed)]
    for i, (tokens, dim, vocab) in enumerate(BLOCK_EDGE_SHAPES):
        reduction = REDUCTIONS[i % 3]
        upstream = UPSTREAM_ROTATION[i // 3 % 3] if reduction == "none" else "random"
        cases.append(Case.build(tokens=tokens, dim=dim, vocab=vocab, dtype=dtype, reduction=reduction,
                                scale=LOGIT_SCALES[i // 3 % 3], ignored="some", bias=i % 2 == 0,
                                layout=LAYOUTS[i % len(LAYOUTS)], upstream=upstream, seed=seed + 10 + i))
    singles = [(option,) for option in OPTIONS]
    pairs = list(itertools.combinations(OPTIONS, 2))
    for i, options in enumerate(singles):
        cases.append(_option_case(options, i, dtype, seed + 100 + i, ignored=_padding_for(options)))
    for i, options in enumerate(pairs, start=len(singles)):
        cases.append(_option_case(options, i, dtype, seed + 100 + i))
    # All of them at once in each reduction, with padding and without: a normaliser of one option
    # applied to another (the mean's class-weight sum to the smoothing or the z-loss) shows only
    # in mean, and with both on; a count of the tokens not ignored may be right only when some are.
    for k in range(len(REDUCTIONS)):
        cases.append(_option_case(OPTIONS, k, dtype, seed + 200 + 10 * k))
        cases.append(_option_case(OPTIONS, k, dtype, seed + 201 + 10 * k, ignored="none"))
    cases.append(Case.build(tokens=(70,), dim=65, vocab=129, dtype=dtype, tied=True, bias=True, z_loss=1e-2,
                            ignored="some", seed=seed + 201))
    return cases + layout_examples(dtype) + padding_examples(dtype) + confident_examples(dtype)


def layout_examples(dtype: str) -> list[Case]:
    """Each view layout on (B, T) inputs with B > 1, where a view's row stride differs from a
    contiguous tensor's (labels ``ids[:, 1:]`` step T + 1 per row): the block-edge shapes that
    rotate through the layouts are mostly flat."""
    seed = DTYPE_SEEDS[dtype] + 450
    return [Case.build(tokens=(3, 37), dim=33, vocab=131, dtype=dtype, reduction=REDUCTIONS[i], layout=layout,
                       ignored="some", bias=True, upstream="strided" if REDUCTIONS[i] == "none" else "random",
                       seed=seed + i)
            for i, layout in enumerate(("strided", "sliced", "transposed"))]


def padding_examples(dtype: str) -> list[Case]:
    """Padding as batches have it: a whole sequence and chunk-sized runs of it, right-padded
    sequences of different lengths, with the options a padded token must not reach."""
    seed = DTYPE_SEEDS[dtype] + 400
    return [
        Case.build(tokens=(3, 140), dim=33, vocab=131, dtype=dtype, reduction="mean", ignored="runs",
                   z_loss=1e-2, label_smoothing=0.1, seed=seed),
        Case.build(tokens=(420,), dim=17, vocab=65, dtype=dtype, reduction="sum", ignored="runs", bias=True,
                   seed=seed + 1),
        Case.build(tokens=(4, 70), dim=65, vocab=129, dtype=dtype, reduction="none", ignored="right", z_loss=1e-2,
                   class_weight=True, seed=seed + 2),
        Case.build(tokens=(4, 70), dim=33, vocab=257, dtype=dtype, reduction="mean", ignored="right",
                   class_weight=True, label_smoothing=0.1, seed=seed + 3),
        # A whole sequence of 600 padded tokens: every aligned chunk of up to 512 tokens in it is padding.
        Case.build(tokens=(2, 600), dim=16, vocab=64, dtype=dtype, reduction="mean", ignored="runs", seed=seed + 4),
    ]


def confident_examples(dtype: str) -> list[Case]:
    """The label's probability near 1, as late in training: p_y - 1 is a small difference of
    numbers near 1, which a rounded p_y loses."""
    seed = DTYPE_SEEDS[dtype] + 500
    return [
        Case.build(tokens=(2, 40), dim=64, vocab=129, dtype=dtype, reduction="none", logits="confident", seed=seed),
        Case.build(tokens=(67,), dim=72, vocab=1031, dtype=dtype, reduction="mean", logits="confident", bias=True,
                   ignored="some", scale=16.0, seed=seed + 1),
    ]


def model_size_examples() -> list[Case]:
    """Past 2^16 tokens with a small head (a grid axis of 65535 blocks, 16-bit token offsets; one
    token wrong in 65536 is invisible in a mean, so per-token losses too), and the hidden sizes of
    real models, where a partial sum over D kept in the input dtype adds up (with 80 tokens, so
    that their per-token losses are compared norm-wise too)."""
    return [
        Case.build(tokens=(65600,), dim=8, vocab=17, dtype="float32", reduction="none", ignored="some", seed=41),
        Case.build(tokens=(2, 32800), dim=16, vocab=31, dtype="bfloat16", reduction="mean", bias=True, seed=42),
        Case.build(tokens=(2, 40), dim=4096, vocab=64, dtype="bfloat16", reduction="sum", seed=43),
        Case.build(tokens=(2, 4), dim=8192, vocab=33, dtype="float16", reduction="none", seed=44),
        Case.build(tokens=(33,), dim=2304, vocab=130, dtype="bfloat16", reduction="mean", bias=True, z_loss=1e-2,
                   ignored="some", seed=45),
    ]


def large_vocab_examples() -> list[Case]:
    # Past 2^16 classes every kernel's class blocks are crossed many times, with ordinary logits, so
    # that the last blocks' classes carry probability: the per-class inputs (bias, class weights)
    # go with them, as a kernel slices them block by block (a bias block read from the wrong
    # offset, say, moves only the classes past the first block). The class-weighted one ignores no
    # token: torch's loss_parallel() refuses class weights with ignored tokens (a known bug), and
    # would then skip the bias as well.
    return [
        Case.build(tokens=(64,), dim=64, vocab=65537, dtype="float32", bias=True, class_weight=True, seed=1),
        Case.build(tokens=(2, 48), dim=96, vocab=100003, dtype="bfloat16", reduction="none", bias=True,
                   ignored="some", seed=2),
        Case.build(tokens=(65,), dim=65, vocab=65536, dtype="float16", reduction="sum", label_smoothing=0.1,
                   z_loss=1e-2, ignored="some", seed=3),
    ]


def at_scale_examples() -> list[Case]:
    return [
        Case.build(tokens=(2048,), dim=64, vocab=2048, dtype="bfloat16", reduction="sum", bias=True, seed=21),
        Case.build(tokens=(2, 1024), dim=96, vocab=2053, dtype="float16", ignored="some", bias=True, seed=22),
        Case.build(tokens=(2048,), dim=80, vocab=1031, dtype="bfloat16", ignored="some", z_loss=1e-2,
                   label_smoothing=0.1, seed=23),
    ]


def _contract_examples(dtypes: tuple[str, ...], **extra) -> list[Case]:
    """Three cases for an identity: mean with a bias, sum with smoothing and z-loss, none with class
    weights and a softcap; each in the next of ``dtypes``."""
    variants = (
        dict(reduction="mean", bias=True),
        dict(reduction="sum", label_smoothing=0.1, z_loss=1e-2),
        dict(reduction="none", class_weight=True, softcap=5.0, scale=16.0),
    )
    cases = []
    for i, (variant, (tokens, dim, vocab)) in enumerate(zip(variants, OPTION_SHAPES)):
        fields = {**variant, **extra}
        cases.append(Case.build(tokens=tokens, dim=dim, vocab=vocab, dtype=dtypes[i % len(dtypes)],
                                ignored="some", seed=300 + i, **fields))
    # A vocabulary that 2 and 3 divide: a vocab-parallel kernel that needs V divisible by its P
    # ranks (Megatron's) refuses the others.
    cases.append(Case.build(tokens=(66,), dim=65, vocab=VOCAB_DIVIDED_BY_RANKS, dtype=dtypes[0], ignored="some",
                            seed=303, **extra))
    return cases


def explicit_examples(property_id: str, dtypes: tuple[str, ...]) -> list[Case]:
    """The explicit examples of one property (``dtypes``: the dtypes it draws)."""
    if property_id in ("equivalence/float32", "equivalence/bfloat16", "equivalence/float16"):
        return equivalence_examples(dtypes[0])
    if property_id == "equivalence/large-vocab":
        return large_vocab_examples()
    if property_id == "precision/at-scale":
        return at_scale_examples()
    if property_id == "equivalence/model-sizes":
        return model_size_examples()
    if property_id in ("autograd/interleaved", "autograd/training-steps"):
        return call_pattern_examples(dtypes)
    if property_id == "autograd/grad-subsets":
        # Every subset in every dtype: a kernel's path for a frozen input (no weight gradient, say)
        # may differ by dtype (a float32-only fast path).
        subsets = (("hidden",), ("weight", "bias"), ("bias",), ("weight",), ("hidden", "bias"))
        plain = [Case.build(tokens=(70,), dim=65, vocab=129, dtype=dtype, bias=True, ignored="some", grads=grads,
                            seed=340 + i) for i, (grads, dtype) in enumerate(itertools.product(subsets, dtypes))]
        # A whole head: its norm alone (frozen trunk and projection), or everything but the norm.
        head_subsets = (("norm_weight", "norm_bias"), ("hidden", "weight", "class_scale"))
        return plain + [Case.build(tokens=(70,), dim=65, vocab=129, dtype=dtypes[i % len(dtypes)], norm="layernorm",
                                   class_scale=True, ignored="some", grads=grads, seed=315 + i)
                        for i, grads in enumerate(head_subsets)]
    if property_id == "autograd/tied-weights":
        return [Case.build(tokens=(65,), dim=33, vocab=129, dtype=dtype, tied=True, bias=True, ignored="some",
                           seed=320 + i) for i, dtype in enumerate(dtypes[:2])]
    if property_id == "invariance/sum-split":
        return [Case.build(tokens=(67,), dim=72, vocab=131, dtype=dtypes[0], reduction="sum", ignored="some", seed=330),
                Case.build(tokens=(67,), dim=65, vocab=VOCAB_DIVIDED_BY_RANKS, dtype=dtypes[0], reduction="sum",
                           ignored="some", seed=332),
                Case.build(tokens=(2, 40), dim=65, vocab=257, dtype=dtypes[1 % len(dtypes)], reduction="sum",
                           bias=True, z_loss=1e-2, ignored="some", seed=331)]
    if property_id == "invariance/permutation":
        return [Case.build(tokens=(3, 22), dim=65, vocab=129, dtype=dtypes[0], reduction="none", ignored="some",
                           bias=True, seed=340)]
    if property_id == "invariance/chunk-size":
        return [Case.build(tokens=(129,), dim=33, vocab=257, dtype=dtypes[0], chunk=64, ignored="some", seed=350),
                Case.build(tokens=(130,), dim=65, vocab=129, dtype=dtypes[1 % len(dtypes)], chunk=63, ignored="some",
                           reduction="sum", seed=351),
                Case.build(tokens=(13,), dim=5, vocab=129, dtype=dtypes[0], chunk=4, ignored="some", seed=352)]
    if property_id == "logits/keep-last":
        return [Case.build(tokens=(2, 70), dim=65, vocab=129, dtype=dtypes[0], keep=1, seed=360),
                Case.build(tokens=(70,), dim=65, vocab=129, dtype=dtypes[0], bias=True, softcap=5.0, scale=16.0,
                           seed=361),
                Case.build(tokens=(3, 33), dim=64, vocab=257, dtype=dtypes[1 % len(dtypes)], keep=33, seed=362),
                Case.build(tokens=(2, 40), dim=33, vocab=65, dtype=dtypes[2 % len(dtypes)], keep=17, bias=True, seed=363),
                Case.build(tokens=(2, 33), dim=65, vocab=129, dtype=dtypes[1 % len(dtypes)], keep=5, norm="rmsnorm",
                           class_scale=True, softcap=5.0, seed=364)]
    if property_id in ("autograd/scaled-loss", "autograd/retain-graph", "autograd/no-grad", "autograd/inputs-unchanged"):
        return _contract_examples(dtypes)
    return []


def call_pattern_examples(dtypes: tuple[str, ...]) -> list[Case]:
    """Cases for several calls on one head: mean with a bias over (B, T) inputs, none with z-loss and
    class weights, sum with smoothing; each in the next dtype."""
    variants = (
        dict(tokens=(2, 33), dim=65, vocab=129, reduction="mean", bias=True),
        dict(tokens=(65,), dim=33, vocab=257, reduction="none", z_loss=1e-2, class_weight=True),
        dict(tokens=(70,), dim=64, vocab=131, reduction="sum", label_smoothing=0.1, bias=True),
    )
    return [Case.build(dtype=dtypes[i % len(dtypes)], ignored="some", seed=370 + i, **variant)
            for i, variant in enumerate(variants)]


def fitted_examples(property_id: str, dtypes: tuple[str, ...], fit) -> list[Case]:
    """The explicit examples with ``fit`` applied (None drops one), each once, in order."""
    fitted = (fit(case) for case in explicit_examples(property_id, dtypes))
    return list(dict.fromkeys(case for case in fitted if case is not None))

