"""The behaviour matrix records what an implementation does where implementations may differ.

Nothing here is judged; the tests pin how behaviour is described, and that a crash or a hang on
one edge case is recorded as such without losing the others (each implementation's edge cases
run in a child process).
"""

import pytest
import torch

from harness.check import behaviour as behaviour_module
from harness.check.behaviour import EDGE_CASE_IDS, EDGE_CASES, probe, run_behaviour
from harness import check
from harness.isolation import ItemOutcome, Limits
from harness.registry import resolve

EDGES = {e.id: e for e in EDGE_CASES}


def test_torch_eager_gives_nan_for_0_over_0_and_refuses_out_of_range_labels():
    eager = resolve("torch-eager")
    assert probe(eager, EDGES["all-ignored-mean"], "cpu")[0] == "loss nan; grads 0"
    assert probe(eager, EDGES["label-equals-vocab"], "cpu")[0] == "error (IndexError)"
    assert probe(eager, EDGES["nan-in-hidden"], "cpu")[0] == "loss nan; grads nan"


def test_float16_logits_beyond_its_range_are_described_against_the_float64_reference():
    behaviour, detail = probe(resolve("torch-eager"), EDGES["float16-logit-overflow"], "cpu")
    assert behaviour == "loss nan; grads nan"
    assert "reference 18558.9" in detail  # the float64 reference is finite


def test_an_empty_batch_is_described_with_the_references_value_beside_it():
    assert probe(resolve("chunked"), EDGES["empty-batch"], "cpu") == ("loss nan; grads 0", "loss nan, reference nan")


@pytest.mark.slow
def test_a_crash_on_one_edge_case_is_recorded_where_it_happened_and_the_others_still_run():
    rows = {r.edge_case: r for r in run_behaviour("tests.broken_impls:aborts_the_process", "cpu")}
    assert set(rows) == set(EDGE_CASE_IDS)
    assert rows["label-equals-vocab"].behaviour == "crash"
    assert rows["label-negative"].behaviour == "crash"
    assert rows["label-negative"].detail.startswith("killed by SIGABRT at tests/broken_impls.py:")
    assert rows["nan-in-hidden"].behaviour == "loss nan; grads nan"
    assert rows["inf-in-hidden"].behaviour == probe(resolve("torch-eager"), EDGES["inf-in-hidden"], "cpu")[0]


def test_an_edge_case_past_its_time_limit_is_recorded_as_a_timeout_and_the_others_still_run(monkeypatch):
    """The matrix's side of a hang: ``harness.isolation`` stops the child at the limit
    (``tests/test_isolation.py``); here a stand-in for it reports that at once."""
    def one_hangs(module, args, items, *, limits, env, cancel):
        assert module == "harness.check.behaviour" and items == list(EDGE_CASE_IDS)
        for item in items:
            if item == "inf-in-hidden":
                yield ItemOutcome(item, None, "timeout", f"exceeded the time limit of {limits.timeout_s:g} s")
            else:
                yield ItemOutcome(item, {"item": item, "behaviour": "loss finite = reference; grads finite",
                                         "detail": "as the reference"})

    monkeypatch.setattr(behaviour_module, "run_items", one_hangs)
    rows = {r.edge_case: r for r in run_behaviour("torch-eager", "cpu", limits=Limits(timeout_s=20))}
    assert set(rows) == set(EDGE_CASE_IDS)
    assert (rows["inf-in-hidden"].behaviour, rows["inf-in-hidden"].detail) == ("timeout",
                                                                               "exceeded the time limit of 20 s")
    assert rows["nan-in-hidden"].behaviour == "loss finite = reference; grads finite"


@pytest.mark.slow
def test_after_an_edge_case_that_poisons_the_cuda_context_the_others_run_in_a_fresh_process():
    """The out-of-range label raises an illegal memory access, after which every call in that
    process would raise it too; the edge cases after it are still described as they are."""
    rows = {r.edge_case: r for r in run_behaviour("tests.broken_impls:loses_its_cuda_context", "cpu")}
    assert rows["label-equals-vocab"].behaviour == "error (RuntimeError)"
    assert "illegal memory access" in rows["label-equals-vocab"].detail
    assert rows["nan-in-hidden"].behaviour == "loss nan; grads nan"
    assert rows["empty-batch"].behaviour == probe(resolve("torch-eager"), EDGES["empty-batch"], "cpu")[0]


@pytest.mark.slow
def test_a_kernel_that_kills_its_process_fails_the_property_it_crashed_in_with_a_reproducer():
    report = check("tests.broken_impls:aborts_the_process", properties=["equivalence/float32", "equivalence/bfloat16"])
    assert [r.status for r in report.results] == ["fail", "fail"]
    for crashed in report.results:  # each in its own process
        assert crashed.detail.startswith("crash: killed by SIGABRT at tests/broken_impls.py:"), crashed.detail
        assert "Fatal Python error: Aborted" in crashed.traceback  # the end of the process's output
    assert "--case N=1,D=1,V=2,dtype=float32" in report["equivalence/float32"].reproducer


class OnTheGpu(torch.Tensor):
    """Stands in for a GPU tensor on this CPU machine: only ``.cpu()`` gives a plain tensor."""

    def cpu(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor).clone()


def test_the_reference_is_computed_from_cpu_copies_whatever_the_implementations_device(monkeypatch):
    """On a GPU the implementation gets CUDA tensors and the float64 reference their CPU copies (a
    reference on the GPU would meet CPU labels, and would not be the reference)."""
    from harness.check import behaviour

    def on_the_gpu(device):
        inputs = EDGES["nan-in-hidden"].build(device)
        return behaviour._edge_inputs(inputs.hidden.as_subclass(OnTheGpu), inputs.weight.as_subclass(OnTheGpu),
                                      inputs.labels.as_subclass(OnTheGpu), inputs.spec)

    seen = []
    reference_loss = behaviour.reference_loss

    def spy(*tensors_and_spec):
        seen.extend(type(t) for t in tensors_and_spec[:3])
        return reference_loss(*tensors_and_spec)

    monkeypatch.setattr(behaviour, "reference_loss", spy)
    edge = behaviour.EdgeCase("gpu-inputs", "the inputs of nan-in-hidden, on a (stand-in) GPU", on_the_gpu)
    behaviour_text, detail = probe(resolve("torch-eager"), edge, "cpu")
    assert seen == [torch.Tensor] * 3
    assert behaviour_text == "loss nan; grads nan" and "reference nan" in detail
