"""The peers users run, behind the contract (issue 30): fla-core, Liger's logits and vocab-parallel
losses, torchtitan's, and the GPU-only ones (Unsloth, flash-attn, TransformerEngine, quack, Liger's
CuTe DSL path).

Quick tests pin down what each adapter hands its package: the GPU-only packages are replaced by
fakes that compute what their documentation says, so the mapping of every option is checked on
any machine. The slow ones run the CPU-runnable peers themselves (Triton's interpreter, gloo ranks).
"""

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from harness.case import make_inputs, parse_case
from harness.check.properties import find_property
from harness.check.run_property import PASS, Target, run_case
from harness.errors import UnsupportedCase
from harness.listing import describe
from harness.registry import builtin_names, resolve
from harness.semantics import head_logits, reference_loss
from harness.spec import LossSpec
from implementations.composed import composed_logits, reduce_per_token
from implementations.distributed import equal_shards_world_size

CPU_RUNNABLE = ("fla", "liger-ce", "torchtitan-chunked", "liger-vocab-parallel", "torchtitan-loss-parallel")
GPU_ONLY = ("fla-vocab-parallel", "liger-cutedsl", "unsloth-fused-ce", "flash-attn-ce", "te-parallel-ce", "quack-ce",
            "quack-linear-ce")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="states what a machine without a CUDA GPU says")


def test_every_peer_is_a_built_in():
    assert set(CPU_RUNNABLE + GPU_ONLY) <= set(builtin_names())


@no_gpu
@pytest.mark.parametrize("name", GPU_ONLY)
def test_a_gpu_only_peer_is_listed_unavailable_with_what_it_needs(name):
    row = describe(resolve(name), "cpu")
    assert row["here"] == "no"
    assert "GPU" in row["how / why not"] and "not installed" not in row["how / why not"]
    assert "Error" not in row["how / why not"].split(":")[0]  # a reason, not an import error


@no_gpu
def test_fla_vocab_parallel_says_why_gloo_cannot_run_it():
    detail = resolve("fla-vocab-parallel").availability().detail
    assert "all_gather_into_tensor" in detail and "gloo" in detail


@pytest.mark.parametrize("name", CPU_RUNNABLE)
def test_a_cpu_runnable_peer_lists_its_options_and_the_reasons_for_the_rest(name):
    impl = resolve(name)
    if not impl.availability().available:
        pytest.skip(f"{name}: {impl.availability().detail}")
    row = describe(impl, "cpu")
    assert row["here"] == "yes"
    assert "loss_div_factor" in row["options"]
    for option, why in impl.capabilities("cpu").reasons().items():
        assert why, option


def test_softcap_on_a_cpu_is_refused_by_fla_only_because_of_the_interpreter():
    from implementations.fla import fla_capabilities

    assert "softcap" not in fla_capabilities("cpu").options
    assert "interpreter" in fla_capabilities("cpu").reasons()["softcap"]
    assert "softcap" in fla_capabilities("cuda").options and "logit_scale" in fla_capabilities("cuda").options


def test_composed_logits_are_the_heads_logits_as_the_definition_transforms_them():
    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(7, 5, dtype=torch.float64), torch.randn(11, 5, dtype=torch.float64), None
    spec = LossSpec(logit_scale=0.25, softcap=5.0)
    assert torch.allclose(composed_logits(hidden, weight, bias, spec), head_logits(hidden, weight, bias, spec))
    unscaled = composed_logits(hidden, weight, bias, LossSpec(logit_scale=4.0), logit_scale=False)
    assert torch.equal(unscaled, F.linear(hidden, weight))


def test_per_token_losses_reduce_over_the_tokens_not_ignored():
    per_token = torch.tensor([1.0, 0.0, 3.0])
    labels = torch.tensor([4, -1, 2])
    assert reduce_per_token(per_token, labels, -1, "mean") == 2.0
    assert reduce_per_token(per_token, labels, -1, "sum") == 4.0
    assert reduce_per_token(per_token, labels, -1, "none") is per_token


def test_equal_shard_libraries_get_a_world_size_that_divides_the_vocabulary():
    assert equal_shards_world_size(6, 36, "x") == 2  # even N: P = 2
    assert equal_shards_world_size(7, 36, "x") == 3  # odd N: P = 3
    assert equal_shards_world_size(7, 34, "x") == 2  # 3 does not divide 34: the other one
    with pytest.raises(UnsupportedCase, match="V = 35"):
        equal_shards_world_size(6, 35, "x")


def test_torchtitan_divides_the_summed_loss_by_what_its_trainer_counts():
    from implementations.torchtitan import chunks_for, global_valid_tokens

    labels = torch.tensor([[3, -100, 5, 7]])
    assert global_valid_tokens(labels, "mean", 1.0).item() == 3 and global_valid_tokens(labels, "mean", 1.0).dtype == torch.int64
    assert global_valid_tokens(labels, "mean", 2.0).item() == 6.0
    assert global_valid_tokens(labels, "sum", 1.0) is None
    assert global_valid_tokens(labels, "sum", 3.0).item() == 3.0
    assert [chunks_for(t) for t in (1, 6, 7, 8, 12, 64)] == [1, 6, 7, 8, 6, 8]


def test_unsloth_gets_n_items_and_the_options_its_patched_models_pass():
    from implementations.unsloth import n_items, option_keywords

    labels = torch.tensor([3, -1, 5])
    assert n_items(labels, "mean", -1, 1.0) is None  # its own mean
    assert n_items(labels, "mean", -1, 2.0).item() == 4.0
    assert n_items(labels, "sum", -1, 1.0).item() == 1.0
    assert option_keywords(LossSpec(ignore_index=-1)) == {"ignore_index": -1}
    assert option_keywords(LossSpec(label_smoothing=0.1, logit_scale=2.0, softcap=30.0)) == {
        "ignore_index": -100, "label_smoothing": 0.1, "logit_scale_multiply": 2.0, "logit_softcapping": 30.0}


# --- the GPU-only adapters against fakes of their packages' documented functions ---------------


def _per_token(logits, labels, spec, scale=1.0, z=0.0):
    """Float32 cross-entropy per token of ``scale * logits`` (0 at ignored tokens) and its z-loss."""
    logits = logits.float() * scale
    ce = F.cross_entropy(logits, labels, ignore_index=spec.ignore_index, reduction="none",
                         label_smoothing=spec.label_smoothing)
    valid = labels != spec.ignore_index
    z_loss = z * torch.logsumexp(logits, -1).square() * valid
    return ce + z_loss, z_loss


def _fake_flash(logits, labels, label_smoothing, logit_scale, lse_square_scale, ignore_index):
    return _per_token(logits, labels, LossSpec(ignore_index=ignore_index, label_smoothing=label_smoothing),
                      logit_scale, lse_square_scale)


def _fake_te(inp, target, label_smoothing, reduce_loss, ignore_idx):
    spec = LossSpec(ignore_index=ignore_idx, label_smoothing=label_smoothing)
    per_token, _ = _per_token(inp.flatten(0, 1), target.flatten(), spec)
    return per_token.sum() / (target != ignore_idx).sum() if reduce_loss else per_token.view(target.shape)


def _fake_quack(x, target, weight, ignore_index, reduction):
    return F.cross_entropy(x.float(), target, weight=weight, ignore_index=ignore_index, reduction=reduction)


def _fake_quack_linear(x, weight, target, ignore_index, reduction):
    return F.cross_entropy(F.linear(x, weight).float(), target, ignore_index=ignore_index, reduction=reduction)


def _fake_unsloth(trainer, hidden, weight, bias, labels, n_items=None, shift_labels=True, ignore_index=-100,
                  label_smoothing=0.0, logit_scale_multiply=None, logit_softcapping=None):
    assert trainer is None and not shift_labels
    spec = LossSpec(ignore_index=ignore_index, label_smoothing=label_smoothing,
                    logit_scale=logit_scale_multiply or 1.0, softcap=logit_softcapping)
    per_token, _ = _per_token(head_logits(hidden, weight, bias, spec), labels, spec)
    return per_token.sum() / (n_items if n_items is not None else (labels != ignore_index).sum())


def _fake_cutedsl_dispatch(op, hidden, weight, labels, bias, class_weight, ignore_index, z, smoothing, reduction,
                           softcap, return_z_loss, *, impl):
    assert (op, impl, return_z_loss) == ("fused_linear_cross_entropy", "nvidia-cutedsl", True)
    spec = LossSpec(ignore_index=ignore_index, label_smoothing=smoothing, z_loss_multiplier=z, softcap=softcap,
                    reduction=reduction, class_weight=class_weight)
    from harness.semantics import loss_from_logits

    out = loss_from_logits(F.linear(hidden, weight, bias).float(), labels, spec)
    return out.loss, out.z_loss, None, None


FAKES = {
    "flash-attn-ce": {"flash_attn.ops.triton.cross_entropy": {"cross_entropy_loss": _fake_flash}},
    "te-parallel-ce": {"transformer_engine.pytorch": {"parallel_cross_entropy": _fake_te}},
    "quack-ce": {"quack.cross_entropy": {"cross_entropy": _fake_quack}},
    "quack-linear-ce": {"quack.linear_cross_entropy": {"chunked_linear_cross_entropy": _fake_quack_linear}},
    "unsloth-fused-ce": {"unsloth": {}, "unsloth_zoo.fused_losses.cross_entropy_loss":
                         {"unsloth_fused_ce_loss": _fake_unsloth}},
    "liger-cutedsl": {"liger_kernel.backends": {"dispatch": _fake_cutedsl_dispatch}},
}
# One case per adapter with every option it declares on (the head's bias where it has one).
MAPPED_CASES = {
    "flash-attn-ce": "N=8,D=8,V=16,reduction=mean,bias=1,ignore_index=0,label_smoothing=0.1,z_loss=0.01,"
                     "logit_scale=0.5,softcap=5.0,ignored=some,seed=3",
    "te-parallel-ce": "N=8,D=8,V=16,reduction=none,bias=1,ignore_index=-1,label_smoothing=0.1,logit_scale=4.0,"
                      "softcap=5.0,ignored=some,seed=3",
    "quack-ce": "N=8,D=8,V=16,reduction=mean,bias=1,ignore_index=-1,logit_scale=0.5,softcap=5.0,class_weight=1,"
                "ignored=some,seed=3",
    "quack-linear-ce": "N=8,D=8,V=16,dtype=bfloat16,reduction=sum,ignore_index=0,ignored=some,seed=3",
    "unsloth-fused-ce": "N=8,D=8,V=16,reduction=sum,bias=1,ignore_index=-1,label_smoothing=0.1,logit_scale=4.0,"
                        "softcap=5.0,loss_div_factor=3.0,ignored=some,seed=3",
    "liger-cutedsl": "N=8,D=8,V=16,reduction=mean,bias=1,ignore_index=0,label_smoothing=0.1,z_loss=0.01,"
                     "softcap=5.0,class_weight=1,ignored=some,seed=3",
}


def _install_fakes(monkeypatch, modules):
    for name, attributes in modules.items():
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # parents too, so that `from a.b import c` resolves
            prefix = ".".join(parts[:depth])
            module = sys.modules.get(prefix) if depth < len(parts) else None
            if module is None or depth == len(parts):
                module = types.ModuleType(prefix)
                monkeypatch.setitem(sys.modules, prefix, module)
        for attribute, value in attributes.items():
            monkeypatch.setattr(sys.modules[name], attribute, value, raising=False)


@pytest.mark.parametrize("name", sorted(FAKES))
def test_a_gpu_only_adapter_hands_its_package_every_option_as_documented(name, monkeypatch):
    """With the package replaced by a fake computing what its documentation says, the adapter's
    loss is the definition's: each option reaches the package under its own name, or is composed
    in front as the module docstring says."""
    _install_fakes(monkeypatch, FAKES[name])
    impl = resolve(name)
    case = parse_case(MAPPED_CASES[name])
    assert set(case.options_used()) <= set(impl.capabilities("cuda").options)
    inputs = make_inputs(case)
    hidden, labels = inputs.hidden.reshape(-1, case.dim), inputs.labels.reshape(-1)
    out = impl.compute(hidden, inputs.weight, labels, inputs.spec, inputs.bias)
    loss = out.loss
    if not impl.applies_loss_div_factor:
        loss = loss / inputs.spec.loss_div_factor
    expected = reference_loss(hidden.detach(), inputs.weight.detach(), labels, inputs.spec,
                              None if inputs.bias is None else inputs.bias.detach())
    assert torch.allclose(loss.double().reshape(expected.loss.shape), expected.loss, rtol=2e-2, atol=1e-3)


def test_quack_refuses_what_its_kernels_assert_on():
    from implementations.quack import QuackCrossEntropy, QuackLinearCrossEntropy

    spec = LossSpec()
    with pytest.raises(UnsupportedCase, match="V = 15 is not a multiple of 4"):
        QuackCrossEntropy().compute(torch.randn(8, 8), torch.randn(15, 8), torch.zeros(8, dtype=torch.long), spec, None)
    with pytest.raises(UnsupportedCase, match="N = 7"):
        QuackLinearCrossEntropy().compute(torch.randn(7, 8), torch.randn(16, 8), torch.zeros(7, dtype=torch.long),
                                          spec, None)


# --- the CPU-runnable peers themselves (Triton's interpreter, gloo ranks): slow ---------------

EQUIVALENCE_CASES = {
    "fla": "N=6,D=5,V=33,reduction=sum,bias=1,ignore_index=0,label_smoothing=0.1,logit_scale=0.5,ignored=some,seed=10",
    "liger-ce": "N=6,D=5,V=33,reduction=none,bias=1,label_smoothing=0.1,z_loss=0.01,logit_scale=4.0,softcap=5.0,"
                "ignored=some,seed=10",
    "torchtitan-chunked": "B=2,T=6,D=5,V=33,reduction=mean,bias=1,loss_div_factor=3.0,ignored=some,seed=10",
    "liger-vocab-parallel": "N=6,D=5,V=36,reduction=mean,bias=1,ignore_index=-1,label_smoothing=0.1,softcap=5.0,"
                            "ignored=some,seed=10",
    "torchtitan-loss-parallel": "N=7,D=5,V=33,reduction=sum,bias=1,ignored=some,seed=10",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", CPU_RUNNABLE)
def test_a_cpu_runnable_peer_matches_the_reference_with_its_options_on(name):
    impl = resolve(name)
    if not impl.availability().available:
        pytest.skip(f"{name}: {impl.availability().detail}")
    case = parse_case(EQUIVALENCE_CASES[name])
    assert set(case.options_used()) <= set(impl.capabilities("cpu").options)
    result = run_case(Target(name, impl), find_property("equivalence/float32"), case, "cpu")
    assert result.status == PASS, result.detail


@pytest.mark.slow
def test_liger_ce_overwrites_its_input_which_only_an_op_that_saved_its_output_sees():
    """LigerCrossEntropyLoss writes the logits' gradient into the logits tensor in the forward. After a
    softcap written as Hugging Face's Gemma-2 writes it (``tanh(z / cap) * cap``), that tensor is the
    product, which no op saved: the gradients are right, and so ``liger-ce`` passes the gate with the
    softcap composed in front. Fed ``tanh``'s own output, which tanh saved for its backward, the
    gradient upstream of it is corrupted (liger-kernel 0.8.5, ops/cross_entropy.py: the kernel stores
    the gradient at X_ptr)."""
    from liger_kernel.transformers import LigerCrossEntropyLoss

    torch.manual_seed(0)
    x, y = torch.randn(6, 33), torch.randint(0, 33, (6,))

    def grad(loss_fn, front):
        z = x.clone().requires_grad_()
        loss_fn(front(z), y).backward()
        return z.grad

    as_hf_writes_it = lambda z: torch.tanh(z / 5.0) * 5.0  # noqa: E731
    assert torch.allclose(grad(LigerCrossEntropyLoss(), as_hf_writes_it), grad(F.cross_entropy, as_hf_writes_it),
                          atol=1e-6)
    corrupted = grad(LigerCrossEntropyLoss(), torch.tanh) - grad(F.cross_entropy, torch.tanh)
    assert corrupted.abs().max() > 1e-2


def _known_examples():
    from harness.known import KnownLimitation

    for name in CPU_RUNNABLE:
        for known in resolve(name).known_issues("cpu"):
            if not isinstance(known, KnownLimitation) and (not known.devices or "cpu" in known.devices):
                yield pytest.param(name, known, id=f"{name}-{known.example.split(':')[0]}")


@pytest.mark.slow
@pytest.mark.parametrize("name, known", list(_known_examples()))
def test_a_peers_known_issue_shows_exactly_as_known_on_its_example(name, known):
    """Until issue 25's generic test covers every adapter's entries: a fix upstream (a pass) or
    another failure there (a fail) shows up here, and the entry is updated."""
    from harness.check.run_property import KNOWN_FAILURE

    impl = resolve(name)
    if not impl.availability().available:
        pytest.skip(f"{name}: {impl.availability().detail}")
    property_id, case = known.example.split(": ")
    result = run_case(Target(name, impl), find_property(property_id), parse_case(case), "cpu")
    assert result.status == KNOWN_FAILURE, f"{result.status}: {result.detail}"
    assert known.reason in result.detail


@no_gpu
@pytest.mark.parametrize("name", ["liger", "liger-fp32-accum", "liger-ce", "liger-vocab-parallel", "fla",
                                  "olmo-core-fused"])
def test_triton_peers_refuse_more_tokens_than_the_interpreter_runs_in_minutes(name):
    """The gate's 65 600-token case would take Triton's interpreter over half an hour per call."""
    from implementations.triton_runtime import INTERPRETED_TOKENS_MAX

    impl = resolve(name)
    if not impl.availability().available:
        pytest.skip(impl.availability().detail)
    tokens = INTERPRETED_TOKENS_MAX + 1
    hidden, weight = torch.randn(tokens, 8), torch.randn(16, 8)  # V divisible by the ranks of vocab-parallel
    with pytest.raises(UnsupportedCase, match="Triton's interpreter"):
        impl.loss(hidden, weight, torch.zeros(tokens, dtype=torch.long))


@no_gpu
def test_liger_ce_refuses_bfloat16_on_a_cpu_with_the_interpreters_reason():
    impl = resolve("liger-ce")
    if not impl.availability().available:
        pytest.skip(impl.availability().detail)
    reason = impl.unsupported_reason(LossSpec(), dtype=torch.bfloat16, device="cpu", has_bias=False)
    assert "uint16 bit patterns" in reason
    assert impl.unsupported_reason(LossSpec(), dtype=torch.float16, device="cpu", has_bias=False) is None


@pytest.mark.slow
def test_the_interpreter_multiplies_bfloat16_values_as_their_bits():
    """Why liger-ce refuses bfloat16 on a CPU: a Triton kernel's bfloat16 x bfloat16 product under the
    interpreter is wrong, bfloat16 x float32 right (Triton 3.9)."""
    import triton
    import triton.language as tl

    @triton.jit
    def scale(x_ptr, g_ptr, n: tl.constexpr):
        offsets = tl.arange(0, n)
        tl.store(x_ptr + offsets, tl.load(x_ptr + offsets) * tl.load(g_ptr))

    if torch.cuda.is_available():
        pytest.skip("about Triton's interpreter")
    for upstream_dtype, wrong in ((torch.bfloat16, True), (torch.float32, False)):
        x = torch.linspace(-1, 1, 8, dtype=torch.bfloat16)
        scale[(1,)](x, torch.tensor(0.375, dtype=upstream_dtype), n=8)
        expected = torch.linspace(-1, 1, 8, dtype=torch.bfloat16) * 0.375
        assert bool((x.float() - expected.float()).abs().max() > 1) == wrong
