"""Hypothesis strategies that draw ``Case``s aimed at what breaks LM-head kernels.

Shapes mix "special" values (N = 1, primes, the neighbours of power-of-two block edges in N, D
and V) with plain integers, so Hypothesis both hits the known-bad shapes and shrinks a failure
to the smallest one. Options are drawn only from what the implementation supports, each
independently, so they appear alone and in every combination. The explicit examples every run
checks first (``harness.check.examples``) cover every pair of options in every dtype.
"""

from __future__ import annotations

from hypothesis import assume
from hypothesis import strategies as st

from harness.case import GRADIENT_INPUTS, IGNORE_PATTERNS, LAYOUTS, LOGIT_MODES, UPSTREAMS, Case
from harness.check.support_probe import Support
from harness.spec import OPTION_DECLARATIONS

# Sizes just below, at and past power-of-two block edges (16 ... 4096), and primes: a kernel's
# tail handling (the last partial block of tokens, of the vocabulary, of the hidden dimension) is
# where its bugs live, and no block size divides a prime.
SPECIAL_TOKENS = (1, 2, 3, 7, 13, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 257, 300)
SPECIAL_DIMS = (1, 3, 5, 7, 16, 33, 63, 64, 65, 127, 129, 255, 257, 300)
SPECIAL_VOCABS = (2, 3, 17, 31, 63, 64, 65, 127, 128, 129, 255, 256, 257, 509, 511, 513, 1023, 1025, 2047, 2049,
                  4095, 4097)
MAX_TOKENS = 300
MAX_DIM = 300
MAX_VOCAB = 4100

# At least 2^16, one past it and primes, with N and D at least 64 (real tiles, not toy ones).
LARGE_VOCABS = (65536, 65537, 65539, 100003)
LARGE_VOCAB_TOKENS = (64, 65, 96)
LARGE_VOCAB_DIMS = (64, 65, 96, 128)

# Precision at scale: thousands of tokens, so that a kernel summing per-chunk or per-block partial
# results in the input dtype adds up dozens of roundings of it.
AT_SCALE_TOKENS = (2048, 2500, 3001)
AT_SCALE_DIMS = (64, 80, 96)
AT_SCALE_VOCABS = (1024, 1031, 2048, 2053)

# Real sizes, cheaply: past 2^16 tokens (a grid's axis limit of 65535 blocks, 16-bit token offsets)
# with a small head, or the hidden sizes of real models (partial sums over D kept in a low
# precision show there) with few tokens and classes.
MANY_TOKENS = (65536, 65537, 65600, 70001)
MANY_TOKENS_DIMS = (4, 8, 16)
MANY_TOKENS_VOCABS = (2, 17, 31, 64)
MODEL_DIMS = (2048, 2304, 4096, 5120, 8192)
MODEL_DIM_TOKENS = (1, 7, 16, 33)
MODEL_DIM_VOCABS = (17, 64, 130)

# Ordinary logits; peaked softmaxes with logits in the tens; logits past 88.7, where exp overflows
# float32, so that a softmax computed without subtracting its max shows.
LOGIT_SCALES = (1.0, 16.0, 100.0)
# Padding that leaves something to check: every output of a sum or none case whose tokens are all
# ignored is exactly 0 (the behaviour matrix records the mean of nothing).
DRAWN_IGNORE_PATTERNS = tuple(p for p in IGNORE_PATTERNS if p != "all")
SEEDS = st.integers(0, 2**16 - 1)


def _tokens(draw, *, min_tokens: int, flat: bool) -> tuple[int, ...]:
    three_d = False if flat else draw(st.booleans())
    if three_d:
        batch = draw(st.integers(1, 4))
        return (batch, draw(st.integers(max(1, -(-min_tokens // batch)), MAX_TOKENS // 4)))
    special = [n for n in SPECIAL_TOKENS if n >= min_tokens]
    return (draw(st.one_of(st.sampled_from(special), st.integers(min_tokens, MAX_TOKENS))),)


def _shape(draw, *, large_vocab: bool, at_scale: bool, model_sizes: bool, min_tokens: int, flat: bool):
    """(tokens, D, V) for the kind of case asked for."""
    if model_sizes:
        if draw(st.booleans()):
            tokens = draw(st.sampled_from(MANY_TOKENS))
            shape = (tokens,) if flat or draw(st.booleans()) else (2, -(-tokens // 2))
            return shape, draw(st.sampled_from(MANY_TOKENS_DIMS)), draw(st.sampled_from(MANY_TOKENS_VOCABS))
        shape = (draw(st.sampled_from(MODEL_DIM_TOKENS)),)
        return shape, draw(st.sampled_from(MODEL_DIMS)), draw(st.sampled_from(MODEL_DIM_VOCABS))
    if large_vocab:
        tokens = draw(st.sampled_from(LARGE_VOCAB_TOKENS))
        shape = (tokens,) if flat or draw(st.booleans()) else (2, tokens // 2)
        return shape, draw(st.sampled_from(LARGE_VOCAB_DIMS)), draw(st.sampled_from(LARGE_VOCABS))
    if at_scale:
        tokens = draw(st.sampled_from(AT_SCALE_TOKENS))
        shape = (tokens,) if flat or draw(st.booleans()) else (2, tokens // 2)
        return shape, draw(st.sampled_from(AT_SCALE_DIMS)), draw(st.sampled_from(AT_SCALE_VOCABS))
    tokens = _tokens(draw, min_tokens=min_tokens, flat=flat)
    dim = draw(st.one_of(st.sampled_from(SPECIAL_DIMS), st.integers(1, MAX_DIM)))
    vocab = draw(st.one_of(st.sampled_from(SPECIAL_VOCABS), st.integers(2, MAX_VOCAB)))
    return tokens, dim, vocab


@st.composite
def cases(
    draw,
    support: Support,
    *,
    dtypes: tuple[str, ...],
    reductions: tuple[str, ...] | None = None,
    large_vocab: bool = False,
    at_scale: bool = False,
    model_sizes: bool = False,
    tied: bool | None = None,
    grad_subsets: bool = False,
    chunked: bool = False,
    logits: bool = False,
    min_tokens: int = 1,
    flat: bool = False,
) -> Case:
    """A ``Case`` the implementation supports.

    ``large_vocab``: V >= 2^16; ``at_scale``: thousands of tokens; ``model_sizes``: past 2^16 tokens
    or a real model's hidden size; ``tied``: None draws tied or
    untied heads; ``grad_subsets`` draws which inputs require grad; ``chunked`` draws a chunk size;
    ``logits`` draws how many positions the logits path keeps; ``flat`` keeps inputs 2-D;
    ``min_tokens`` bounds N from below.
    """
    dtype = draw(st.sampled_from([d for d in dtypes if d in support.dtypes]))
    reduction = draw(st.sampled_from([r for r in (reductions or support.reductions) if r in support.reductions]))
    tokens, dim, vocab = _shape(draw, large_vocab=large_vocab, at_scale=at_scale, model_sizes=model_sizes,
                                min_tokens=min_tokens, flat=flat)
    big = large_vocab or at_scale or model_sizes

    fields: dict = {}
    for option in OPTION_DECLARATIONS:
        # With V >= 2^16, an upstream gradient other than 1 makes Liger's backward run one
        # program per vocabulary row: minutes under Triton's interpreter for one case.
        if big and option.name == "loss_div_factor":
            continue
        if option.name in support.options and draw(st.booleans()):
            fields[option.name] = draw(st.sampled_from(option.values))
    ignored = draw(st.sampled_from(DRAWN_IGNORE_PATTERNS))
    is_tied = False if big else (draw(st.booleans()) if tied is None else tied)
    scale = 1.0 if is_tied else draw(st.sampled_from(LOGIT_SCALES))
    logit_mode = "random" if is_tied else draw(st.sampled_from(LOGIT_MODES))
    grads = GRADIENT_INPUTS
    if grad_subsets and not is_tied:
        available = Case.build(tokens=(1,), dim=1, vocab=2, **fields).parameters
        chosen = draw(st.sets(st.sampled_from(available), min_size=1))
        grads = tuple(g for g in GRADIENT_INPUTS if g in chosen)
    num_tokens = tokens[0] * (tokens[1] if len(tokens) == 2 else 1)
    chunk = draw(st.integers(1, num_tokens + 2)) if chunked else None
    keep = draw(st.sampled_from(sorted({0, 1, tokens[-1] // 2, tokens[-1]}))) if logits else 0
    layout = "contiguous" if is_tied else draw(st.sampled_from(LAYOUTS))
    upstream = draw(st.sampled_from(UPSTREAMS)) if reduction == "none" else "random"
    case = Case.build(
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
        keep=keep,
        layout=layout,
        upstream=upstream,
        logits=logit_mode,
        seed=draw(SEEDS),
        **fields,
    )
    assume(not is_minimal(case))  # the explicit examples have it; Hypothesis would draw it first
    return case


def is_minimal(case: Case) -> bool:
    """The smallest case there is: one token, D = 1, V = 2, nothing else on."""
    return case.num_tokens == 1 and case.dim == 1 and case.vocab == 2 and not case.options.items


def fit_to(case: Case, support: Support) -> Case | None:
    """``case`` without the options the implementation lacks (None if its dtype is unsupported)."""
    if case.dtype not in support.dtypes or not support.reductions:
        return None
    changes: dict = {}
    if case.reduction not in support.reductions:
        changes["reduction"] = support.reductions[0]
    for option in OPTION_DECLARATIONS:
        if option.name not in support.options:
            changes[option.name] = option.default
    fitted = case.replace(**changes)
    if not set(fitted.grads) & set(fitted.parameters):  # what it trained is gone: it trains the head
        fitted = fitted.replace(grads=("weight",))
    if fitted.ignored == "all" and fitted.reduction == "mean":
        fitted = fitted.replace(ignored="some")
    if fitted.reduction != "none" and fitted.upstream != "random":
        fitted = fitted.replace(upstream="random")  # a scalar loss's upstream is one number
    return fitted
