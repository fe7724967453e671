"""Each bug of ``tests/reach_bugs.py`` is real, and shows only on the input its docstring names.

For every bug, a demonstration builds that input (cheaply: N = 65600 with D = 8, D = 4096 with
N = 64, two forwards of one shape, ...) and measures the plugin's error against the float64
reference (``harness.semantics``): the bug is off by far more than any rounding (a relative error
past 1e-3, NaN, a wrong shape, or for a precision bug several times torch-eager's own error),
and the correct kernel it was made from (``chunked_kernel``) is not. Every bug is also exact on a
quick test (small float64 ``(N, D)`` inputs, defaults, one forward then its backward), which is why
a gate has to build these inputs to see it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from harness.semantics import reference_result
from harness.spec import LossSpec
from tests import reach_bugs

BUGS = {bug.__name__: bug for bug in reach_bugs.BUGS}


@pytest.fixture(autouse=True)
def fresh_caches():
    """Each test starts with the call-pattern bugs' caches as a fresh process has them."""
    reach_bugs.forget_cached_state()
    yield
    reach_bugs.forget_cached_state()


def draw(tokens: tuple[int, ...], dim: int, vocab: int, dtype=torch.float32, *, seed=0, scale=1.0, bias=False):
    """Hidden states, head, labels and (optionally) bias, drawn in float64 and rounded to ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*tokens, dim, generator=generator, dtype=torch.float64)
    weight = torch.randn(vocab, dim, generator=generator, dtype=torch.float64) * scale / dim**0.5
    labels = torch.randint(0, vocab, tokens, generator=generator)
    b = torch.randn(vocab, generator=generator, dtype=torch.float64) if bias else None
    return hidden.to(dtype), weight.to(dtype), labels, None if b is None else b.to(dtype)


def reference(hidden, weight, labels, bias=None, upstream=None, **options):
    """The float64 reference: loss (the labels' shape for none) and the gradients of hidden, weight, bias."""
    class_weight = options.pop("class_weight", None)
    spec = LossSpec(class_weight=None if class_weight is None else class_weight.double(), **options)
    return reference_result(hidden, weight, labels, spec, bias, grad_output=upstream)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error; inf when ``got`` is not finite or has another shape."""
    if got.shape != expected.shape:
        return math.inf
    error = float((got.detach().double() - expected).norm() / expected.norm())
    return error if math.isfinite(error) else math.inf


def leaves(*tensors):
    return [None if t is None else t.clone().requires_grad_() for t in tensors]


def eager_loss(hidden, weight, labels, reduction="mean"):
    """torch-eager: logits in the input dtype, the loss in float32."""
    return F.cross_entropy(F.linear(hidden, weight).float().flatten(0, -2), labels.flatten(), reduction=reduction)


# --- scale ------------------------------------------------------------------------------------------------


def token_index_wraps_at_65536(plugin) -> float:
    """The per-token losses of the tokens past 2^16 (N = 65600, D = 8, V = 17)."""
    hidden, weight, labels, _ = draw((65600,), 8, 17)
    loss = plugin(hidden, weight, labels, reduction="none")
    expected = reference(hidden, weight, labels, reduction="none").loss
    return relative_error(loss[65536:], expected[65536:])


def ratio_to_eager(plugin, dim: int) -> float:
    """The per-token losses' error in bfloat16, as a multiple of torch-eager's (N = 64, V = 64)."""
    hidden, weight, labels, _ = draw((64,), dim, 64, torch.bfloat16)
    expected = reference(hidden, weight, labels, reduction="none").loss
    eager = relative_error(eager_loss(hidden, weight, labels, "none"), expected)
    return relative_error(plugin(hidden, weight, labels, reduction="none"), expected) / eager


def hidden_sum_in_input_dtype(plugin) -> float:
    """At D = 4096 in bfloat16: a multiple of torch-eager's error."""
    return ratio_to_eager(plugin, 4096)


def last_token_of_4096_block_dropped(plugin) -> float:
    """The per-token losses of 4096 tokens (D = 8, V = 17): the last is 0."""
    hidden, weight, labels, _ = draw((4096,), 8, 17)
    loss = plugin(hidden, weight, labels, reduction="none")
    return relative_error(loss, reference(hidden, weight, labels, reduction="none").loss)


# --- batch structure --------------------------------------------------------------------------------------


def labels_flattened_sequence_first(plugin) -> float:
    """The mean of (B, T) = (3, 5) inputs."""
    hidden, weight, labels, _ = draw((3, 5), 8, 17)
    return relative_error(plugin(hidden, weight, labels), reference(hidden, weight, labels).loss)


def none_loss_flat(plugin) -> float:
    """The per-token losses of (B, T) = (3, 5) inputs, shape included."""
    hidden, weight, labels, _ = draw((3, 5), 8, 17)
    loss = plugin(hidden, weight, labels, reduction="none")
    return relative_error(loss, reference(hidden, weight, labels, reduction="none").loss)


def mean_per_sequence(plugin) -> float:
    """The mean of two sequences of 8 tokens, the first with 4 of them padding."""
    hidden, weight, labels, _ = draw((2, 8), 8, 17)
    labels[0, 4:] = -100
    return relative_error(plugin(hidden, weight, labels), reference(hidden, weight, labels).loss)


# --- layouts ----------------------------------------------------------------------------------------------


def rows_read_at_n_times_d(plugin) -> float:
    """The loss of hidden states that are the first half of a torch.split (row stride 2 D)."""
    wide, weight, labels, _ = draw((16,), 16, 17)
    hidden = wide.split(8, -1)[0]
    weight = weight[:, :8].contiguous()
    return relative_error(plugin(hidden, weight, labels), reference(hidden, weight, labels).loss)


def labels_read_row_major(plugin) -> float:
    """The loss against shifted labels full[:, 1:] (row stride T + 1)."""
    hidden, weight, full, _ = draw((2, 9), 8, 17)
    hidden, labels = hidden[:, :-1], full[:, 1:]
    return relative_error(plugin(hidden, weight, labels), reference(hidden, weight, labels).loss)


def upstream_read_row_major(plugin) -> float:
    """The hidden states' gradient of loss.sum().backward() with reduction none (an expanded upstream of 1)."""
    hidden, weight, labels, _ = draw((2, 8), 8, 17)
    (h,) = leaves(hidden)
    plugin(h, weight, labels, reduction="none").sum().backward()
    return relative_error(h.grad, reference(hidden, weight, labels, reduction="none").grad_hidden)


# --- padding ----------------------------------------------------------------------------------------------


def mean_per_chunk_reweighted(plugin) -> float:
    """The mean of 512 tokens whose first 256 are padding."""
    hidden, weight, labels, _ = draw((512,), 8, 17)
    labels[:256] = -100
    return relative_error(plugin(hidden, weight, labels), reference(hidden, weight, labels).loss)


def mean_per_row_reweighted(plugin) -> float:
    """The mean of two sequences of 8 tokens, the second all padding."""
    hidden, weight, labels, _ = draw((2, 8), 8, 17)
    labels[1] = -100
    return relative_error(plugin(hidden, weight, labels), reference(hidden, weight, labels).loss)


def z_count_assumes_padding(plugin) -> float:
    """The mean with a z-loss of 16 tokens, none ignored."""
    hidden, weight, labels, _ = draw((16,), 8, 17, seed=1)
    loss = plugin(hidden, weight, labels, z_loss_multiplier=1e-2)
    return relative_error(loss, reference(hidden, weight, labels, z_loss_multiplier=1e-2).loss)


# --- call patterns ----------------------------------------------------------------------------------------


def gradient_buffer_per_shape(plugin) -> float:
    """The first of two forwards of one shape, backward after the second forward: its hidden gradient."""
    first, second = draw((8,), 8, 17, seed=1), draw((8,), 8, 17, seed=2)
    (h1,), (h2,) = leaves(first[0]), leaves(second[0])
    loss1 = plugin(h1, first[1], first[2])
    loss2 = plugin(h2, second[1], second[2])
    loss1.backward()
    loss2.backward()
    return relative_error(h1.grad, reference(*first[:3]).grad_hidden)


def weight_grad_workspace_not_zeroed(plugin) -> float:
    """The weight gradient of the second of two calls of the same shape."""
    for seed in (1, 2):
        hidden, weight, labels, _ = draw((8,), 8, 17, seed=seed)
        (w,) = leaves(weight)
        plugin(hidden, w, labels).backward()
    return relative_error(w.grad, reference(hidden, weight, labels).grad_weight)


def grad_accumulator_reset_per_forward(plugin) -> float:
    """The weight's .grad after two micro-batches, forward and backward each."""
    _, weight, _, _ = draw((8,), 8, 17)
    (w,) = leaves(weight)
    expected = torch.zeros(weight.shape, dtype=torch.float64)
    for seed in (1, 2):
        hidden, _, labels, _ = draw((8,), 8, 17, seed=seed)
        plugin(hidden, w, labels).backward()
        expected += reference(hidden, weight, labels).grad_weight
    return relative_error(w.grad, expected)


def weight_copy_cached_by_pointer(plugin) -> float:
    """The loss of a second step, after an optimizer step updated the weight in place."""
    hidden, weight, labels, _ = draw((8,), 8, 17)
    (w,) = leaves(weight)
    plugin(hidden, w, labels).backward()
    with torch.no_grad():
        w -= 0.5 * w.grad  # SGD, in place as torch.optim does it
    return relative_error(plugin(hidden, w, labels), reference(hidden, w.detach(), labels).loss)


# --- confident predictions -----------------------------------------------------------------------------


def confident(dtype=torch.bfloat16):
    """64 tokens whose target logit is about 12 above the others (D = 64, V = 17): p_y > 1 - 2^-9."""
    hidden, weight, labels, _ = draw((64,), 64, 17, torch.float64)
    rows = weight[labels]
    hidden = 0.5 * hidden + 12 * rows / rows.square().sum(-1, keepdim=True)
    p_target = F.linear(hidden, weight).softmax(-1).gather(1, labels[:, None])
    assert (p_target > 1 - 2**-9).float().mean() > 0.9  # the trigger: p_y rounds to 1 in bfloat16
    return hidden.to(dtype), weight.to(dtype), labels


def target_gradient_from_rounded_probability(plugin) -> float:
    """The hidden gradient of confident bfloat16 predictions."""
    hidden, weight, labels = confident()
    (h,) = leaves(hidden)
    plugin(h, weight, labels).backward()
    return relative_error(h.grad, reference(hidden, weight, labels).grad_hidden)


def loss_from_rounded_statistics(plugin) -> float:
    """The per-token losses of confident bfloat16 predictions."""
    hidden, weight, labels = confident()
    loss = plugin(hidden, weight, labels, reduction="none")
    return relative_error(loss, reference(hidden, weight, labels, reduction="none").loss)


# --- other dimensions -----------------------------------------------------------------------------------


def ignored_class_weight_zeroed(plugin) -> float:
    """The mean with label smoothing 0.1 and ignore_index = 0 (a pad token id) over 32 tokens."""
    hidden, weight, labels, _ = draw((32,), 8, 17)
    labels[::4] = 0
    options = dict(ignore_index=0, label_smoothing=0.1)
    return relative_error(plugin(hidden, weight, labels, **options), reference(hidden, weight, labels, **options).loss)


def loss_as_minus_log_probability(plugin) -> float:
    """The per-token losses of float32 logits in the hundreds (D = 64, V = 17): confidently wrong tokens."""
    hidden, weight, labels, _ = draw((64,), 64, 17, scale=100.0)
    loss = plugin(hidden, weight, labels, reduction="none")
    return relative_error(loss, reference(hidden, weight, labels, reduction="none").loss)


@dataclass(frozen=True)
class Demonstration:
    """A bug's triggering input, as the error of a plugin on it, and the error the bug exceeds."""

    error: Callable
    wrong_above: float


# Relative errors past 1e-3: far more than float32 rounding (the inputs are float32 unless said).
# The confident ones are bfloat16: past 0.1, fifty times what the final rounding costs.
DEMONSTRATIONS = {
    "token_index_wraps_at_65536": Demonstration(token_index_wraps_at_65536, 1e-3),
    "hidden_sum_in_input_dtype": Demonstration(hidden_sum_in_input_dtype, 3.0),  # times torch-eager's error
    "last_token_of_4096_block_dropped": Demonstration(last_token_of_4096_block_dropped, 1e-3),
    "labels_flattened_sequence_first": Demonstration(labels_flattened_sequence_first, 1e-3),
    "none_loss_flat": Demonstration(none_loss_flat, 1e-3),
    "mean_per_sequence": Demonstration(mean_per_sequence, 1e-3),
    "rows_read_at_n_times_d": Demonstration(rows_read_at_n_times_d, 1e-3),
    "labels_read_row_major": Demonstration(labels_read_row_major, 1e-3),
    "upstream_read_row_major": Demonstration(upstream_read_row_major, 1e-3),
    "mean_per_chunk_reweighted": Demonstration(mean_per_chunk_reweighted, 1e-3),
    "mean_per_row_reweighted": Demonstration(mean_per_row_reweighted, 1e-3),
    "z_count_assumes_padding": Demonstration(z_count_assumes_padding, 1e-3),
    "gradient_buffer_per_shape": Demonstration(gradient_buffer_per_shape, 1e-3),
    "weight_grad_workspace_not_zeroed": Demonstration(weight_grad_workspace_not_zeroed, 1e-3),
    "grad_accumulator_reset_per_forward": Demonstration(grad_accumulator_reset_per_forward, 1e-3),
    "weight_copy_cached_by_pointer": Demonstration(weight_copy_cached_by_pointer, 1e-3),
    "target_gradient_from_rounded_probability": Demonstration(target_gradient_from_rounded_probability, 0.1),
    "loss_from_rounded_statistics": Demonstration(loss_from_rounded_statistics, 0.1),
    "ignored_class_weight_zeroed": Demonstration(ignored_class_weight_zeroed, 1e-3),
    "loss_as_minus_log_probability": Demonstration(loss_as_minus_log_probability, 1e-3),
}


def test_there_are_at_least_fourteen_bugs_each_documented_and_demonstrated():
    assert len(BUGS) == len(reach_bugs.BUGS) >= 14
    assert all(bug.__doc__ and "triggered by" in bug.__doc__ for bug in BUGS.values())
    assert set(DEMONSTRATIONS) == set(BUGS)


# N = 65600 tokens: about 25 s on the loaded 2-core CPU machine.
SLOW_DEMONSTRATIONS = {"token_index_wraps_at_65536"}


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW_DEMONSTRATIONS else name
                                  for name in BUGS])
def test_a_bug_is_wrong_on_its_triggering_input_where_the_correct_kernel_is_not(name):
    demonstration = DEMONSTRATIONS[name]
    assert demonstration.error(BUGS[name]) > demonstration.wrong_above
    reach_bugs.forget_cached_state()
    assert demonstration.error(reach_bugs.chunked_kernel) < demonstration.wrong_above / 10


def test_the_hidden_sum_in_the_input_dtype_is_harmless_at_the_gates_largest_d():
    assert ratio_to_eager(reach_bugs.hidden_sum_in_input_dtype, 300) < 2.0


@pytest.mark.parametrize("name", ["chunked_kernel", *BUGS])
def test_every_bug_is_exact_on_a_quick_test(name):
    plugin = getattr(reach_bugs, name)
    hidden, weight, labels, bias = draw((7,), 5, 11, torch.float64, bias=True)
    labels[0] = -100
    h, w, b = leaves(hidden, weight, bias)
    loss = plugin(h, w, labels, bias=b)
    loss.backward()
    expected = reference(hidden, weight, labels, bias)
    assert relative_error(loss, expected.loss) < 1e-12
    for got, grad in ((h.grad, expected.grad_hidden), (w.grad, expected.grad_weight), (b.grad, expected.grad_bias)):
        assert relative_error(got, grad) < 1e-12
