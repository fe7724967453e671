"""What one measurement records (in-process, on tiny CPU cases), and how results become rows."""

from __future__ import annotations

import pytest
import torch

from harness.errors import HarnessError, UnsupportedCase
from harness.isolation import ChildOutcome, classify
from harness.registry import resolve
from harness.results import DISTRIBUTED_METRICS, METRICS, ROW_COLUMNS, RowWriter, read_rows
from harness.case import Case, make_inputs
from harness.sweep.cases import SweepCase
from harness.sweep.distributed import Ranks, ranks_from_environment, shard, visible_device_for
from harness.sweep.measure import MIN_CALL_SECONDS, TimingSettings, measure_mode, quantiles, repetitions, time_with_events
from harness.sweep.rows import Job, derived_metrics, job_rows, mode_results
from harness.sweep.runner import unsupported_modes

QUICK = TimingSettings(measure_time=0.01, min_repeats=2)
MEASURED = {"first_call", "time_median", "time_p20", "time_p80", "peak_memory"}


def tiny_case(**changes) -> Case:
    return Case(tokens=(64,), dim=32, vocab=512).replace(**changes)


def tiny_sweep_case(**changes) -> SweepCase:
    return SweepCase("tiny/N=64/float32", "tiny", tiny_case(**changes))


def sweep_inputs(case: Case):
    return make_inputs(case, device="cpu", draw_on_device=True)


@pytest.mark.parametrize("mode", ["forward", "forward_backward", "backward"])
def test_each_mode_records_time_spread_first_call_and_peak_memory(mode):
    """torch-eager materialises the 64 x 32768 float32 logits (8 MiB) in the forward, and their
    gradient in the backward: each mode's peak holds them."""
    case = tiny_case(vocab=32768)
    inputs = sweep_inputs(case)
    measured = measure_mode(resolve("torch-eager"), inputs, mode, "cpu", QUICK)
    metrics = measured.metrics
    assert set(metrics) == MEASURED
    assert measured.verdict.ok and not measured.note, "torch-eager matches itself, computed in chunks"
    assert 0 < metrics["time_p20"] <= metrics["time_median"] <= metrics["time_p80"]
    assert metrics["peak_memory"] >= case.logits_bytes
    assert all(t.grad is None for t in inputs.gradient_inputs.values())  # nothing left behind for the next mode


def test_peak_memory_sees_the_logits_torch_eager_materialises_and_chunked_avoids():
    """torch-eager holds all 256 x 32768 float32 logits (32 MiB); chunked, 32 tokens at a time, an eighth."""
    case = tiny_case(vocab=32768, dim=32, tokens=(256,))
    inputs = sweep_inputs(case)
    eager = measure_mode(resolve("torch-eager"), inputs, "forward_backward", "cpu", QUICK).metrics["peak_memory"]
    chunked_impl = resolve("chunked").with_chunk_size(32)
    chunked = measure_mode(chunked_impl, inputs, "forward_backward", "cpu", QUICK).metrics["peak_memory"]
    assert eager >= case.logits_bytes
    assert chunked < eager / 2


def test_backward_alone_is_unsupported_for_an_implementation_that_refuses_a_retained_graph():
    inputs = sweep_inputs(tiny_case())
    with pytest.raises(UnsupportedCase, match="retain_graph"):
        measure_mode(resolve("torch-linear-ce"), inputs, "backward", "cpu", QUICK)


def test_options_reach_the_loss_and_per_token_losses_get_a_per_token_gradient():
    case = tiny_case(reduction="none", softcap=20.0, bias=True, class_weight=True)
    inputs = sweep_inputs(case)
    assert inputs.spec.softcap == 20.0 and inputs.bias is not None and inputs.spec.class_weight is not None
    measured = measure_mode(resolve("chunked"), inputs, "forward_backward", "cpu", QUICK)
    assert set(measured.metrics) == MEASURED
    assert measured.verdict.ok, measured.verdict.reason


@pytest.mark.parametrize(
    "error, status, fatal",
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "oom", False),
        (MemoryError(), "oom", False),
        (RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1 bytes"), "oom", False),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), "crash", True),
        (UnsupportedCase("softcap: not here"), "unsupported", False),
        (HarnessError("label 9 out of range"), "error", False),
        (ValueError("something else\nsecond line"), "error", False),
    ],
)
def test_worker_classifies_exceptions_into_statuses_with_one_line_reasons(error, status, fatal):
    got_status, reason, got_fatal = classify(error)
    assert (got_status, got_fatal) == (status, fatal)
    assert "\n" not in reason


def outcome(messages, failure=None):
    return ChildOutcome(messages=messages, failure=failure, seconds=1.0, log_tail="")


def test_a_process_that_dies_mid_mode_keeps_earlier_modes_and_marks_the_rest():
    messages = [
        {"event": "started", "mode": "forward"},
        {"event": "result", "mode": "forward", "status": "ok", "metrics": {"time_median": 1.0}},
        {"event": "started", "mode": "forward_backward"},
    ]
    results = mode_results(outcome(messages, ("crash", "killed by SIGABRT")), ["forward", "forward_backward", "backward"])
    assert results["forward"]["status"] == "ok"
    assert results["forward_backward"] == {"status": "crash", "reason": "killed by SIGABRT during forward_backward"}
    assert results["backward"]["status"] == "crash"
    assert results["backward"]["reason"].startswith("not measured:")


def test_derived_figures_follow_their_definitions():
    case = tiny_case(vocab=1000, dim=10, tokens=(100,))
    metrics = {"time_median": 2.0, "peak_memory": 800_000}
    derived = derived_metrics(case, "forward_backward", metrics, {"float32": 0.5})
    assert derived["tflops"] == pytest.approx(6 * 100 * 10 * 1000 / 2e-3 / 1e12)
    assert derived["matmul_fraction"] == pytest.approx(derived["tflops"] / 0.5)
    assert derived["memory_over_lower_bound"] == pytest.approx(800_000 / ((100 * 10 + 1000 * 10) * 4))
    assert derived["memory_over_logits"] == pytest.approx(800_000 / (100 * 1000 * 4))


def test_backward_alone_gets_no_matmul_rate_because_fused_implementations_do_that_work_in_the_forward():
    derived = derived_metrics(tiny_case(), "backward", {"time_median": 1.0, "peak_memory": 10}, {"float32": 1.0})
    assert "tflops" not in derived and "matmul_fraction" not in derived
    assert "memory_over_lower_bound" in derived


def test_rows_are_tidy_one_per_metric_or_one_status_row():
    job = Job(case=tiny_sweep_case(), implementation="torch-eager", reference="torch-eager")
    results = {
        "forward": {"status": "ok", "metrics": {m: 1.0 for m in MEASURED}},
        "backward": {"status": "unsupported", "reason": "no retained graph"},
    }
    rows = job_rows(job, results, run_id="r", device="cpu", matmul_tflops={"float32": 1.0})
    assert all(set(row) <= set(ROW_COLUMNS) for row in rows)
    forward = [row for row in rows if row["mode"] == "forward"]
    assert {row["metric"] for row in forward} == set(METRICS) - set(DISTRIBUTED_METRICS)  # one process
    assert all(row["unit"] == METRICS[row["metric"]] for row in forward)
    [status] = [row for row in rows if row["mode"] == "backward"]
    assert (status["metric"], status["status"], status["reason"]) == ("status", "unsupported", "no retained graph")


def test_ranks_come_from_torchrun_environment_and_share_jobs_round_robin():
    assert ranks_from_environment({}) == Ranks()
    ranks = ranks_from_environment({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert ranks == Ranks(rank=1, world_size=2, local_rank=1)
    assert shard(list(range(5)), ranks) == [1, 3]
    assert shard(list(range(5)), Ranks(rank=0, world_size=2)) == [0, 2, 4]


def test_each_rank_sees_only_its_own_gpu():
    assert visible_device_for(1, {}) == "1"
    assert visible_device_for(1, {"CUDA_VISIBLE_DEVICES": "4,5"}) == "5"


def test_slow_calls_get_min_repeats_and_fast_ones_fill_the_measure_time():
    """A GPU call of 300 ms with 100 ms to measure gets 5 repetitions, not one: p20 and p80 stay a spread."""
    assert repetitions(call_seconds=0.3, seconds=0.1, minimum=5) == 5
    assert repetitions(call_seconds=0.001, seconds=0.1, minimum=5) == 100
    assert repetitions(call_seconds=0.0, seconds=0.1, minimum=1) == repetitions(MIN_CALL_SECONDS, 0.1, 1)  # a timer that read 0
    assert repetitions(call_seconds=0.3, seconds=0.025, minimum=0) == 1  # warm-up


class FakeEvent:
    """Stands in for torch.cuda.Event: records a step counter, so elapsed times are exact."""

    clock = [0]

    def record(self):
        self.at = self.clock[0]

    def elapsed_time(self, end):
        return float(end.at - self.at)


def test_each_timed_repetition_is_one_call_between_its_events_from_reset_gradients_after_the_flush():
    leaf = torch.zeros(2, requires_grad=True)
    seen = []

    def call():
        seen.append(leaf.grad is None)
        leaf.grad = torch.ones(2)  # a call leaves gradients behind
        FakeEvent.clock[0] += len(seen)  # the k-th call takes k steps

    flushes = []
    synchronized = []
    times = time_with_events(call, [leaf], 4, event=FakeEvent, before=lambda: flushes.append(len(seen)),
                             synchronize=lambda: synchronized.append(len(seen)))
    assert times == [1.0, 2.0, 3.0, 4.0]
    assert seen == [True] * 4 and flushes == [0, 1, 2, 3] and synchronized == [4]
    assert quantiles(times) == [2.5, pytest.approx(1.6), pytest.approx(3.4)]


def test_rows_record_the_inputs_logits_and_runs_from_before_the_column_read_as_random(tmp_path):
    job = Job(case=SweepCase("tiny/peaked/N=64/float32", "tiny", tiny_case(logits="peaked")),
              implementation="torch-eager", reference="torch-eager")
    rows = job_rows(job, {"forward": {"status": "unsupported", "reason": "r"}}, run_id="r", device="cpu",
                    matmul_tflops={})
    assert [row["logits"] for row in rows] == ["peaked"]

    old = [column for column in ROW_COLUMNS if column != "logits"]
    (tmp_path / "rows.csv").write_text(",".join(old) + "\n" + ",".join("x" if c == "case" else "" for c in old) + "\n")
    RowWriter(tmp_path / "rows.csv").append([{**rows[0], "logits": "random"}])  # --resume of an older run
    read = read_rows(tmp_path)
    assert list(read["logits"]) == ["random", "random"]
    assert list(read["case"]) == ["x", "tiny/peaked/N=64/float32"]  # appended under the file's own header


def test_a_wrong_mode_keeps_its_metrics_with_status_wrong_and_the_reason():
    job = Job(case=tiny_sweep_case(), implementation="x", reference="torch-eager")
    result = {"status": "wrong", "reason": "loss off torch-eager's", "note": "",
              "metrics": {"time_median": 1.0, "time_p20": 0.9, "time_p80": 1.1, "first_call": 3.0}}
    rows = job_rows(job, {"forward": result}, run_id="r", device="cpu", matmul_tflops={"float32": 1.0})
    assert {row["metric"] for row in rows} >= {"time_median", "tflops"}
    assert {(row["status"], row["reason"]) for row in rows} == {("wrong", "loss off torch-eager's")}


def test_the_sweep_ends_with_a_sentence_not_a_dict():
    from collections import Counter

    from harness.sweep.runner import SweepCounts

    counts = SweepCounts(jobs=35, statuses=Counter({"ok": 55, "unsupported": 11, "timeout": 1, "wrong": 2}))
    assert counts.sentence() == ("sweep: 35 jobs; of their 69 modes, 55 measured, 2 wrong (did not match "
                                 "torch-eager), 11 unsupported here and 1 timed out.")


def test_a_mode_an_implementation_has_no_such_thing_as_is_unsupported_with_its_reason():
    """torchtitan's chunked loss runs the head's backward inside its forward: no backward alone."""
    job = Job(case=SweepCase("tiny/N=64/float32", "tiny", tiny_case()), implementation="torchtitan-chunked",
              reference="torchtitan-chunked")
    [(mode, result)] = unsupported_modes(job, ["forward", "forward_backward", "backward"]).items()
    assert mode == "backward" and result["status"] == "unsupported" and "inside its forward" in result["reason"]
    eager = Job(case=job.case, implementation="torch-eager", reference="torch-eager")
    assert unsupported_modes(eager, ["forward", "backward"]) == {}
