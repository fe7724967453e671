"""The project's own ``chunked`` implementation: what its chunking promises, beyond the gate's properties.

The gate (``python -m harness check --impl chunked``) compares it with the float64 reference on
drawn cases; these are the fixed cases of its own design: the chunk-size budget, the NaN of an
empty batch, the tokens whose label probability underflows float32, and its two float32 CPU
matmul paths (oneDNN in blocks of classes, and torch.mm, the path of a torch without oneDNN).
"""

from __future__ import annotations

import math
import os
import threading

import pytest
import torch

import implementations.chunked as chunked_module
from harness.onednn import onednn_linear
from harness.registry import resolve
from harness.semantics import reference_result
from harness.spec import LossSpec
from implementations.chunked import (
    CHUNK_BUDGET_FRACTION,
    MIN_CHUNK_BUFFER_BYTES,
    MIN_CHUNK_TOKENS,
    Chunked,
    buffer_bytes_per_token,
    default_chunk_size,
    lower_bound_bytes,
    onednn_vocab_block,
)

SHAPES = [  # (N, V, D): issue 10's floor case and the CPU preset's shapes
    (4096, 32000, 512),
    (64, 2048, 256),
    (1024, 128256, 64),
    (2048, 16384, 256),
    (256, 16384, 128),
    (1000, 50257, 768),
]
SPECS = [LossSpec(), LossSpec(softcap=30.0), LossSpec(label_smoothing=0.1, z_loss_multiplier=1e-4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("spec", SPECS, ids=["plain", "softcap", "smoothing+z"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"N={n},V={v},D={d}" for n, v, d in SHAPES])
def test_chunk_buffers_stay_within_the_budget_and_chunks_are_even(shape, spec, dtype):
    tokens, vocab, dim = shape
    rows = default_chunk_size(tokens, vocab, dim, dtype=dtype, spec=spec, has_bias=False, want_grad=True)
    buffers = rows * buffer_bytes_per_token(vocab, dtype, spec, want_grad=True)
    budget = max(
        CHUNK_BUDGET_FRACTION * lower_bound_bytes(tokens, vocab, dim, dtype.itemsize, has_bias=False),
        MIN_CHUNK_BUFFER_BYTES,
    )
    assert 1 <= rows <= tokens
    assert buffers <= budget or rows <= MIN_CHUNK_TOKENS
    chunks = math.ceil(tokens / rows)
    assert tokens - (chunks - 1) * rows >= rows - chunks + 1  # even chunks: the last is no stub


def test_the_floor_case_runs_in_eight_chunks_of_512_tokens_or_nine_beside_onednns_temporaries():
    def rows(workspace):
        return default_chunk_size(4096, 32000, 512, dtype=torch.float32, spec=LossSpec(), has_bias=False,
                                  want_grad=True, workspace_bytes=workspace)

    assert rows(0) == 512
    assert rows(chunked_module.ONEDNN_WORKSPACE_BYTES) == 456


def test_a_softcap_halves_the_chunk_for_its_chain_rule_buffer():
    plain = default_chunk_size(4096, 32000, 512, dtype=torch.float32, spec=LossSpec(), has_bias=False, want_grad=True)
    capped = default_chunk_size(
        4096, 32000, 512, dtype=torch.float32, spec=LossSpec(softcap=30.0), has_bias=False, want_grad=True
    )
    assert capped < plain


@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_an_empty_batch_with_mean_is_nan_as_the_reference(z_loss):
    hidden = torch.zeros(0, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long)
    spec = LossSpec(z_loss_multiplier=z_loss)
    out = resolve("chunked").loss(hidden, weight, labels, spec)
    ref = reference_result(hidden, weight, labels, spec)
    assert torch.isnan(ref.loss) and torch.isnan(out.loss)
    assert torch.isnan(out.z_loss) == torch.isnan(ref.z_loss)
    out.loss.backward()
    assert hidden.grad.shape == (0, 8) and torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "z_loss_multiplier": 1e-3, "softcap": 500.0}],
                         ids=["plain", "options"])
def test_tokens_whose_label_probability_underflows_match_the_reference(reduction, options):
    """Logits in the hundreds: p at the label underflows float32, so logsumexp is recomputed for those tokens."""
    gen = torch.Generator().manual_seed(3)
    hidden = (torch.randn(20, 8, generator=gen) * 30).requires_grad_()
    weight = torch.randn(50, 8, generator=gen).requires_grad_()
    labels = torch.randint(0, 50, (20,), generator=gen)
    labels[3] = -100
    spec = LossSpec(reduction=reduction, **options)
    out = resolve("chunked").with_chunk_size(6).loss(hidden, weight, labels, spec)
    upstream = torch.rand(out.loss.shape, generator=gen) if reduction == "none" else torch.tensor(1.0)
    (out.loss * upstream).sum().backward()
    ref = reference_result(hidden, weight, labels, spec, grad_output=upstream.double())
    assert bool((ref.loss.abs() > 100).any())  # the case does reach the fallback
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(hidden.grad.double(), ref.grad_hidden, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weight.grad.double(), ref.grad_weight, rtol=1e-4, atol=1e-5)


def test_a_scaled_loss_leaves_a_retained_graph_intact():
    """backward hands its saved gradients over unscaled only when the upstream gradient is 1."""
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(9, 6, generator=gen, requires_grad=True)
    weight = torch.randn(33, 6, generator=gen, requires_grad=True)
    labels = torch.randint(0, 33, (9,), generator=gen)
    loss = resolve("chunked").loss(hidden, weight, labels).loss
    loss.backward(retain_graph=True)
    once = weight.grad.clone()
    (3 * loss).backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(weight.grad, 5 * once)


def test_onednn_is_found_where_this_torch_has_it():
    """A torch that renames or changes its oneDNN linear would quietly halve chunked's CPU speed."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this build of torch has no oneDNN")
    assert onednn_linear() is not None


def test_onednn_blocks_are_multiples_of_64_classes_with_temporaries_near_their_size():
    assert onednn_vocab_block(64, 256) == chunked_module.ONEDNN_BLOCK_BYTES // (4 * 256)
    assert onednn_vocab_block(512, 512) % 64 == 0
    assert onednn_vocab_block(10**6, 8) == 64


CPU_PATH_SPECS = {
    "plain": {},
    "softcap+scale": {"softcap": 5.0, "logit_scale": 0.5},
    "smoothing+z+weights": {"label_smoothing": 0.1, "z_loss_multiplier": 1e-3, "class_weight": True},
}


@pytest.mark.parametrize("grads", [("hidden", "weight", "bias"), ("hidden",), ("weight",)], ids="+".join)
@pytest.mark.parametrize("options", CPU_PATH_SPECS.values(), ids=CPU_PATH_SPECS.keys())
@pytest.mark.parametrize("chunk", [5, 7, 40], ids=["chunks<=D", "chunks>D", "one-chunk"])
@pytest.mark.parametrize("block_bytes", [1, chunked_module.ONEDNN_BLOCK_BYTES], ids=["64-class-blocks", "one-block"])
@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "torch.mm"])
def test_both_cpu_matmul_paths_match_the_reference_across_blocks_and_chunks(onednn, block_bytes, chunk, options,
                                                                            grads, monkeypatch):
    """oneDNN's blocks of 64 classes over V = 257 (four and a 1-class tail) or one block, token
    chunks as wide as D = 6 or wider (the weight gradient's two paths), several chunks or one, a
    strided bias."""
    monkeypatch.setattr(chunked_module, "ONEDNN_BLOCK_BYTES", block_bytes)
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(40, 6, generator=gen) * 2
    weight = torch.randn(257, 6, generator=gen)
    bias = torch.randn(257, 2, generator=gen)[:, 0]  # strided
    labels = torch.randint(0, 257, (40,), generator=gen)
    labels[[0, 1, 2]] = torch.tensor([0, 256, -100])
    options = dict(options)
    if options.pop("class_weight", False):
        options["class_weight"] = torch.rand(257, generator=gen) + 0.5
    spec = LossSpec(**options)
    inputs = {"hidden": hidden, "weight": weight, "bias": bias}
    for name in grads:
        inputs[name].requires_grad_()
    out = Chunked(chunk_size=chunk, onednn=onednn).loss(hidden, weight, labels, spec, bias=bias)
    out.loss.backward()
    ref = reference_result(hidden, weight, labels, spec, bias)
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-5, atol=1e-5)
    expected = {"hidden": ref.grad_hidden, "weight": ref.grad_weight, "bias": ref.grad_bias}
    for name, tensor in inputs.items():
        if name in grads:
            torch.testing.assert_close(tensor.grad.double(), expected[name], rtol=1e-4, atol=1e-5, msg=name)
        else:
            assert tensor.grad is None, name


WORKER_SPECS = {
    "plain": {},
    "all-options": {"label_smoothing": 0.1, "z_loss_multiplier": 1e-3, "softcap": 5.0, "logit_scale": 0.5,
                    "class_weight": True},
}


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("options", WORKER_SPECS.values(), ids=WORKER_SPECS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_worker_threads_sharing_a_chunk_match_the_single_thread_path(dtype, options, reduction):
    """Three workers on chunks of 100 tokens (three spans of rows each, then spans of classes) give
    what one thread gives, up to float32 summation order; in float32 both match the reference."""
    gen = torch.Generator().manual_seed(12)
    hidden = (torch.randn(300, 24, generator=gen) * 2).to(dtype).requires_grad_()
    weight = torch.randn(1000, 24, generator=gen).to(dtype).requires_grad_()
    bias = torch.randn(1000, generator=gen).to(dtype).requires_grad_()
    labels = torch.randint(0, 1000, (300,), generator=gen)
    labels[100:140] = -100  # a run of padding across a span of rows
    options = dict(options)
    if options.pop("class_weight", False):
        options["class_weight"] = torch.rand(1000, generator=gen) + 0.5
    spec = LossSpec(reduction=reduction, **options)
    upstream = torch.rand(300, generator=gen) if reduction == "none" else torch.tensor(1.0)
    results = {}
    for workers in (1, 3):
        hidden.grad = weight.grad = bias.grad = None
        out = Chunked(chunk_size=100, workers=workers).loss(hidden, weight, labels, spec, bias=bias)
        (out.loss.float() * upstream).sum().backward()
        results[workers] = (out.loss.detach().clone(), hidden.grad, weight.grad, bias.grad)
    ref = reference_result(hidden, weight, labels, spec, bias, grad_output=upstream.double())
    for name, one, three, expected in zip(["loss", "hidden", "weight", "bias"], results[1], results[3],
                                          [ref.loss, ref.grad_hidden, ref.grad_weight, ref.grad_bias]):
        torch.testing.assert_close(three.double(), one.double(), rtol=1e-5, atol=1e-6, msg=name)
        if dtype == torch.float32:  # the gate judges the low-precision roundings against their own terms
            torch.testing.assert_close(three.double(), expected, rtol=1e-4, atol=1e-5, msg=name)


def test_worker_threads_leave_the_callers_thread_count_and_grad_mode_alone():
    threads = torch.get_num_threads()
    hidden = torch.randn(200, 8, requires_grad=True)
    weight = torch.randn(300, 8, requires_grad=True)
    labels = torch.randint(0, 300, (200,))
    Chunked(chunk_size=64, workers=2).loss(hidden, weight, labels).loss.backward()
    assert torch.get_num_threads() == threads and torch.is_grad_enabled()


def test_a_cpu_pass_has_a_worker_per_intra_op_thread_where_openmp_can_be_set_per_thread():
    threads = torch.get_num_threads()
    expected = threads if chunked_module._openmp() is not None else 1
    assert chunked_module.cpu_workers(torch.device("cpu")) == expected
    try:
        torch.set_num_threads(1)
        assert chunked_module.cpu_workers(torch.device("cpu")) == 1
    finally:
        torch.set_num_threads(threads)
    assert chunked_module.cpu_workers(torch.device("meta")) == 1


@pytest.mark.skipif(chunked_module._openmp() is None, reason="no per-thread OpenMP control here")
def test_each_worker_runs_its_ops_on_one_thread_even_after_set_num_threads():
    """torch.set_num_threads makes torch set each new thread's count on its first op: a worker's
    limit of one must come after that, or two workers would each start a team of threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    seen = []
    with chunked_module._Workers(2) as pool:
        pool.map(lambda: seen.append(torch.get_num_threads()), [()] * 4)
    assert seen == [1, 1, 1, 1]


@pytest.mark.skipif(chunked_module._openmp() is None or not hasattr(os, "sched_getaffinity"),
                    reason="no per-thread OpenMP control or CPU affinity here")
def test_workers_are_pinned_one_per_cpu_only_when_there_is_a_worker_for_every_cpu():
    """Pinned, two workers can never be put on one CPU beside another busy process; with fewer
    workers than CPUs (hyperthreads of one core, perhaps) or more, the scheduler places them."""
    cpus = sorted(os.sched_getaffinity(0))
    for count in {len(cpus), len(cpus) + 1} - {1}:
        seen, all_started = {}, threading.Barrier(count, timeout=30)

        def note_affinity() -> None:  # each task waits for the others: every worker takes one
            seen[threading.get_ident()] = os.sched_getaffinity(0)
            all_started.wait()
        with chunked_module._Workers(count) as pool:
            pool.map(note_affinity, [()] * count)
        assert len(seen) == count
        if count == len(cpus):
            assert sorted(min(affinity) for affinity in seen.values()) == cpus
            assert all(len(affinity) == 1 for affinity in seen.values())
        else:
            assert all(affinity == set(cpus) for affinity in seen.values())
    assert sorted(os.sched_getaffinity(0)) == cpus  # the caller's own affinity is left alone
