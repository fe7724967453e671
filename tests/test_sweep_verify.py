"""The sweep checks what it times: each mode's result against torch-eager's on the same inputs.

In-process, on tiny CPU cases: a quick wrong answer and a cached answer are caught, correct
implementations pass in every dtype, and the chunked torch-eager reference is torch-eager.
"""

from __future__ import annotations

import pytest
import torch

from harness.case import Case, make_inputs
from harness.registry import resolve
from harness.sweep import verify
from harness.sweep.measure import TimingSettings, measure_mode, mode_function

QUICK = TimingSettings(measure_time=0.01, min_repeats=2)
PLUGINS = "tests.sweep_plugins"


def tiny_inputs(**changes):
    return make_inputs(Case(tokens=(32,), dim=16, vocab=256).replace(**changes), device="cpu", draw_on_device=True)


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_a_quick_wrong_loss_is_caught(mode):
    measured = measure_mode(resolve(f"{PLUGINS}:WrongFast"), tiny_inputs(), mode, "cpu", QUICK)
    assert not measured.verdict.ok
    assert measured.verdict.reason.startswith("loss ") and "vs torch-eager's" in measured.verdict.reason


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_an_answer_cached_on_the_first_call_is_caught_once_the_inputs_change_in_place(mode):
    measured = measure_mode(resolve(f"{PLUGINS}:CachesFirstAnswer"), tiny_inputs(), mode, "cpu", QUICK)
    assert not measured.verdict.ok
    assert "on inputs changed in place" in measured.verdict.reason


def test_a_cached_answer_is_caught_even_where_the_change_is_within_the_allowance():
    """Bit for bit the same result after the inputs changed, where torch-eager's moved."""
    inputs = tiny_inputs()
    before = verify.Result(torch.tensor(5.0), {})
    after = verify.Result(torch.tensor(5.0), {})
    moved = verify.Reference(torch.tensor(5.001, dtype=torch.float64), torch.tensor(9.0), {})
    same = verify.Reference(torch.tensor(5.0, dtype=torch.float64), torch.tensor(9.0), {})
    assert not verify.cached_answer(before, after, same, moved).ok
    assert verify.cached_answer(before, after, same, same).ok, "torch-eager did not move either"
    del inputs


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("logits", ["random", "peaked"])
def test_correct_implementations_pass_in_every_dtype(dtype, logits):
    for name in ("torch-eager", "chunked"):
        measured = measure_mode(resolve(name), tiny_inputs(dtype=dtype, logits=logits), "forward_backward", "cpu",
                                QUICK)
        assert measured.verdict.ok, f"{name}: {measured.verdict.reason}"


@pytest.mark.parametrize("options", [
    {}, {"reduction": "sum"}, {"reduction": "none"}, {"bias": True, "softcap": 20.0},
    {"class_weight": True, "label_smoothing": 0.1, "z_loss": 1e-3, "ignored": "some"},
    {"norm": "rmsnorm", "loss_div_factor": 3.0},
], ids=lambda options: ",".join(options) or "plain")
def test_the_reference_in_chunks_of_tokens_is_torch_eager(options, monkeypatch):
    monkeypatch.setattr(verify, "CHUNK_LOGIT_BYTES", 4 * 256 * 5)  # chunks of 5 tokens, the last one of 2
    inputs = tiny_inputs(**options)
    eager = resolve("torch-eager")
    output = mode_function(eager, inputs, "forward_backward")()
    whole = verify.result_of(output, inputs, "forward_backward")
    chunked = verify.reference(eager, inputs, gradients=True)
    torch.testing.assert_close(chunked.loss, whole.loss.double(), rtol=1e-6, atol=1e-6)
    assert set(chunked.grads) == set(whole.grads)
    for name, grad in chunked.grads.items():
        torch.testing.assert_close(grad, whole.grads[name].float(), rtol=1e-5, atol=1e-7)


def test_changed_inputs_are_restored_exactly():
    inputs = tiny_inputs()
    before = inputs.hidden.detach().clone()
    with verify.changed_inputs(inputs):
        assert not torch.equal(inputs.hidden, before)
    assert torch.equal(inputs.hidden, before)


def test_the_allowance_is_in_roundoffs_of_the_dtype_plus_the_float32_summation_floor():
    float32 = verify.relative_allowance(torch.float32, dim=16, vocab=256, tokens=32)
    bfloat16 = verify.relative_allowance(torch.bfloat16, dim=16, vocab=256, tokens=32)
    floor = 2 * verify.SUM_ORDER * 2**-24 * (4 + 16 + 16 + 32**0.5)
    assert float32 == pytest.approx(2 * verify.SIDE_ROUNDOFFS * 2**-24 + floor)
    assert bfloat16 == pytest.approx(2 * verify.SIDE_ROUNDOFFS * 2**-8 + floor)
