"""The public Python API (``harness.api``, re-exported from ``harness``): what a kernel author imports.

``check`` runs the gate's engine on one implementation and reports per property; ``reference``
is the float64 reference; ``cases`` the gate's Hypothesis strategy and ``make_inputs`` its
tensors. Every example in their docstrings runs here. Importing ``harness`` imports neither
Hypothesis nor the gate.
"""

import doctest
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings

import harness
from harness import CheckReport, PropertyReport, cases, check, make_inputs, reference
from harness.api import gate_target
from harness.environment import PROJECT_ROOT
from harness.errors import HarnessError
from harness.semantics import reference_result
from harness.spec import LossSpec
from implementations.torch_native import TorchEager
from tests import broken_impls, plugin_examples

DOCTESTS = {test.name.split(".")[-1]: test for test in doctest.DocTestFinder().find(harness.api) if test.examples}


def test_the_public_names_are_few_and_each_function_has_an_example():
    assert {"check", "reference", "cases", "make_inputs", "Implementation", "Capabilities", "LossSpec",
            "UnsupportedCase"} <= set(harness.__all__) and len(harness.__all__) <= 15
    for function in (check, reference, cases, make_inputs):
        assert ">>>" in function.__doc__, function.__name__
    assert set(DOCTESTS) == {"check", "reference", "cases", "make_inputs"}


@pytest.mark.parametrize("name", [
    pytest.param("check", marks=pytest.mark.slow),  # the gate's float32 examples, in this process
    "reference",
    "cases",
    "make_inputs",
])
def test_each_docstring_example_runs(name):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(DOCTESTS[name])
    assert runner.summarize(verbose=False).failed == 0


def test_harness_check_stays_the_function_after_the_gate_package_is_imported():
    from harness.check.engine import check_target  # noqa: F401 - imports the subpackage's modules

    from harness import check as imported

    assert imported is check and harness.check is check and callable(harness.check)


@pytest.mark.slow
def test_importing_harness_imports_neither_hypothesis_nor_the_gate():
    code = "import sys, harness; print(sorted(m for m in sys.modules if m.startswith(('hypothesis', 'harness.check.'))))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


# --- what check() is given -------------------------------------------------------------------------


def local_loss(hidden, weight, labels, *, reduction="mean"):
    return torch.nn.functional.cross_entropy((hidden @ weight.T).float(), labels, reduction=reduction)


@pytest.mark.parametrize("given, name", [
    ("torch-eager", "torch-eager"),
    (plugin_examples.plain_eager, "tests.plugin_examples:plain_eager"),
    (plugin_examples.SumOnlyAdapter, "tests.plugin_examples:SumOnlyAdapter"),
    (broken_impls.missing_bias_gradient, "tests.broken_impls:missing_bias_gradient"),
    (TorchEager(), "torch-eager"),
])
def test_an_implementation_is_named_so_that_a_child_process_imports_the_same_one(given, name):
    assert gate_target(given, isolated=True).given == name


def test_what_a_child_cannot_import_runs_in_process_or_is_refused_in_one_line():
    with pytest.raises(HarnessError, match="cannot be imported by name in a child process.*in_process=True"):
        gate_target(lambda hidden, weight, labels: None, isolated=True)
    target = gate_target(lambda hidden, weight, labels: None, isolated=False)
    assert target.given == "test_what_a_child_cannot_import_runs_in_process_or_is_refused_in_one_line.<locals>.<lambda>"
    assert gate_target(local_loss, isolated=True).given == "tests.test_api:local_loss"


@pytest.mark.parametrize("options, message", [
    ({"profile": "nightly"}, "unknown profile 'nightly'"),
    ({"dtypes": ["float64"]}, "unknown dtype 'float64'"),
    ({"properties": ["equivalence/float64"]}, "unknown property 'equivalence/float64'"),
    ({"properties": ["equivalence/float32"], "dtypes": ["bfloat16"]}, "none of the properties asked for"),
    ({"max_examples": -1}, "max_examples must be 0 or more"),
])
def test_bad_arguments_are_one_line_errors(options, message):
    with pytest.raises(HarnessError, match=message):
        check("torch-eager", **options)


@pytest.mark.slow
def test_dtypes_leave_out_the_other_dtypes_properties_and_cases():
    report = check(plugin_examples.plain_eager, dtypes="bfloat16", in_process=True, max_examples=0,
                   properties=["equivalence/float32", "equivalence/bfloat16", "autograd/no-grad"])
    assert [r.property for r in report.results] == ["equivalence/bfloat16", "autograd/no-grad"]
    assert report.passed and report.not_checked["float32"].startswith("float32 not asked for")
    assert {e.dtype for r in report.results for e in r.worst_errors} == {"bfloat16"}


# --- the report ---------------------------------------------------------------------------------------


def property_report(status: str, cases: int = 10, **fields) -> PropertyReport:
    values = dict(implementation="pkg:fn", property="equivalence/float32", status=status, cases_checked=cases,
                  cases_refused=0, detail="", traceback="", reproducer="", seconds=1.0, worst_errors=())
    return PropertyReport(**{**values, **fields})


def test_raise_for_failures_lists_each_failure_with_its_reproducer_and_traceback():
    failure = property_report("fail", detail="loss: 1 of 1 elements beyond the allowed error",
                              reproducer="python -m harness check --impl pkg:fn --case 'N=7'",
                              traceback="Traceback (most recent call last):\n  File \"kernel.py\", line 3")
    report = CheckReport("pkg:fn", "ci", "cpu", (property_report("pass"), failure), {})
    assert not report.passed and report.failures == (failure,) and report["equivalence/float32"] is report.results[0]
    with pytest.raises(AssertionError) as raised:
        report.raise_for_failures()
    assert str(raised.value).splitlines() == [
        "1 of 2 properties failed on pkg:fn (profile ci, cpu):",
        "- equivalence/float32: loss: 1 of 1 elements beyond the allowed error",
        "  reproduce: python -m harness check --impl pkg:fn --case 'N=7'",
        "    Traceback (most recent call last):",
        "      File \"kernel.py\", line 3",
    ]


def test_a_report_that_checked_nothing_does_not_pass():
    unsupported = property_report("unsupported", cases=0, detail="pkg:fn: NotImplementedError")
    report = CheckReport("pkg:fn", "ci", "cpu", (unsupported,), {})
    assert not report.failures and not report.passed
    with pytest.raises(AssertionError, match="nothing was checked on pkg:fn: equivalence/float32: pkg:fn: Not"):
        report.raise_for_failures()


# --- reference, cases, make_inputs ------------------------------------------------------------------


def test_reference_takes_a_spec_or_its_fields_and_is_the_gates_reference():
    inputs = make_inputs("N=9,D=6,V=33,dtype=float32,reduction=sum,bias=1,softcap=5.0,ignored=some,seed=3")
    by_keywords = reference(inputs.hidden, inputs.weight, inputs.labels, bias=inputs.bias, reduction="sum", softcap=5.0)
    expected = reference_result(inputs.hidden, inputs.weight, inputs.labels, LossSpec(reduction="sum", softcap=5.0),
                                inputs.bias)
    assert torch.equal(by_keywords.loss, expected.loss) and torch.equal(by_keywords.grad_bias, expected.grad_bias)
    assert torch.equal(reference(inputs.hidden, inputs.weight, inputs.labels, inputs.spec, bias=inputs.bias).loss,
                       expected.loss)


@pytest.mark.parametrize("call, message", [
    (lambda h, w, y: reference(h, w, y, LossSpec(), softcap=5.0), "as a LossSpec or as keywords, not both"),
    (lambda h, w, y: reference(h, w, y, colour="red"), "unknown loss option"),
    (lambda h, w, y: reference(h, w[:, :2], y), "hidden size mismatch"),
])
def test_reference_refuses_bad_input_in_one_line(call, message):
    with pytest.raises(HarnessError, match=message):
        call(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 4]))


def test_cases_draw_only_the_dtypes_reductions_and_options_asked_for():
    seen = []

    @settings(max_examples=25, deadline=None, database=None)
    @given(cases(dtypes=["bfloat16"], reductions=["sum"], options=["softcap"], flat=True))
    def draw(case):
        seen.append(case)

    draw()
    assert {c.dtype for c in seen} == {"bfloat16"} and {c.reduction for c in seen} == {"sum"}
    assert set().union(*(c.options_used() for c in seen)) <= {"softcap"}
    assert all(len(c.tokens) == 1 for c in seen)


@pytest.mark.parametrize("options, message", [
    ({"dtypes": ["float64"]}, "unknown dtype 'float64'"),
    ({"options": ["dropout"]}, "unknown option 'dropout'"),
    ({"reductions": []}, "no reduction given; expected some of mean, sum, none"),
])
def test_cases_refuse_unknown_names_in_one_line(options, message):
    with pytest.raises(HarnessError, match=message):
        cases(**options)


def test_make_inputs_takes_a_case_or_a_reproducers_case_line():
    line = "B=2,T=3,D=4,V=17,dtype=float16,reduction=none,seed=5"
    from_line, from_case = make_inputs(line), make_inputs(harness.Case.build(tokens=(2, 3), dim=4, vocab=17,
                                                                              dtype="float16", reduction="none", seed=5))
    assert torch.equal(from_line.hidden, from_case.hidden) and from_line.hidden.shape == (2, 3, 4)
    assert from_line.upstream.shape == (2, 3)
