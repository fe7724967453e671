"""The vocab-parallel (``distributed``) implementations: shards, the gate's view of them, the sweep's.

They run P = 2 or 3 gloo rank processes on this machine (P = 2 for an even token count, 3 for an
odd one); the pools are started once per test process and closed at its exit. What they compute is
the gate's to judge (``python -m harness check`` over the built-ins); these tests pin the sharding,
what the gate sees of a wrong shard, the refusals and the sweep's per-rank figures.
"""

from __future__ import annotations

import pytest
import torch

from harness.case import Case, parse_case
from harness.check.run_property import FAIL, Target, run_case
from harness.check.properties import find_property
from harness.errors import UnsupportedCase
from harness.registry import resolve
from harness.spec import ORIGINAL_OPTIONS, LossSpec
from harness.sweep.cases import SweepCase
from harness.sweep.measure import TimingSettings
from harness.sweep.runner import SweepSettings, run_job
from implementations.distributed import world_size_for
from implementations.vocab_parallel.shards import split_vocab


def _sizes(vocab, world_size, how):
    return [s.size for s in split_vocab(vocab, world_size, how)]


def test_shards_are_contiguous_and_cover_the_vocabulary_under_both_conventions():
    assert _sizes(7, 3, "balanced") == [3, 2, 2]
    assert _sizes(7, 3, "ceil") == [3, 3, 1]
    assert _sizes(4, 3, "ceil") == [2, 2, 0]  # DTensor's split leaves the last rank empty
    for how in ("balanced", "ceil"):
        shards = split_vocab(4097, 3, how)
        assert shards[0].start == 0 and shards[-1].stop == 4097
        assert all(a.stop == b.start for a, b in zip(shards, shards[1:]))
    with pytest.raises(ValueError, match="unknown vocabulary split"):
        split_vocab(7, 2, "round-robin")


def test_both_world_sizes_occur_chosen_by_the_token_count():
    assert [world_size_for(n) for n in (1, 2, 7, 64)] == [3, 2, 3, 2]


@pytest.mark.slow
def test_the_gate_fails_a_vocab_parallel_loss_that_is_wrong_on_one_shard():
    """The gate compares the gathered gradients: a rank whose weight rows came back scaled shows."""
    from implementations.distributed import ChunkedVocabParallel

    class OneShardWrong(ChunkedVocabParallel):
        name = "one-shard-wrong"

        def _run(self, *args):
            loss, z_loss, (grad_h, grad_w, grad_b) = super()._run(*args)
            if grad_w is not None:
                grad_w = grad_w.clone()
                grad_w[-1] *= 1.01  # the last class: the last rank's rows
            return loss, z_loss, (grad_h, grad_w, grad_b)

    case = parse_case("N=7,D=5,V=13,seed=1")
    result = run_case(Target("one-shard-wrong", OneShardWrong()), find_property("equivalence/float32"), case, "cpu")
    assert result.status == FAIL and "grad_weight" in result.detail


@pytest.mark.slow
def test_a_label_no_rank_owns_raises_on_every_rank_instead_of_a_silent_loss():
    impl = resolve("chunked-vocab-parallel")
    hidden, weight = torch.randn(4, 3), torch.randn(9, 3)
    with pytest.raises(IndexError, match="label 9 at position 2 is outside every rank's vocabulary shard"):
        impl.loss(hidden, weight, torch.tensor([0, 1, 9, 2]), LossSpec(), validate=False)
    # The pool is still in step: the next call works.
    assert torch.isfinite(impl.loss(hidden, weight, torch.tensor([0, 1, 8, 2])).loss)


@pytest.mark.slow
def test_dtensor_refuses_a_split_that_leaves_a_rank_without_classes_with_the_reason():
    impl = resolve("dtensor-loss-parallel")
    with pytest.raises(UnsupportedCase, match="loss_parallel.. fails on a rank that holds no class"):
        impl.loss(torch.randn(3, 2), torch.randn(4, 2), torch.tensor([0, 1, 3]))  # P = 3, shards 2, 2, 0


def test_dtensor_declares_label_smoothing_unsupported_with_the_reason():
    reasons = resolve("dtensor-loss-parallel").capabilities("cpu").reasons()
    # Of the options it lists (those of the first contract), label smoothing is the one it lacks.
    assert {option for option in reasons if option in ORIGINAL_OPTIONS} == {"label_smoothing"}
    assert "loss_parallel" in reasons["label_smoothing"]


@pytest.mark.slow
def test_megatron_leaves_out_an_ignored_token_whose_smoothed_loss_is_inf():
    """Megatron's smoothing takes the log of the probabilities, +inf where one underflows (a known
    failure); an ignored token's +inf is left out of the loss, not multiplied by 0 into NaN. The rest
    is Megatron's shard-local smoothing (P = 2, K = 2), with PyTorch's smoothing converted."""
    from implementations.vocab_parallel.megatron_known import megatron_loss_model

    impl = resolve("megatron-vocab-parallel")
    if not impl.availability().available:
        pytest.skip(impl.availability().detail)
    hidden = torch.tensor([[0.01], [1.0]], requires_grad=True)
    weight = torch.tensor([[0.0], [200.0], [1.0], [2.0]], requires_grad=True)  # token 1: logits 0 and 200 on rank 0
    labels = torch.tensor([1, -100])
    spec = LossSpec(label_smoothing=0.1)
    loss = impl.loss(hidden, weight, labels, spec).loss
    loss.backward()
    expected = megatron_loss_model(hidden.double(), weight.double(), labels, spec, None).loss
    assert torch.isfinite(loss) and float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()


@pytest.mark.slow
def test_torchrun_sweep_job_records_time_per_rank_memory_and_bytes_communicated():
    """P = 3 ranks under torchrun; the chunked loss's collectives are known exactly: the class-weight
    and owner all-reduce (2 (N + 1) floats), per chunk the max (N) and the packed sums (3 N), and the
    hidden-state gradient (N x D), all float32."""
    tokens, hidden = 24, 16
    case = SweepCase("vp", "vp", Case(tokens=(tokens,), dim=hidden, vocab=1001))
    settings = SweepSettings(modes=("forward", "forward_backward", "backward"), device="cpu",
                             timing=TimingSettings(measure_time=0.05, min_repeats=2), timeout_s=300,
                             max_memory_bytes=None, world_size=3)
    job = {"kind": "case", "case": case.to_json(), "implementation": "chunked-vocab-parallel",
           "modes": list(settings.modes), "device": "cpu", "timing": settings.timing.to_json()}
    outcome = run_job(job, settings, reference="chunked-vocab-parallel")
    results = {m["mode"]: m for m in outcome.messages if m.get("event") == "result"}
    assert outcome.failure is None, outcome.log_tail[-2000:]
    assert results["backward"]["status"] == "unsupported"
    forward, both = results["forward"]["metrics"], results["forward_backward"]["metrics"]
    assert forward["world_size"] == both["world_size"] == 3
    assert forward["comm_bytes"] == 4 * (2 * (tokens + 1) + 4 * tokens)
    assert both["comm_bytes"] == forward["comm_bytes"] + 4 * tokens * hidden
    assert both["time_p20"] <= both["time_median"] <= both["time_p80"]
    per_rank = {metric: value for metric, value in both.items() if metric.startswith("peak_memory_rank")}
    assert set(per_rank) == {f"peak_memory_rank{rank}" for rank in range(3)}
    assert both["peak_memory"] == max(per_rank.values())
