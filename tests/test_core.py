"""The harness core: one contract for every implementation, the float64 reference, and `list`.

What an implementation computes is the gate's to judge (``python -m harness check``, run over every
built-in by ``.ci/run``); these tests pin the contract around it: the registry, option and input
validation, the reference's definitions, refusals with a reason, and the tiny model of tied heads.
"""

from __future__ import annotations

import pytest
import torch

from harness.cli import main
from harness.errors import HarnessError, UnsupportedCase
from harness.model import TinyLM
from harness.registry import builtin_names, resolve, resolve_many
from harness.semantics import loss_from_logits, reference_loss, reference_result
from harness.spec import OPTION_DECLARATIONS, OPTIONS, LossSpec

BUILTINS = ("torch-eager", "torch-compile", "torch-linear-ce", "chunked", "liger", "cce")
VOCAB, DIM, TOKENS = 97, 12, 23

# One spec per option, each exercising exactly that option at its declared strong value, ignore_index
# at a real class id (bias is an input: handled below).
OPTION_SPECS = {
    option.name: LossSpec(**{option.spec_field: 7 if option.name == "ignore_index" else option.values[0]})
    for option in OPTION_DECLARATIONS
    if option.spec_field is not None
}
OPTION_SPECS["class_weight"] = LossSpec(class_weight=torch.rand(VOCAB, generator=torch.Generator().manual_seed(1)) + 0.5)
OPTION_SPECS["class_scale"] = LossSpec(class_scale=torch.rand(VOCAB, generator=torch.Generator().manual_seed(2)) + 0.5)


def make_inputs(seed=0, tokens=TOKENS, ignore_index=-100):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, DIM, generator=gen)
    weight = torch.randn(VOCAB, DIM, generator=gen) * 0.5
    bias = torch.randn(VOCAB, generator=gen) * 0.1
    labels = torch.randint(0, VOCAB, (tokens,), generator=gen)
    labels[::5] = ignore_index
    return hidden, weight, bias, labels


def available(name):
    impl = resolve(name)
    if not impl.availability().available:
        pytest.skip(f"{name} unavailable here: {impl.availability().detail}")
    return impl


class TestRegistry:
    def test_every_builtin_family_is_registered(self):
        assert set(BUILTINS) <= set(builtin_names())

    def test_unknown_name_is_a_one_line_error(self):
        with pytest.raises(HarnessError, match="unknown implementation 'nope'"):
            resolve("nope")

    @pytest.mark.parametrize(
        "name, message",
        [
            ("no_such_module_xyz:fn", "cannot import plugin module 'no_such_module_xyz'"),
            ("tests.plugin_examples:missing", "has no attribute 'missing'"),
            ("tests.plugin_examples:not_callable", "is a int, not an Implementation"),
            (":fn", "expected package.module:attr"),
        ],
    )
    def test_bad_plugin_is_a_one_line_error(self, name, message):
        with pytest.raises(HarnessError, match=message):
            resolve(name)

    def test_plain_function_plugin_is_wrapped(self):
        impl = resolve("tests.plugin_examples:plain_eager")
        assert impl.name == "tests.plugin_examples:plain_eager"
        assert impl.family == "plugin"

    def test_adapter_plugin_is_used_as_is(self):
        assert resolve("tests.plugin_examples:sum_only").name == "sum-only"
        assert resolve("tests.plugin_examples:SumOnlyAdapter").name == "sum-only"

    def test_resolve_many_defaults_to_all_builtins_without_duplicates(self):
        assert [i.name for i in resolve_many(None)] == list(builtin_names())
        assert [i.name for i in resolve_many(["chunked", "chunked"])] == ["chunked"]


class TestSpecAndInputs:
    @pytest.mark.parametrize(
        "kwargs, message",
        [
            (dict(reduction="avg"), "unknown reduction 'avg'"),
            (dict(label_smoothing=1.5), "label_smoothing must be in"),
            (dict(softcap=0.0), "softcap must be a positive number"),
            (dict(loss_div_factor=0.0), "loss_div_factor must be a positive number"),
            (dict(z_loss_multiplier=-1.0), "z_loss_multiplier must be finite"),
        ],
    )
    def test_bad_options_are_rejected(self, kwargs, message):
        with pytest.raises(HarnessError, match=message):
            LossSpec(**kwargs)

    def test_labels_out_of_range_are_rejected_with_position(self):
        hidden, weight, _, labels = make_inputs()
        labels[3] = VOCAB
        with pytest.raises(HarnessError, match=f"label {VOCAB} at flat position 3 is out of range"):
            resolve("torch-eager").loss(hidden, weight, labels)

    def test_shape_mismatch_is_rejected(self):
        hidden, weight, _, labels = make_inputs()
        with pytest.raises(HarnessError, match="hidden size mismatch"):
            resolve("chunked").loss(hidden[:, :5], weight, labels)
        with pytest.raises(HarnessError, match="labels shape"):
            resolve("chunked").loss(hidden, weight, labels[:-1])

    def test_options_used_names_only_non_defaults(self):
        assert LossSpec().options_used(has_bias=False) == frozenset()
        assert LossSpec(softcap=30.0).options_used(has_bias=True) == {"softcap", "bias"}
        assert set(OPTION_SPECS) | {"bias"} == set(OPTIONS)


class TestReference:
    def test_mean_over_ignored_tokens_divides_by_tokens_kept(self):
        hidden, weight, _, labels = make_inputs()
        per_token = reference_loss(hidden, weight, labels, LossSpec(reduction="none")).loss
        mean = reference_loss(hidden, weight, labels, LossSpec()).loss
        kept = (labels != -100).sum()
        torch.testing.assert_close(mean, per_token.sum() / kept)
        assert (per_token[labels == -100] == 0).all()

    def test_z_loss_is_reported_and_included(self):
        hidden, weight, _, labels = make_inputs()
        plain = reference_loss(hidden, weight, labels, LossSpec()).loss
        with_z = reference_loss(hidden, weight, labels, LossSpec(z_loss_multiplier=0.1))
        torch.testing.assert_close(with_z.loss, plain + with_z.z_loss)
        assert with_z.z_loss > 0

    @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
    def test_without_z_loss_no_logsumexp_is_computed_and_the_z_loss_is_zeros(self, reduction, monkeypatch):
        """torch-eager and torch-compile run this code: a logsumexp for a z-loss multiplied by 0 would be
        one more N x V pass and buffer in the baseline's time and memory."""
        hidden, weight, _, labels = make_inputs()
        logits = (hidden @ weight.T).float()
        calls = []
        logsumexp = torch.logsumexp
        monkeypatch.setattr(torch, "logsumexp", lambda *a, **k: calls.append(a[0].shape) or logsumexp(*a, **k))
        out = loss_from_logits(logits, labels, LossSpec(reduction=reduction))
        assert calls == []
        assert out.z_loss.shape == out.loss.shape and out.z_loss.dtype == torch.float32
        assert bool((out.z_loss == 0).all())
        loss_from_logits(logits, labels, LossSpec(reduction=reduction, z_loss_multiplier=0.1))
        assert calls == [logits.shape]

    def test_mean_with_class_weights_divides_by_their_sum(self):
        hidden, weight, _, labels = make_inputs()
        class_weight = OPTION_SPECS["class_weight"].class_weight
        spec = LossSpec(class_weight=class_weight)
        per_token = reference_loss(hidden, weight, labels, spec.replace(reduction="none")).loss
        kept = labels[labels != -100]
        torch.testing.assert_close(
            reference_loss(hidden, weight, labels, spec).loss, per_token.sum() / class_weight.double()[kept].sum()
        )

    def test_loss_div_factor_divides_the_reduced_loss(self):
        hidden, weight, _, labels = make_inputs()
        spec = LossSpec(reduction="sum")
        torch.testing.assert_close(
            reference_loss(hidden, weight, labels, spec.replace(loss_div_factor=8.0)).loss,
            reference_loss(hidden, weight, labels, spec).loss / 8.0,
        )

    def test_reference_is_float64_with_all_gradients(self):
        hidden, weight, bias, labels = make_inputs()
        ref = reference_result(hidden.bfloat16(), weight.bfloat16(), labels, LossSpec(), bias.bfloat16())
        assert ref.loss.dtype == ref.grad_hidden.dtype == ref.grad_weight.dtype == ref.grad_bias.dtype == torch.float64


class TestTiedAndUntiedHeads:
    def test_a_tied_heads_weight_gets_the_gradient_of_both_of_its_paths(self):
        """The head's use of the weight and the embedding's: the tied cases of the gate rely on it."""
        tokens = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(0))
        labels = tokens.roll(-1, dims=1)
        labels[:, -1] = -100
        model = TinyLM(VOCAB, DIM, tied=True, seed=3)
        eager = resolve("torch-eager")
        (both,) = torch.autograd.grad(model.loss(eager, tokens, labels).loss, model.embedding.weight)
        head = model.embedding.weight.detach().requires_grad_()  # the same values, as a separate leaf
        loss = eager.loss(model.hidden_states(tokens), head, labels).loss
        head_path, embedding_path = torch.autograd.grad(loss, [head, model.embedding.weight])
        assert head_path.abs().sum() > 0 and embedding_path.abs().sum() > 0
        torch.testing.assert_close(both, head_path + embedding_path)

    def test_tied_head_weight_is_the_embedding_parameter(self):
        tied, untied = TinyLM(VOCAB, DIM, tied=True), TinyLM(VOCAB, DIM, tied=False)
        assert tied.head_weight is tied.embedding.weight
        assert untied.head_weight is not untied.embedding.weight
        assert len(list(untied.parameters())) == len(list(tied.parameters())) + 1  # tying adds no parameter


class TestUnsupportedAndInference:
    def test_liger_without_gpu_reports_interpreter_limits_as_unsupported(self):
        liger = resolve("liger")
        if torch.cuda.is_available():
            pytest.skip("on a GPU liger supports softcap and class weights")
        assert "interpreter" in liger.availability().detail
        hidden, weight, _, labels = make_inputs()
        with pytest.raises(UnsupportedCase, match="softcap: .*Triton's interpreter"):
            liger.loss(hidden, weight, labels, LossSpec(softcap=30.0))

    @pytest.mark.parametrize("name, package", [("liger", "liger_kernel"), ("cce", "cut_cross_entropy")])
    def test_missing_optional_package_makes_only_that_adapter_unavailable(self, name, package, monkeypatch):
        import importlib.util

        real_find_spec = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda mod, *a: None if mod == package else real_find_spec(mod, *a)
        )
        availability = resolve(name).availability()
        assert not availability.available
        assert "is not installed" in availability.detail and "pip install" in availability.detail
        assert resolve("torch-eager").availability().available

    def test_a_case_an_adapter_does_not_claim_is_refused_with_its_reason_before_it_runs(self, monkeypatch):
        impl = resolve("torch-linear-ce")
        hidden, weight, _, labels = make_inputs()
        spec = LossSpec(softcap=5.0)
        reason = impl.unsupported_reason(spec, dtype=torch.float32, device="cpu", has_bias=False)
        assert reason.startswith("softcap: ")
        monkeypatch.setattr(type(impl), "compute", lambda *args: pytest.fail("a refused case was computed"))
        with pytest.raises(UnsupportedCase) as refused:
            impl.loss(hidden, weight, labels, spec)
        assert str(refused.value) == reason

    def test_plain_function_raising_not_implemented_is_unsupported(self):
        hidden, weight, _, labels = make_inputs()
        with pytest.raises(UnsupportedCase, match="softcap is not implemented"):
            resolve("tests.plugin_examples:plain_eager").loss(hidden, weight, labels, LossSpec(softcap=5.0))

    def test_declared_reductions_are_enforced(self):
        hidden, weight, _, labels = make_inputs()
        with pytest.raises(UnsupportedCase, match="reduction=mean"):
            resolve("tests.plugin_examples:sum_only").loss(hidden, weight, labels)

    def test_3d_inputs_give_per_token_losses_in_batch_shape(self):
        hidden, weight, _, labels = make_inputs(tokens=24)
        out = resolve("chunked").loss(hidden.view(4, 6, DIM), weight, labels.view(4, 6), LossSpec(reduction="none"))
        assert out.loss.shape == (4, 6)

    def test_logits_to_keep_returns_last_positions(self):
        hidden = torch.randn(2, 5, DIM)
        weight = torch.randn(VOCAB, DIM)
        logits = resolve("torch-eager").logits(hidden, weight, logits_to_keep=1)
        assert logits.shape == (2, 1, VOCAB)
        torch.testing.assert_close(logits[:, 0], hidden[:, -1] @ weight.T)

    def test_logits_to_keep_positions_are_given_per_sequence(self):
        """``(B, K)`` positions pick K positions of each sequence; a ``(1, K)`` tensor for two sequences
        is refused, where ``gather`` would silently return the first sequence's only."""
        hidden = torch.randn(2, 5, DIM)
        weight = torch.randn(VOCAB, DIM)
        positions = torch.tensor([[4, 0], [1, 2]])
        logits = resolve("torch-eager").logits(hidden, weight, logits_to_keep=positions)
        torch.testing.assert_close(logits[1], hidden[1, [1, 2]] @ weight.T)
        with pytest.raises(HarnessError, match=r"expected \(K,\) or, for \(B, T, D\), \(B, K\)"):
            resolve("torch-eager").logits(hidden, weight, logits_to_keep=positions[:1])


class TestListCommand:
    def test_lists_all_implementations_and_a_plugin(self, capsys):
        assert main(["list", "--verbose", "--plugin", "tests.plugin_examples:plain_eager"]) == 0
        out = capsys.readouterr().out
        for name in BUILTINS + ("tests.plugin_examples:plain_eager",):
            assert name in out
        if not torch.cuda.is_available():
            assert "interpreter" in out
            assert "torch_compile" in out

    @pytest.mark.parametrize("name, message", [("nope", "unknown implementation 'nope'"),
                                               ("no_such_module_xyz:fn", "cannot import plugin module")])
    def test_bad_name_exits_2_with_one_line(self, name, message, capsys):
        assert main(["list", "--impl", name]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1


def test_an_option_an_adapter_does_not_list_is_unsupported_with_a_reason():
    from harness.adapter import Capabilities
    from harness.spec import ORIGINAL_OPTIONS

    assert Capabilities().options == ORIGINAL_OPTIONS  # an adapter that lists nothing: the original options
    listed = Capabilities(supported_options=("bias", "softcap"), unsupported_options={"softcap": "no kernel"})
    assert listed.options == ("bias",)
    reasons = listed.reasons()
    assert reasons["softcap"] == "no kernel"
    assert "declares it supports" in reasons["ignore_index"]
    assert "bias" not in reasons


class TestCutCrossEntropyOnCuda:
    """cut-cross-entropy 25.1.1's CUDA backward asserts bfloat16 or float16 embeddings; its CPU
    torch_compile impl takes float32. A fake CUDA capability stands in for the GPU."""

    @pytest.fixture
    def fake_cuda(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    @pytest.mark.parametrize("name", ["cce", "cce-exact"])
    def test_float32_is_declared_unsupported_on_cuda_only(self, name, fake_cuda):
        impl = available(name)
        spec = LossSpec()
        assert impl.unsupported_reason(spec, dtype=torch.float32, device="cuda", has_bias=False) == (
            f"{name} does not support float32 on cuda")
        for dtype in (torch.bfloat16, torch.float16):
            assert impl.unsupported_reason(spec, dtype=dtype, device="cuda", has_bias=False) is None
        assert torch.float32 in impl.capabilities("cpu").dtypes

    def test_its_known_cpu_failures_are_not_expected_on_cuda(self):
        from harness.known import KnownLimitation, on_device

        cce = available("cce")
        on_cpu = on_device(cce.known_issues("cpu"), "cpu")
        assert [k.properties for k in on_cpu if isinstance(k, KnownLimitation)] == [("autograd/retain-graph",)]
        assert on_device(cce.known_issues("cuda"), "cuda") == ()
