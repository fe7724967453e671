"""Hypothesis strategies that draw ``Case``s aimed at what breaks LM-head kernels.

Shapes mix "special" values (N = 1, primes, powers of two and their neighbours, V just past a
block size) with plain integers, so Hypothesis both hits the known-bad shapes and shrinks a
failure to the smallest one. Options are drawn only from what the implementation supports, each
independently, so they appear alone and in every combination.
"""

from __future__ import annotations

from hypothesis import strategies as st

from harness.check.case import GRADIENT_INPUTS, IGNORE_PATTERNS, Case
from harness.check.support import Support
from harness.spec import OPTIONS

# N = 1, primes, and powers of two with their neighbours (no block size divides a prime).
SPECIAL_TOKENS = (1, 2, 3, 7, 13, 31, 32, 33, 61, 64)
# Vocabularies just below, at and past typical block sizes (16 ... 1024), and primes.
SPECIAL_VOCABS = (2, 3, 17, 31, 127, 128, 129, 257, 509, 1024, 1031)
# Small and odd hidden sizes.
SPECIAL_DIMS = (1, 3, 5, 7, 16, 33)
# At least 2^16: one past it and primes, with few tokens and a small D to stay cheap.
LARGE_VOCABS = (65536, 65537, 65539, 100003)

MAX_TOKENS = 64
MAX_DIM = 40
MAX_VOCAB = 1100

OPTION_VALUES = {
    "ignore_index": (-1, 0),  # negative, and a real class id
    "label_smoothing": (0.1, 0.5),
    "z_loss": (1e-4, 1e-2),
    "softcap": (5.0, 30.0),
    "loss_div_factor": (3.0, 0.5),
}
LOGIT_SCALES = (1.0, 16.0)  # ordinary logits, and peaked softmaxes with logits in the tens
SEEDS = st.integers(0, 2**16 - 1)


def _tokens(draw, *, large_vocab: bool, min_tokens: int, flat: bool) -> tuple[int, ...]:
    three_d = False if flat else draw(st.booleans())
    if large_vocab:
        if three_d:
            return (draw(st.integers(1, 2)), draw(st.integers(max(1, min_tokens // 2), 2)))
        return (draw(st.integers(max(1, min_tokens), 4)),)
    if three_d:
        batch = draw(st.integers(1, 4))
        return (batch, draw(st.integers(max(1, -(-min_tokens // batch)), 16)))
    special = [n for n in SPECIAL_TOKENS if n >= min_tokens]
    return (draw(st.one_of(st.sampled_from(special), st.integers(min_tokens, MAX_TOKENS))),)


@st.composite
def cases(
    draw,
    support: Support,
    *,
    dtypes: tuple[str, ...],
    reductions: tuple[str, ...] | None = None,
    large_vocab: bool = False,
    tied: bool | None = None,
    grad_subsets: bool = False,
    chunked: bool = False,
    min_tokens: int = 1,
    flat: bool = False,
) -> Case:
    """A ``Case`` the implementation supports.

    ``tied``: None draws tied or untied heads; ``grad_subsets`` draws which inputs require grad;
    ``chunked`` draws a chunk size; ``flat`` keeps inputs 2-D; ``min_tokens`` bounds N from below.
    """
    dtype = draw(st.sampled_from([d for d in dtypes if d in support.dtypes]))
    reduction = draw(st.sampled_from([r for r in (reductions or support.reductions) if r in support.reductions]))
    tokens = _tokens(draw, large_vocab=large_vocab, min_tokens=min_tokens, flat=flat)
    if large_vocab:
        dim = draw(st.sampled_from((1, 3, 5, 7)))
        vocab = draw(st.sampled_from(LARGE_VOCABS))
    else:
        dim = draw(st.one_of(st.sampled_from(SPECIAL_DIMS), st.integers(1, MAX_DIM)))
        vocab = draw(st.one_of(st.sampled_from(SPECIAL_VOCABS), st.integers(2, MAX_VOCAB)))

    fields: dict = {}
    for option, values in OPTION_VALUES.items():
        # With V >= 2^16, an upstream gradient other than 1 makes Liger's backward run one
        # program per vocabulary row: minutes under Triton's interpreter for one case.
        if large_vocab and option == "loss_div_factor":
            continue
        if option in support.options and draw(st.booleans()):
            fields[option] = draw(st.sampled_from(values))
    for option in ("bias", "class_weight"):
        if option in support.options:
            fields[option] = draw(st.booleans())
    ignored = draw(st.sampled_from(IGNORE_PATTERNS))
    if ignored == "all" and reduction == "mean":
        ignored = "some"  # 0/0: implementations legitimately differ; the behaviour matrix records it
    is_tied = draw(st.booleans()) if tied is None else tied
    scale = 1.0 if is_tied else draw(st.sampled_from(LOGIT_SCALES))
    grads = GRADIENT_INPUTS
    if grad_subsets and not is_tied:
        available = [g for g in GRADIENT_INPUTS if g != "bias" or fields.get("bias")]
        chosen = draw(st.sets(st.sampled_from(available), min_size=1))
        grads = tuple(g for g in GRADIENT_INPUTS if g in chosen)
    num_tokens = tokens[0] * (tokens[1] if len(tokens) == 2 else 1)
    chunk = draw(st.integers(1, num_tokens + 2)) if chunked else None
    return Case(
        tokens=tokens,
        dim=dim,
        vocab=vocab,
        dtype=dtype,
        reduction=reduction,
        ignored=ignored,
        tied=is_tied,
        scale=scale,
        grads=grads,
        chunk=chunk,
        seed=draw(SEEDS),
        **fields,
    )


def fit_to(case: Case, support: Support) -> Case | None:
    """``case`` without the options the implementation lacks (None if its dtype is unsupported)."""
    if case.dtype not in support.dtypes or not support.reductions:
        return None
    changes: dict = {}
    if case.reduction not in support.reductions:
        changes["reduction"] = support.reductions[0]
    defaults = Case(tokens=(1,), dim=1, vocab=2)
    for option in OPTIONS:  # each option is the Case field of the same name
        if option not in support.options:
            changes[option] = getattr(defaults, option)
    if "bias" in changes and case.grads == ("bias",):
        changes["grads"] = ("weight",)  # without a bias, a frozen-backbone-and-head case trains the head
    fitted = case.replace(**changes)
    if fitted.ignored == "all" and fitted.reduction == "mean":
        fitted = fitted.replace(ignored="some")
    return fitted
