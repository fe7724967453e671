"""Known failures and limitations of built-in implementations (``harness/check/known_failures.py``).

A known failure's example case must show exactly the status "known-failure": when a new release
fixes it (a pass) or breaks something else there (a fail), this test fails and the entry is
updated. A signature excuses only the mismatch it describes: the same property failing any other
way is a failure. A known limitation (an error raised on purpose) makes a case unsupported only
when the error is of its type and says its message.
"""

import math

import pytest
import torch

from harness.case import make_inputs, parse_case
from harness.check.run_property import FAIL, KNOWN_FAILURE, UNSUPPORTED, Target, run_case
from harness.check.known_failures import KNOWN_FAILURES, KNOWN_LIMITATIONS, Mismatch, explain, known_failures
from harness.check.properties import PROPERTY_IDS, find_property
from harness.check.tolerance import Error, allowance
from harness.registry import builtin_names, resolve

COMPILED = {"torch-compile", "cce"}  # their first compile takes tens of seconds on a CPU


def runs_slowly(name: str) -> bool:
    """Compiles (tens of seconds on a CPU), or starts rank processes (the distributed family)."""
    return name in COMPILED or resolve(name).family == "distributed"


def _run(implementation: str, property_id: str, case: str):
    impl = resolve(implementation)
    if not impl.availability().available:
        pytest.skip(f"{implementation} is not available here: {impl.availability().detail}")
    return run_case(Target(implementation, impl), find_property(property_id), parse_case(case), "cpu")


def _examples():
    for known in KNOWN_FAILURES:
        for name in known.implementations:
            yield pytest.param(known, name, id=f"{name}-{known.example.split(':')[0]}-{known.signature[:30]}")


@pytest.mark.parametrize("known", KNOWN_FAILURES + KNOWN_LIMITATIONS, ids=lambda k: k.reason[:40])
def test_every_entry_names_built_ins_and_properties(known):
    assert set(known.implementations) <= set(builtin_names())
    assert known.reason
    if hasattr(known, "example"):
        property_id, case = known.example.split(": ")
        assert property_id in PROPERTY_IDS and parse_case(case)
        signatures = [known.matches, known.extra, known.raises]
        assert sum(s is not None for s in signatures) == 1, "a signature is a shape, an extra error or an exception"
    else:
        assert set(known.properties) <= set(PROPERTY_IDS) and known.error_type and known.message


@pytest.mark.slow
@pytest.mark.parametrize("known, name", list(_examples()))
def test_a_known_failure_shows_exactly_as_known_on_its_example(known, name):
    property_id, case = known.example.split(": ")
    result = _run(name, property_id, case)
    assert result.status == KNOWN_FAILURE, f"{result.status}: {result.detail}"
    assert known.reason in result.detail


def test_the_retain_graph_signature_excuses_its_own_accumulation_and_nothing_else():
    """liger-kernel's second backward scales the saved gradient by c again: (c + c^2) g where 2 c g is
    due (2 c^2 g for the hidden states)."""
    (entry,) = [k for k in known_failures("liger", "cpu") if "retain" in k.signature]
    case = parse_case("N=6,D=5,V=33,reduction=mean,seed=10")
    g = torch.linspace(-1, 1, 30, dtype=torch.float64)
    c = 0.375
    allowed = allowance([Error(1e-7, 1e-7)], 2 * c * g, g.abs(), torch.float32, [torch.float32], [10])

    def mismatch_with(twice, tensor="grad_weight"):
        return Mismatch("autograd/retain-graph", case, tensor, "differs", twice, 2 * c * g, allowed,
                        g.abs(), loss_scale=c)

    assert explain(mismatch_with((c + c * c) * g), (entry,)) == (entry,)
    assert explain(mismatch_with(2 * c * c * g, "grad_hidden"), (entry,)) == (entry,)
    assert explain(mismatch_with(2 * c * c * g), (entry,)) == ()  # not the weight's signature
    assert explain(mismatch_with(3 * c * g), (entry,)) == ()  # some other wrong accumulation
    assert explain(mismatch_with((c + c * c) * g), ()) == ()  # not liger: not excused


def test_a_precision_signature_excuses_its_own_error_size_only():
    """Accumulating across chunks in bfloat16: at most one rounding of the terms per chunk."""
    (entry,) = [k for k in known_failures("liger", "cuda") if "per chunk" in k.signature]
    case = parse_case("N=65,D=63,V=1025,dtype=float16,reduction=mean,bias=1,ignored=some,seed=3010")
    reference = torch.linspace(-1, 1, 1025, dtype=torch.float64)
    terms = torch.ones_like(reference)
    allowed = allowance([Error(1e-4, 1e-4)], reference, terms, torch.float16, [torch.float16], [10])
    u = torch.finfo(torch.float16).eps / 2

    def mismatch_with(actual, tensor="grad_bias"):
        return Mismatch("equivalence/float16", case, tensor, "differs", actual, reference, allowed, terms)

    assert explain(mismatch_with(reference + 3 * u), (entry,)) == (entry,)
    assert explain(mismatch_with(reference + 0.2), (entry,)) == ()  # far more than chunks x u
    assert explain(mismatch_with(reference + 3 * u, tensor="grad_hidden"), (entry,)) == ()  # not accumulated


def test_the_megatron_signatures_excuse_its_shard_local_smoothing_and_nothing_else():
    """megatron-core's smoothing is rank 0's shard-local loss (``megatron_loss_model``), +inf only where a
    probability may underflow; the model needs no megatron-core, so this runs everywhere."""
    from harness.check.evaluation import run_reference
    from harness.check.known_failures import megatron_loss_model

    local, underflow = [k for k in KNOWN_FAILURES if "megatron-vocab-parallel" in k.implementations]

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
    assert explain(mismatch_with(ordinary, factor=1.001), both) == ()
    # PyTorch's smoothing handed to Megatron unconverted (the adapter's old bug) is not the signature.
    assert explain(mismatch_with(ordinary, smoothing=0.1 * 8 / 7), both) == ()
    assert explain(mismatch_with(ordinary, first=math.inf), both) == ()  # no probability underflows there
    spread = parse_case("N=6,D=5,V=8,reduction=none,label_smoothing=0.1,scale=100.0,seed=0")  # logits past 103
    assert explain(mismatch_with(spread, first=math.inf), both) == (underflow,)
    assert explain(mismatch_with(spread, first=math.nan), both) == ()


@pytest.mark.parametrize(
    "known",
    [pytest.param(k, marks=[pytest.mark.slow] if runs_slowly(k.implementations[0]) else [])
     for k in KNOWN_LIMITATIONS if not k.devices or "cpu" in k.devices],
    ids=lambda k: f"{k.implementations[0]}-{k.properties[0]}",
)
def test_known_limitation_is_reported_as_unsupported_with_its_error(known):
    result = _run(known.implementations[0], known.properties[0], known.case)
    assert result.status == UNSUPPORTED
    assert known.reason in result.detail and f"({known.error_type})" in result.detail


def test_an_error_that_is_not_the_limitation_fails_the_property():
    """torch-linear-ce's limitation is its own RuntimeError on a second backward, nothing else."""
    (limitation,) = [k for k in KNOWN_LIMITATIONS if "torch-linear-ce" in k.implementations]
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
