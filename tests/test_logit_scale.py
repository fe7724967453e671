"""``logit_scale`` multiplies the logits after the bias and before the softcap (Cohere's
``logit_scale``; Granite divides by ``logits_scaling``). A fused loss that drops it is silently wrong."""

import pytest
import torch
import torch.nn.functional as F

from harness.errors import HarnessError
from harness.registry import resolve
from harness.semantics import head_logits, reference_loss
from harness.spec import LossSpec

GENERATOR = torch.Generator().manual_seed(0)
HIDDEN = torch.randn(6, 8, generator=GENERATOR, dtype=torch.float64)
WEIGHT = torch.randn(11, 8, generator=GENERATOR, dtype=torch.float64)
BIAS = torch.randn(11, generator=GENERATOR, dtype=torch.float64)
LABELS = torch.tensor([0, 3, 10, 5, -100, 7])


def test_the_scale_multiplies_the_biased_logits_before_the_softcap():
    spec = LossSpec(logit_scale=0.125, softcap=2.0)
    scaled = 0.125 * (HIDDEN @ WEIGHT.T + BIAS)
    expected = F.cross_entropy(2.0 * torch.tanh(scaled / 2.0), LABELS)
    torch.testing.assert_close(reference_loss(HIDDEN, WEIGHT, LABELS, spec, BIAS).loss, expected)
    torch.testing.assert_close(head_logits(HIDDEN, WEIGHT, BIAS, spec), 2.0 * torch.tanh(scaled / 2.0))


def test_without_a_softcap_it_is_a_head_with_scaled_weight_and_bias():
    spec = LossSpec(logit_scale=4.0)
    torch.testing.assert_close(reference_loss(HIDDEN, WEIGHT, LABELS, spec, BIAS).loss,
                               reference_loss(HIDDEN, 4.0 * WEIGHT, LABELS, LossSpec(), 4.0 * BIAS).loss)


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan")])
def test_a_scale_that_is_not_a_positive_number_is_refused(value):
    with pytest.raises(HarnessError, match="logit_scale must be a positive number"):
        LossSpec(logit_scale=value)


@pytest.mark.parametrize("name", ["liger", "cce"])
def test_a_peer_that_does_not_list_it_is_unsupported_with_the_reason(name):
    reason = resolve(name).unsupported_reason(LossSpec(logit_scale=0.5), dtype=torch.bfloat16, device="cuda",
                                              has_bias=False)
    assert reason is not None and reason.startswith("logit_scale:")


@pytest.mark.parametrize("name", ["torch-eager", "chunked", "chunked-vocab-parallel"])
def test_the_projects_own_losses_support_it(name):
    assert "logit_scale" in resolve(name).capabilities("cpu").options
