"""``hf-gpt2``, ``hf-llama``, ``hf-gemma2``: transformers' own heads and causal-LM loss behind the contract.

Each adapter builds the real model with no hidden layers, makes its head's parameters the harness's
tensors and feeds the harness's hidden states into its final norm, then calls the model's own
``forward``. These tests show what that computes and the conventions bridged (label shifting,
``num_items_in_batch``, Gemma's ``1 + w`` gain, the tied GPT-2 embedding). They are skipped where
transformers is not installed (``pip install 'lmhead-bench[hf]'``).
"""

import importlib.util

import pytest
import torch

from harness.errors import UnsupportedCase
from harness.registry import resolve
from harness.semantics import head_logits, reference_loss
from harness.spec import LossSpec

NAMES = ("hf-gpt2", "hf-llama", "hf-gemma2")
B, T, D, V = 2, 5, 8, 13


@pytest.fixture
def transformers():
    return pytest.importorskip("transformers")


def inputs(seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=generator, dtype=dtype)
    weight = torch.randn(V, D, generator=generator, dtype=dtype) / D**0.5
    labels = torch.randint(0, V, (B, T), generator=generator)
    labels[0, 1] = -100
    gain = torch.rand(D, generator=generator, dtype=dtype) + 0.5
    shift = torch.randn(D, generator=generator, dtype=dtype) * 0.25
    return hidden, weight, labels, gain, shift


def close(got, expected):
    """Equal up to float32 roundings (the reference computes in float64)."""
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=2e-5, atol=2e-6)


def norm_spec(name, gain, shift, **options):
    if name == "hf-gpt2":
        return LossSpec(norm="layernorm", norm_weight=gain, norm_bias=shift, **options)
    return LossSpec(norm="rmsnorm", norm_weight=gain, **options)


def test_the_adapter_computes_hfs_own_loss_of_a_model_called_with_labels(transformers):
    """A 0-layer Llama called as users call it, ``model(input_ids, labels=input_ids)``, and the same
    model's head through the adapter: the pre-norm hidden states are its embeddings, the head its
    ``lm_head`` and final norm. HF shifts ``labels`` by one inside the loss; the harness's labels are
    already aligned with their positions, so they are ``input_ids[:, 1:]`` with the last position ignored."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=0, hidden_size=D, vocab_size=V, num_attention_heads=1,
                                      num_key_value_heads=1, head_dim=2, intermediate_size=1, rms_norm_eps=1e-6)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 1.5)
    input_ids = torch.randint(0, V, (B, T))
    expected = model(input_ids, labels=input_ids).loss

    aligned = torch.nn.functional.pad(input_ids[:, 1:], (0, 1), value=-100)
    hidden = model.model.embed_tokens(input_ids)
    spec = LossSpec(norm="rmsnorm", norm_weight=model.model.norm.weight, norm_eps=1e-6)
    got = resolve("hf-llama").loss(hidden, model.lm_head.weight, aligned, spec).loss
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_every_model_computes_the_reference_with_its_norm_and_gradients_reach_the_harness_tensors(transformers, name):
    hidden, weight, labels, gain, shift = inputs()
    for tensor in (hidden, weight, gain, shift):
        tensor.requires_grad_()
    spec = norm_spec(name, gain, shift)
    got = resolve(name).loss(hidden, weight, labels, spec).loss
    expected = reference_loss(hidden, weight, labels, spec).loss
    close(got, expected)
    wanted = [hidden, weight, gain] + ([shift] if name == "hf-gpt2" else [])
    for grad, grad_expected in zip(torch.autograd.grad(got, wanted), torch.autograd.grad(expected, wanted)):
        close(grad, grad_expected)


def test_passing_only_labels_shifts_them_by_one(transformers):
    """HF's documented convention (``labels = input_ids`` works): with ``labels=`` alone, position t
    is scored against ``labels[t + 1]``, and the last position against nothing. The adapter passes
    ``shift_labels=labels`` so that position t is scored against ``labels[t]``."""
    impl = resolve("hf-llama")
    hidden, weight, labels, _, _ = inputs()
    model = impl.build(weight, LossSpec(), positions=T)
    only_labels = impl.forward(model, hidden, labels=labels).loss
    shifted = reference_loss(hidden[:, :-1], weight, labels[:, 1:], LossSpec()).loss
    close(only_labels, shifted)
    aligned = impl.forward(model, hidden, labels=labels, shift_labels=labels).loss
    close(aligned, reference_loss(hidden, weight, labels, LossSpec()).loss)


def test_sum_is_divided_by_num_items_in_batch_and_mean_by_the_accumulated_count(transformers):
    """HF has no ``sum`` reduction of its own: it divides the sum by ``num_items_in_batch``, which the
    adapter sets to ``loss_div_factor``. A ``mean`` with a ``loss_div_factor`` is the sum over the
    items of an accumulated batch, as HF's Trainer passes them: this batch's count times the factor."""
    impl = resolve("hf-gemma2")
    hidden, weight, labels, _, _ = inputs()
    total = reference_loss(hidden, weight, labels, LossSpec(reduction="sum")).loss
    got = impl.loss(hidden, weight, labels, LossSpec(reduction="sum", loss_div_factor=3.0)).loss
    close(got, total / 3)
    counted = int((labels != -100).sum())
    got = impl.loss(hidden, weight, labels, LossSpec(loss_div_factor=2.0)).loss
    close(got, total / (2 * counted))


def test_gemma_stores_its_gain_minus_one_and_the_gradient_reaches_the_gain(transformers):
    """``Gemma2RMSNorm`` computes ``x_hat * (1 + w)``: the adapter gives it ``w = g - 1`` computed from
    the harness's gain ``g`` in the graph, so the gain's gradient is the reference's."""
    impl = resolve("hf-gemma2")
    hidden, weight, labels, gain, _ = inputs()
    gain.requires_grad_()
    spec = LossSpec(norm="rmsnorm", norm_weight=gain)
    model = impl.build(weight, spec)
    torch.testing.assert_close(model.model.norm.weight, gain - 1)
    (grad,) = torch.autograd.grad(impl.loss(hidden, weight, labels, spec).loss, gain)
    (expected,) = torch.autograd.grad(reference_loss(hidden, weight, labels, spec).loss, gain)
    close(grad, expected)


def test_the_tied_gpt2_heads_weight_is_the_embedding_and_is_the_harness_tensor(transformers):
    _, weight, _, _, _ = inputs()
    model = resolve("hf-gpt2").build(weight, LossSpec())
    assert model.lm_head.weight is model.transformer.wte.weight is weight
    model = resolve("hf-llama").build(weight, LossSpec())  # Llama's head is untied
    assert model.lm_head.weight is weight and model.model.embed_tokens.weight is not weight
    assert not model.config.tie_word_embeddings


def test_gemma2s_softcap_is_the_cases_and_off_without_one(transformers):
    impl = resolve("hf-gemma2")
    _, weight, _, _, _ = inputs()
    assert impl.build(weight, LossSpec()).config.final_logit_softcapping is None  # Gemma-2's default is 30
    assert impl.build(weight, LossSpec(softcap=5.0)).config.final_logit_softcapping == 5.0
    hidden, weight, labels, _, _ = inputs(1)
    spec = LossSpec(softcap=5.0)
    close(impl.loss(hidden, 8 * weight, labels, spec).loss, reference_loss(hidden, 8 * weight, labels, spec).loss)


@pytest.mark.parametrize("name", NAMES)
def test_the_logits_path_keeps_the_last_positions_or_given_ones_per_sequence(transformers, name):
    hidden, weight, _, gain, shift = inputs()
    spec = norm_spec(name, gain, shift)
    impl = resolve(name)
    for keep in (0, 2, torch.tensor([4, 0]), torch.tensor([[1, 3], [4, 0]])):
        close(impl.logits(hidden, weight, spec=spec, logits_to_keep=keep),
              head_logits(hidden, weight, None, spec, logits_to_keep=keep))
    flat = hidden[0]
    close(impl.logits(flat, weight, spec=spec, logits_to_keep=1),
          head_logits(flat, weight, None, spec, logits_to_keep=1))


@pytest.mark.parametrize("name, spec, reason", [
    ("hf-gpt2", LossSpec(norm="rmsnorm"), "GPT2LMHeadModel's final norm is a LayerNorm"),
    ("hf-llama", LossSpec(norm="layernorm"), "LlamaForCausalLM's final norm is an RMSNorm"),
    ("hf-llama", LossSpec(softcap=30.0), "softcap: the model has no final logit softcapping"),
    ("hf-gemma2", LossSpec(reduction="none"), "reduction=none: HF's causal-LM loss returns a reduced loss only"),
    ("hf-gemma2", LossSpec(label_smoothing=0.1), "label_smoothing: HF's causal-LM loss"),
    ("hf-gemma2", LossSpec(z_loss_multiplier=1e-4), "z_loss: HF's causal-LM loss"),
])
def test_what_the_models_lack_is_refused_with_a_one_line_reason(name, spec, reason):
    impl = resolve(name)
    if not impl.availability().available:
        pytest.skip(impl.availability().detail)
    hidden, weight, labels, _, _ = inputs()
    with pytest.raises(UnsupportedCase, match=reason):
        impl.loss(hidden, weight, labels, spec)


def test_a_head_bias_is_refused_in_the_loss_and_the_logits(transformers):
    impl = resolve("hf-gpt2")
    hidden, weight, labels, _, _ = inputs()
    with pytest.raises(UnsupportedCase, match="bias: the model's lm_head is nn.Linear"):
        impl.loss(hidden, weight, labels, bias=torch.zeros(V, dtype=weight.dtype))
    with pytest.raises(UnsupportedCase, match="bias"):
        impl.logits(hidden, weight, bias=torch.zeros(V, dtype=weight.dtype))


def test_without_transformers_each_is_unavailable_with_the_install_hint(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    for name in NAMES:
        available = resolve(name).availability()
        assert not available.available
        assert available.detail == "transformers is not installed: pip install 'lmhead-bench[hf]'"
