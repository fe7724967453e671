"""Known issues of built-in implementations, declared beside each adapter (``harness.known``).

A known failure's example case must show exactly the status "known-failure": when a new release
fixes it (a pass) or breaks something else there (a fail), this test fails and the entry is
updated. A signature excuses only the mismatch it describes: the same property failing any other
way is a failure. A known imprecision is a row of data: at most one applies to a comparison, and it
widens the budget by its ratio and no more. A known limitation (an error raised on purpose) makes a
case unsupported only when the error is of its type and says its message.
"""

import math

import pytest
import torch

from harness.case import make_inputs, parse_case
from harness.check.properties import PROPERTY_IDS, CheckContext, find_property, judge
from harness.check.run_property import FAIL, KNOWN_FAILURE, UNSUPPORTED, Target, known_issues, run_case
from harness.check.tolerance import BUDGET, Error, allowance, unit_roundoff
from harness.known import KnownFailure, KnownImprecision, KnownLimitation, Mismatch, overlapping_imprecisions
from harness.registry import builtin_names, resolve
from implementations import builtin_implementations

COMPILED = {"torch-compile", "cce"}  # their first compile takes tens of seconds on a CPU


def _entries(kinds, device="cpu"):
    """(implementation name, entry) for every built-in's known issues of ``kinds`` on ``device``."""
    for impl in builtin_implementations():
        for entry in impl.known_issues(device):
            if isinstance(entry, kinds) and (not entry.devices or device in entry.devices):
                yield impl.name, entry


def runs_slowly(name: str) -> bool:
    """Compiles (tens of seconds on a CPU), or starts rank processes (the distributed family)."""
    return name in COMPILED or resolve(name).family == "distributed"


def _run(implementation: str, property_id: str, case: str):
    impl = resolve(implementation)
    if not impl.availability().available:
        pytest.skip(f"{implementation} is not available here: {impl.availability().detail}")
    return run_case(Target(implementation, impl), find_property(property_id), parse_case(case), "cpu")


def _failures_and_imprecisions():
    for name, entry in _entries((KnownFailure, KnownImprecision)):
        yield pytest.param(name, entry, id=f"{name}-{entry.example.split(':')[0]}-{entry.signature[:30]}")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_every_entry_names_its_package_a_property_and_a_case(device):
    for _, entry in _entries((KnownFailure, KnownImprecision, KnownLimitation), device):
        assert entry.reason and entry.package
        if isinstance(entry, KnownLimitation):
            assert set(entry.properties) <= set(PROPERTY_IDS) and entry.error_type and entry.message
            continue
        property_id, case = entry.example.split(": ")
        assert property_id in PROPERTY_IDS and parse_case(case)
        if isinstance(entry, KnownFailure):
            assert (entry.matches is None) != (entry.raises is None), "a signature is a shape or an exception"
        else:
            assert entry.max_ratio > 1 and set(entry.properties) <= set(PROPERTY_IDS)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_at_most_one_imprecision_row_applies_to_a_comparison(device):
    for impl in builtin_implementations():
        assert overlapping_imprecisions(impl.known_issues(device)) == [], impl.name


def test_a_plugin_gets_no_known_issues_even_if_it_declares_some():
    """A plugin cannot excuse its own failures: only a built-in's entries apply."""
    from harness.adapter import Implementation

    class Excuses(Implementation):
        name = "excuses-itself"

        def known_issues(self, device):
            return (KnownImprecision("anything", "equivalence/float32: N=1,D=1,V=2,seed=0", "mine 1.0",
                                     ("float32",), ("loss",), 1e9),)

    assert known_issues(Target("tests.x:excuses", Excuses()), "cpu") == ()
    assert known_issues(Target("liger", resolve("liger")), "cpu") != ()


@pytest.mark.slow
@pytest.mark.parametrize("name, known", list(_failures_and_imprecisions()))
def test_a_known_failure_shows_exactly_as_known_on_its_example(name, known):
    property_id, case = known.example.split(": ")
    result = _run(name, property_id, case)
    assert result.status == KNOWN_FAILURE, f"{result.status}: {result.detail}"
    assert known.reason in result.detail


def _liger_entry(kind, text, device="cpu", dtype=None):
    from harness.known import on_device

    (entry,) = [k for k in on_device(resolve("liger").known_issues(device), device)
                if isinstance(k, kind) and text in k.reason and (dtype is None or dtype in k.dtypes)]
    return entry


def test_the_retain_graph_signature_excuses_its_own_accumulation_and_nothing_else():
    """liger-kernel's second backward scales the saved gradient by c again: (c + c^2) g where 2 c g is
    due (2 c^2 g for hidden states whose .grad is the saved buffer itself)."""
    entry = _liger_entry(KnownFailure, "place (element_mul_kernel)")
    case = parse_case("N=6,D=5,V=33,reduction=mean,seed=10")
    g = torch.linspace(-1, 1, 30, dtype=torch.float64)
    c = 0.375
    allowed = allowance([Error(1e-7, 1e-7)], 2 * c * g, g.abs(), torch.float32, [torch.float32], [10])

    def mismatch_with(twice, tensor="grad_weight"):
        return Mismatch("autograd/retain-graph", case, tensor, "differs", twice, 2 * c * g, allowed,
                        g.abs(), loss_scale=c)

    assert entry.matches(mismatch_with((c + c * c) * g))
    assert entry.matches(mismatch_with(2 * c * c * g, "grad_hidden"))
    assert entry.matches(mismatch_with((c + c * c) * g, "grad_hidden"))  # a strided or computed h
    assert not entry.matches(mismatch_with(2 * c * c * g))  # not the weight's signature
    assert not entry.matches(mismatch_with(3 * c * g))  # some other wrong accumulation


def test_a_known_imprecision_excuses_up_to_its_ratio_of_the_budget_and_no_more():
    """Accumulating across chunks in the input dtype: up to max_ratio times the budget, on its dtypes
    and tensors only; the excused mismatch is observed (shown as a known failure)."""
    entry = _liger_entry(KnownImprecision, "accumulates the weight", device="cuda", dtype="float16")
    case = parse_case("N=65,D=63,V=1025,dtype=float16,reduction=mean,bias=1,ignored=some,seed=3010")
    reference = torch.linspace(-1, 1, 1025, dtype=torch.float64)
    terms = torch.full_like(reference, 1e-3)
    budget = BUDGET * unit_roundoff(torch.float16) * 1e-3
    ctx = CheckContext(property_id="equivalence/float16", known=(entry,))

    def judged(offset, tensor="grad_bias"):
        actual = reference.clone()
        actual[10] += offset  # one element: no drift for the norm to see
        return judge(tensor, actual, reference, terms, case, ctx, [Error(0.0, 1e-9)], [torch.float32])

    assert judged(0.5 * budget) is None and not ctx.observed  # within the budget: nothing to excuse
    assert judged(0.9 * entry.max_ratio * budget) is None and len(ctx.observed) == 1
    beyond = judged(1.5 * entry.max_ratio * budget)
    assert beyond is not None and "beyond the known imprecision" in beyond.message
    assert judged(2 * budget, tensor="grad_hidden") is not None  # not a tensor it covers


def test_the_megatron_signatures_excuse_its_shard_local_smoothing_and_nothing_else():
    """megatron-core's smoothing is rank 0's shard-local loss (``megatron_loss_model``), +inf only where a
    probability may underflow; the model needs no megatron-core, so this runs everywhere."""
    from harness.check.evaluation import run_reference
    from implementations.vocab_parallel.megatron_known import MEGATRON_ISSUES, megatron_loss_model

    local, underflow = [k for k in MEGATRON_ISSUES if isinstance(k, KnownFailure)]

    def explain(m, entries):
        return tuple(k for k in entries if k.matches(m))

    def mismatch_with(case, smoothing=0.1, factor=1.0, first=None):
        """The model's loss (with another smoothing, times ``factor``, its first token set to ``first``)."""
        ref, inputs = run_reference(case), make_inputs(case, reference=True)
        spec = inputs.spec.replace(label_smoothing=smoothing)
        actual = (megatron_loss_model(inputs.hidden, inputs.weight, inputs.labels, spec, None).loss * factor).detach()
        if first is not None:
            actual[0] = first
        terms = ref.magnitudes["loss"]
        allowed = allowance([Error(1e-7, 1e-7)], ref.loss, terms, torch.float32, [torch.float32], [10])
        return Mismatch("equivalence/float32", case, "loss", "differs", actual.float(), ref.loss, allowed, terms)

    both = (local, underflow)
    ordinary = parse_case("N=6,D=5,V=8,reduction=none,label_smoothing=0.1,scale=16.0,seed=0")  # P = 2, K = 4
    assert explain(mismatch_with(ordinary), both) == (local,)
    assert explain(mismatch_with(ordinary, factor=1.01), both) == ()
    # PyTorch's smoothing handed to Megatron unconverted (the adapter's old bug) is not the signature.
    assert explain(mismatch_with(ordinary, smoothing=0.1 * 8 / 7), both) == ()
    assert explain(mismatch_with(ordinary, first=math.inf), both) == ()  # no probability underflows there
    spread = parse_case("N=6,D=5,V=8,reduction=none,label_smoothing=0.1,scale=100.0,seed=0")  # logits past 103
    assert explain(mismatch_with(spread, first=math.inf), both) == (underflow,)
    assert explain(mismatch_with(spread, first=math.nan), both) == ()


@pytest.mark.parametrize(
    "name, known",
    [pytest.param(name, k, marks=[pytest.mark.slow] if runs_slowly(name) else [])
     for name, k in _entries(KnownLimitation)],
    ids=lambda value: value if isinstance(value, str) else value.properties[0],
)
def test_known_limitation_is_reported_as_unsupported_with_its_error(name, known):
    result = _run(name, known.properties[0], known.case)
    assert result.status == UNSUPPORTED
    assert known.reason in result.detail and f"({known.error_type})" in result.detail


def test_an_error_that_is_not_the_limitation_fails_the_property():
    """torch-linear-ce's limitation is its own RuntimeError on a second backward, nothing else."""
    (limitation,) = [k for k in resolve("torch-linear-ce").known_issues("cpu") if isinstance(k, KnownLimitation)]
    assert limitation.matches("autograd/retain-graph", RuntimeError("linear_cross_entropy chunked backward "
                                                                    "called twice; retain_graph=True ..."))
    assert not limitation.matches("autograd/retain-graph", RuntimeError("CUDA error: illegal memory access"))
    assert not limitation.matches("autograd/retain-graph", ValueError("linear_cross_entropy chunked backward "
                                                                      "called twice"))
    assert not limitation.matches("autograd/scaled-loss", RuntimeError("linear_cross_entropy chunked backward "
                                                                       "called twice"))


def test_a_plugin_cannot_take_a_built_in_name_and_so_its_excuses():
    from harness.errors import HarnessError

    with pytest.raises(HarnessError, match="name of a built-in implementation"):
        resolve("tests.plugin_examples:impersonates_liger")


def test_a_new_failure_on_a_property_with_a_known_failure_still_fails():
    """liger has a known retain-graph failure; a plugin with another retain-graph bug is not excused,
    and neither is liger on a mismatch of another shape."""
    result = _run("tests.broken_impls:scales_saved_gradient_in_place", "autograd/retain-graph",
                  "N=6,D=5,V=33,reduction=sum,seed=3")
    assert result.status == FAIL
