"""Every plugin of the false-alarm corpus (``tests/correct_variants.py``) computes the loss of
``harness.semantics`` exactly, apart from its roundings, and keeps the plugin contract.

On float64 inputs no variant rounds anything that matters, so each must match the float64
reference to about 1e-13: every option, every reduction, ``(N, D)`` and ``(B, T, D)`` inputs, and
the views users pass (a column slice of wider hidden states, shifted labels ``full[:, 1:]``, a
transposed weight, a strided bias, the expanded upstream gradient of ``loss.sum().backward()``),
and shapes that cross each variant's blocks (100- and 256-token chunks, 64-token sums, 1000-class
blocks). In float32, bfloat16 and float16 each returns the labels' shape, gradients only for the
inputs that require grad and in their dtypes, leaves its inputs alone, and allows two forwards
before their backwards and a second backward with ``retain_graph``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from harness.semantics import reference_loss
from harness.spec import LossSpec
from tests import correct_variants

VARIANTS = {variant.__name__: variant for variant in correct_variants.VARIANTS}
ALL_OPTIONS = dict(bias=True, class_weight=True, ignore_index=0, label_smoothing=0.1, z_loss_multiplier=1e-2,
                   softcap=5.0)
OPTION_SETS = {
    "defaults-mean": dict(reduction="mean"),
    "bias-sum": dict(reduction="sum", bias=True),
    "bias-none": dict(reduction="none", bias=True, ignore_index=-1),
    "all-mean": dict(reduction="mean", **ALL_OPTIONS),
    "all-sum": dict(reduction="sum", **ALL_OPTIONS),
    "all-none": dict(reduction="none", **ALL_OPTIONS),
    "smoothing-weights-mean": dict(reduction="mean", class_weight=True, label_smoothing=0.5, ignore_index=-1),
}
# (B, T, D, V): quick, and one that crosses the 256-token chunk and the 1000-class block.
SMALL = (2, 9, 5, 17)
BLOCKS = (2, 131, 6, 1003)

# How each input of the "views" layout is taken from the tensor that owns its memory (applied to
# that tensor and, to read the gradient, to its .grad): a column slice of wider hidden states
# (row stride 2 D), a column-major weight, a bias at stride 2.
VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "hidden": lambda t: t[..., : t.shape[-1] // 2],
    "weight": lambda t: t.T,
    "bias": lambda t: t[:, 0],
}


@dataclass
class Inputs:
    """A case as a plugin gets it, the leaves that own its tensors, and the float64 reference."""

    args: dict[str, torch.Tensor | None]  # hidden, weight, bias as passed
    labels: torch.Tensor
    keywords: dict
    leaves: dict[str, torch.Tensor | None]
    views: dict[str, Callable[[torch.Tensor], torch.Tensor]]
    values: dict[str, torch.Tensor | None]  # float64, hidden as (N, D)
    spec: LossSpec

    def loss(self, variant):
        bias = {"bias": self.args["bias"]} if self.args["bias"] is not None else {}
        return variant(self.args["hidden"], self.args["weight"], self.labels, **bias, **self.keywords)

    def grad(self, name: str) -> torch.Tensor | None:
        leaf = self.leaves[name]
        return None if leaf is None or leaf.grad is None else self.views[name](leaf.grad)


def make_inputs(options: dict, layout: str, dtype=torch.float64, *, seed=0, size=SMALL,
                trained=("hidden", "weight", "bias")):
    """``options`` on inputs in ``layout``: flat ``(N, D)``, batched ``(B, T, D)``, or views (batched)."""
    options = dict(options)
    batch, time, dim, vocab = size
    generator = torch.Generator().manual_seed(seed)
    has_bias, has_class_weight = options.pop("bias", False), options.pop("class_weight", False)
    tensors = {
        "hidden": torch.randn(batch, time, dim, generator=generator, dtype=torch.float64),
        "weight": torch.randn(vocab, dim, generator=generator, dtype=torch.float64) * 2 / dim**0.5,
        "bias": torch.randn(vocab, generator=generator, dtype=torch.float64) if has_bias else None,
    }
    labels = torch.randint(0, vocab, (batch, time), generator=generator)
    ignore_index = options.get("ignore_index", -100)
    labels[torch.rand(batch, time, generator=generator) < 0.3] = ignore_index
    labels[:, :2] = torch.tensor([vocab - 1, 0 if ignore_index != 0 else 1])  # the first and last class
    class_weight = torch.rand(vocab, generator=generator, dtype=torch.float64) + 0.5 if has_class_weight else None
    tensors = {name: None if t is None else t.to(dtype) for name, t in tensors.items()}
    values = {name: None if t is None else t.double().clone() for name, t in tensors.items()}
    values["hidden"] = values["hidden"].reshape(-1, dim)
    spec = LossSpec(class_weight=class_weight, **options)
    if class_weight is not None:
        options["class_weight"] = class_weight.to(torch.float64 if dtype == torch.float64 else torch.float32)
    identity = {name: (lambda t: t) for name in tensors}
    if layout == "flat":
        tensors["hidden"], labels = tensors["hidden"].reshape(-1, dim), labels.reshape(-1)
        leaves, views = tensors, identity
    elif layout == "batched":
        leaves, views = tensors, identity
    else:
        labels = torch.cat([labels.new_full((batch, 1), 3), labels], 1)[:, 1:]  # shifted: row stride T + 1
        hidden, weight, bias = tensors["hidden"], tensors["weight"], tensors["bias"]
        leaves = {"hidden": torch.cat([hidden, torch.zeros_like(hidden)], -1), "weight": weight.T.contiguous(),
                  "bias": None if bias is None else torch.stack([bias, torch.zeros_like(bias)], 1)}
        views = VIEWS
    for name in trained:
        if leaves[name] is not None:
            leaves[name].requires_grad_()
    args = {name: None if leaf is None else views[name](leaf) for name, leaf in leaves.items()}
    return Inputs(args, labels, options, leaves, views, values, spec)


def reference(inputs: Inputs, upstream=None):
    """The float64 loss (in the labels' shape for none) and the gradients of every input."""
    leaves = {name: None if t is None else t.clone().requires_grad_() for name, t in inputs.values.items()}
    labels = inputs.labels.reshape(-1)
    loss = reference_loss(leaves["hidden"], leaves["weight"], labels, inputs.spec, leaves["bias"]).loss
    if inputs.spec.reduction == "none":
        loss = loss.reshape(inputs.labels.shape)
    loss.backward(torch.ones_like(loss) if upstream is None else upstream)
    return loss.detach(), {name: None if t is None else t.grad for name, t in leaves.items()}


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.detach().double().reshape(expected.shape) - expected).norm() / expected.norm().clamp_min(1e-300))


def assert_matches_the_reference(variant, inputs: Inputs, bound: float):
    loss = inputs.loss(variant)
    expected, expected_grads = reference(inputs)
    assert loss.shape == expected.shape and loss.dtype == torch.float64
    assert relative_error(loss, expected) < bound
    # The upstream gradient of a per-token loss as users pass it: an expanded 1 (stride 0).
    (loss.sum() if inputs.spec.reduction == "none" else loss).backward()
    for name, grad in expected_grads.items():
        if inputs.values[name] is None:
            continue
        assert inputs.grad(name) is not None and inputs.grad(name).dtype == torch.float64, name
        assert relative_error(inputs.grad(name), grad) < bound, name


def test_the_corpus_has_at_least_twelve_variants_each_documented_in_one_line():
    assert len(VARIANTS) == len(correct_variants.VARIANTS) >= 12
    assert all(variant.__doc__ and len(variant.__doc__.splitlines()) == 1 for variant in VARIANTS.values())


# Every option set on the views users pass ((B, T) inputs, expanded upstream); two on plain layouts.
LAYOUTS = ([("views", option_set) for option_set in OPTION_SETS]
           + [("flat", "all-mean"), ("flat", "bias-none"), ("batched", "all-none"), ("batched", "defaults-mean")])


@pytest.mark.parametrize(("layout", "option_set"), LAYOUTS)
@pytest.mark.parametrize("name", VARIANTS)
def test_a_variant_computes_the_reference_function_on_float64_inputs(name, layout, option_set):
    assert_matches_the_reference(VARIANTS[name], make_inputs(OPTION_SETS[option_set], layout), 1e-12)


@pytest.mark.parametrize("name", VARIANTS)
def test_a_variant_computes_the_reference_function_across_its_blocks(name):
    assert_matches_the_reference(VARIANTS[name], make_inputs(OPTION_SETS["all-none"], "views", size=BLOCKS), 1e-12)


LOW_PRECISION_BOUND = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", VARIANTS)
def test_a_variant_keeps_the_contract_in_each_dtype(name, dtype):
    # The weight is frozen: it must get no gradient.
    inputs = make_inputs(OPTION_SETS["all-none"], "views", dtype, trained=("hidden", "bias"))
    before = {name: t.clone() for name, t in inputs.args.items()}
    labels_before = inputs.labels.clone()
    upstream = torch.randint(-4, 5, inputs.labels.shape).double() / 4
    loss = inputs.loss(VARIANTS[name])
    assert loss.shape == inputs.labels.shape
    loss.backward(upstream.to(loss.dtype))
    assert inputs.leaves["weight"].grad is None
    assert inputs.grad("hidden").dtype == dtype and inputs.grad("bias").dtype == dtype
    for tensor, old in before.items():
        assert torch.equal(old, inputs.args[tensor].detach()), tensor
    assert torch.equal(labels_before, inputs.labels)
    expected, expected_grads = reference(inputs, upstream)
    bound = LOW_PRECISION_BOUND[dtype]
    assert relative_error(loss, expected) < bound
    assert relative_error(inputs.grad("hidden"), expected_grads["hidden"]) < bound
    assert relative_error(inputs.grad("bias"), expected_grads["bias"]) < bound


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("name", VARIANTS)
def test_a_variant_allows_two_forwards_before_their_backwards_and_a_retained_graph(name, reduction):
    options = dict(reduction=reduction, bias=True, label_smoothing=0.1, z_loss_multiplier=1e-2)
    alone = []
    for seed in (1, 2):
        inputs = make_inputs(options, "flat", torch.float32, seed=seed)
        inputs.loss(VARIANTS[name]).sum().backward()
        alone.append({tensor: inputs.grad(tensor) for tensor in inputs.leaves})
    both = [make_inputs(options, "flat", torch.float32, seed=seed) for seed in (1, 2)]
    losses = [inputs.loss(VARIANTS[name]) for inputs in both]
    losses[1].sum().backward(retain_graph=True)
    losses[0].sum().backward(retain_graph=True)
    losses[0].sum().backward()  # a second time: its gradients double
    for inputs, expected, factor in zip(both, alone, (2, 1)):
        for tensor in inputs.leaves:
            torch.testing.assert_close(inputs.grad(tensor), factor * expected[tensor], rtol=1e-6, atol=1e-7,
                                       msg=tensor)
