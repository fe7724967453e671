"""OLMo-core's LM heads behind the contract (``implementations/olmo_core.py``).

The adapters run ``LMHead.forward`` and ``NormalizedLMHead.forward`` themselves: what the gate
judges is OLMo-core's own code. These tests pin down how the adapter drives the head, and the
conventions the gate found, so that a new release that changes one shows up here.
"""

import importlib.metadata

import pytest
import torch

pytest.importorskip("olmo_core.nn.lm_head")

from olmo_core.nn.layer_norm import LayerNormConfig  # noqa: E402
from olmo_core.nn.lm_head import LMHeadConfig  # noqa: E402

from harness.case import Case, make_inputs  # noqa: E402
from harness.semantics import head_logits  # noqa: E402
from harness.spec import LossSpec  # noqa: E402
from implementations.olmo_core import OlmoCoreFusedHead, OlmoCoreHead, OlmoCoreNormalizedHead  # noqa: E402

CASE = Case.build(tokens=(2, 9), dim=16, vocab=37, norm="layernorm", bias=True, ignored="some", z_loss=1e-2, seed=3)


def _grads(inputs):
    return {name: tensor.grad.clone() for name, tensor in inputs.gradient_inputs.items()}


def test_the_adapter_computes_what_lmhead_computes_with_the_same_parameters():
    """An LMHead built from its config, given the case's parameters, returns the same loss and
    gradients, bit for bit: the adapter adds nothing to OLMo-core's forward and backward."""
    inputs = make_inputs(CASE)
    out = OlmoCoreHead().loss(inputs.hidden, inputs.weight, inputs.labels, inputs.spec, bias=inputs.bias)
    out.loss.backward()
    ours = _grads(inputs)

    head = LMHeadConfig(layer_norm=LayerNormConfig(eps=1e-5), bias=True).build(d_model=16, vocab_size=37)
    with torch.no_grad():
        head.w_out.weight.copy_(inputs.weight)
        head.w_out.bias.copy_(inputs.bias)
        head.norm.weight.copy_(inputs.norm_weight)
        head.norm.bias.copy_(inputs.norm_bias)
    hidden = inputs.hidden.detach().clone().requires_grad_()
    theirs = head(hidden, labels=inputs.labels, z_loss_multiplier=1e-2)
    theirs.loss.backward()

    assert torch.equal(out.loss, theirs.loss) and torch.equal(out.z_loss, theirs.z_loss)
    assert torch.equal(ours["hidden"], hidden.grad)
    assert torch.equal(ours["weight"], head.w_out.weight.grad)
    assert torch.equal(ours["norm_weight"], head.norm.weight.grad)


def test_loss_div_factor_as_a_float_or_a_0d_tensor_gives_the_same_loss_and_gradients():
    """LMHead takes loss_div_factor as a float or a tensor (what a trainer computes, e.g. the global
    token count); both divide the same way."""
    results = []
    for factor in (3.0, torch.tensor(3.0)):
        inputs = make_inputs(CASE.replace(reduction="sum"))
        head = OlmoCoreHead().head(inputs.weight, inputs.spec, inputs.bias)
        out = head(inputs.hidden, labels=inputs.labels, loss_reduction="sum", loss_div_factor=factor)
        out.loss.backward()
        results.append((out.loss.detach(), inputs.hidden.grad.clone()))
    (loss_a, grad_a), (loss_b, grad_b) = results
    assert torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b)


def test_ce_loss_is_the_loss_without_its_z_loss():
    """LMOutputWithLoss.ce_loss is the cross-entropy alone, for logging: loss = ce_loss + z_loss."""
    inputs = make_inputs(CASE)
    head = OlmoCoreHead().head(inputs.weight, inputs.spec, inputs.bias)
    out = head(inputs.hidden, labels=inputs.labels, z_loss_multiplier=1e-2)
    torch.testing.assert_close(out.ce_loss + out.z_loss, out.loss.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("keep", [3, "positions"])
def test_logits_to_keep_as_an_int_or_a_tensor_of_positions_on_the_generation_path(keep):
    """Without labels the head returns logits: of the last k positions for an int, of the listed
    positions, one row per sequence (B, K), for a tensor."""
    inputs = make_inputs(CASE)
    if keep == "positions":
        keep = torch.tensor([[8, 0, 4], [1, 1, 7]])
    got = OlmoCoreHead().logits(inputs.hidden, inputs.weight, bias=inputs.bias, spec=inputs.spec, logits_to_keep=keep)
    expected = head_logits(inputs.hidden, inputs.weight, inputs.bias, inputs.spec, logits_to_keep=keep)
    torch.testing.assert_close(got, expected)
    assert got.shape == (2, 3, 37)


def test_with_reduction_none_ignored_tokens_keep_their_z_loss():
    """OLMo-core's convention (the gate's known failure): reduced, the z-loss counts only tokens not
    ignored; per token (none), an ignored token's loss is its z-loss, not 0 as in the reference."""
    case = CASE.replace(reduction="none")
    inputs = make_inputs(case)
    out = OlmoCoreHead().loss(inputs.hidden, inputs.weight, inputs.labels, inputs.spec, bias=inputs.bias)
    ignored = inputs.labels == -100
    assert ignored.any()
    assert (out.loss[ignored] > 0).all()
    torch.testing.assert_close(out.loss[ignored], out.z_loss[ignored])


def test_the_normalized_head_scales_each_class_by_sz():
    """NormalizedLMHead: logits = sz * (hidden @ W.T), sz the per-class scale (see the adapter's
    docstring for its parametrisation)."""
    case = Case.build(tokens=(2, 5), dim=8, vocab=11, class_scale=True, seed=1)
    inputs = make_inputs(case)
    got = OlmoCoreNormalizedHead().logits(inputs.hidden, inputs.weight, spec=inputs.spec)
    expected = (inputs.hidden @ inputs.weight.T) * inputs.class_scale
    torch.testing.assert_close(got, expected)


def test_a_case_the_head_cannot_express_is_refused_with_the_reason():
    assert "NormalizedLMHead has no bias" in OlmoCoreNormalizedHead().unsupported_reason(
        LossSpec(), dtype=torch.float32, device="cpu", has_bias=True)
    assert "label smoothing" in OlmoCoreHead().unsupported_reason(
        LossSpec(label_smoothing=0.1), dtype=torch.float32, device="cpu", has_bias=False)


@pytest.mark.slow
def test_the_fused_head_raises_with_liger_kernel_0_8_and_matches_the_default_head_otherwise():
    """OLMo-core 3.0.0 unpacks three outputs from Liger-Kernel's function; 0.8 returns four."""
    fused = OlmoCoreFusedHead()
    if not fused.availability().available:
        pytest.skip(fused.availability().detail)
    inputs = make_inputs(CASE)
    args = (inputs.hidden, inputs.weight, inputs.labels, inputs.spec)
    if importlib.metadata.version("liger-kernel").startswith("0.8."):
        with pytest.raises(ValueError, match=r"too many values to unpack \(expected 3\)"):
            fused.loss(*args, bias=inputs.bias)
    else:
        torch.testing.assert_close(fused.loss(*args, bias=inputs.bias).loss,
                                   OlmoCoreHead().loss(*args, bias=inputs.bias).loss)
