"""A case is one line that determines every input tensor: what failures print and --case reads."""

import math

import pytest
import torch
from hypothesis import given, settings

from harness.case import PEAKED_LOSS, Case, format_case, make_inputs, parse_case
from harness.check.strategies import cases
from harness.check.support_probe import Support
from harness.errors import HarnessError
from harness.semantics import reference_loss
from harness.spec import OPTIONS

EVERYTHING = Support(True, ("float32", "bfloat16", "float16"), ("mean", "sum", "none"), frozenset(OPTIONS))


@settings(deadline=None)
@given(case=cases(EVERYTHING, dtypes=("float32", "bfloat16", "float16"), grad_subsets=True, chunked=True))
def test_every_drawn_case_survives_its_one_line_form(case):
    assert parse_case(format_case(case)) == case


def test_the_one_line_form_names_only_what_differs_from_the_defaults():
    case = Case.build(tokens=(7,), dim=5, vocab=65537, dtype="bfloat16", label_smoothing=0.1, bias=True, seed=123)
    assert str(case) == "N=7,D=5,V=65537,dtype=bfloat16,reduction=mean,bias=1,label_smoothing=0.1,seed=123"


def test_three_d_inputs_are_written_as_batch_and_time():
    case = parse_case("B=2,T=3,D=4,V=9,seed=0")
    assert case.tokens == (2, 3)
    assert make_inputs(case).hidden.shape == (2, 3, 4)


@pytest.mark.parametrize(
    "text, complaint",
    [
        ("N=7,D=5", "needs V"),
        ("D=5,V=9", "needs the token shape"),
        ("N=7,B=2,T=3,D=5,V=9", "N and B/T"),
        ("N=7,D=5,V=9,colour=red", "unknown --case key 'colour'"),
        ("N=7,D=5,V=9,bias=yes please", "bad value for --case key 'bias'"),
        ("N=seven,D=5,V=9", "bad value for --case key 'N'"),
        ("N=7,D=5,V=9,dtype=float64", "unknown dtype"),
        ("N=7,D=5,V=9,reduction=max", "unknown reduction"),
        ("N=7,D=5,V=1", "V must be >= 2"),
        ("N=7,D=5,V=9,label_smoothing=2", "label_smoothing must be in [0, 1]"),
        ("N=7,D=5,V=9,ignored=most", "ignored must be one of"),
        ("N=7,D=5,V=9,tied=1,grads=hidden", "tied=1"),
        ("N=7,D=5,V=9,tied=1,strided=1", "layout=strided needs tied=0"),
        ("N=7,D=5,V=9,layout=diagonal", "layout must be one of"),
        ("N=7,D=5,V=9,upstream=sideways", "upstream must be one of"),
        ("N=7,D=5,V=9,logits=sharp", "logits must be one of random, peaked, confident"),
        ("N=7,D=5,V=9,tied=1,logits=peaked", "logits=peaked needs tied=0"),
        ("N=7,D,V=9", "expected key=value"),
    ],
)
def test_a_malformed_case_is_one_clear_line(text, complaint):
    with pytest.raises(HarnessError) as error:
        parse_case(text)
    message = str(error.value)
    assert complaint in message and "\n" not in message


def test_the_seed_determines_every_tensor():
    case = parse_case("N=9,D=4,V=33,dtype=bfloat16,bias=1,class_weight=1,ignored=some,reduction=none,seed=5")
    first, second = make_inputs(case), make_inputs(case)
    for name in ("hidden", "weight", "bias", "labels", "upstream"):
        assert torch.equal(getattr(first, name), getattr(second, name))
    assert torch.equal(first.spec.class_weight, second.spec.class_weight)
    other = make_inputs(case.replace(seed=6))
    assert not torch.equal(first.hidden, other.hidden)


def test_the_reference_sees_exactly_the_candidates_inputs_in_float64():
    case = parse_case("N=5,D=3,V=17,dtype=bfloat16,bias=1,seed=1")
    candidate, reference = make_inputs(case), make_inputs(case, reference=True)
    assert reference.hidden.dtype == torch.float64
    assert torch.equal(reference.hidden, candidate.hidden.double())
    assert torch.equal(reference.bias, candidate.bias.double())


@pytest.mark.parametrize("ignore_index", [-100, -1, 0])
def test_ignore_patterns_mark_none_some_or_all_tokens(ignore_index):
    base = Case.build(tokens=(40,), dim=3, vocab=5, ignore_index=ignore_index, seed=3)
    none = make_inputs(base.replace(ignored="none")).labels
    some = make_inputs(base.replace(ignored="some")).labels
    every = make_inputs(base.replace(ignored="all")).labels
    assert not (none == ignore_index).any(), "an in-range ignore_index is never drawn as a real label"
    assert 0 < int((some == ignore_index).sum()) < 40
    assert (every == ignore_index).all()


@pytest.mark.parametrize("layout", ["strided", "sliced", "transposed"])
@pytest.mark.parametrize("tokens", ["N=10", "B=2,T=5"])
def test_a_laid_out_case_gives_views_of_the_same_values(layout, tokens):
    """The views users pass: every other element, the slices a model produces, sequence-first."""
    case = parse_case(f"{tokens},D=3,V=17,bias=1,layout={layout},seed=1")
    laid_out, plain = make_inputs(case), make_inputs(case.replace(layout="contiguous"))
    assert not laid_out.hidden.is_contiguous() and not laid_out.weight.is_contiguous()
    for name in ("hidden", "weight", "bias", "labels"):
        assert torch.equal(getattr(laid_out, name), getattr(plain, name)), name
    assert laid_out.hidden.is_leaf and laid_out.hidden.requires_grad  # its .grad is the gradient


def test_sliced_inputs_are_rows_longer_than_they_are_at_an_offset():
    two_d = make_inputs(parse_case("N=10,D=3,V=17,layout=sliced,seed=1"))
    assert two_d.hidden.stride() == (6, 1) and two_d.hidden.storage_offset() == 3  # a split's second half
    three_d = make_inputs(parse_case("B=2,T=5,D=3,V=17,layout=sliced,seed=1"))
    assert three_d.hidden.stride() == (18, 3, 1)  # the first T positions of T + 1
    assert three_d.labels.stride() == (6, 1) and three_d.labels.storage_offset() == 1  # ids[:, 1:]


def test_the_older_strided_flag_reads_as_the_strided_layout():
    assert parse_case("N=3,D=2,V=5,strided=1,seed=0").layout == "strided"


@pytest.mark.parametrize("pattern", ["runs", "right"])
def test_padding_patterns_leave_real_tokens_and_long_runs_of_padding(pattern):
    labels = make_inputs(parse_case(f"B=4,T=200,D=3,V=17,ignored={pattern},seed=3")).labels
    ignored = labels == -100
    assert ignored.any() and not ignored.all()
    if pattern == "runs":
        assert ignored[0].all(), "a whole sequence of padding"
        assert ignored.view(-1)[256:384].all(), "a chunk-sized run"
    else:
        lengths = (~ignored).sum(1)
        assert lengths.unique().numel() > 1 and not (ignored[:, :-1] & ~ignored[:, 1:]).any(), "padding on the right"


def test_confident_logits_put_nearly_all_probability_on_the_label():
    inputs = make_inputs(parse_case("N=40,D=64,V=257,logits=confident,seed=2"), reference=True)
    logits = inputs.hidden @ inputs.weight.T
    probability = logits.softmax(-1).gather(1, inputs.labels[:, None])
    assert float(probability.median()) > 0.99


def test_an_expanded_upstream_is_the_stride_zero_ones_of_a_sum():
    from harness.check.evaluation import upstream_for

    inputs = make_inputs(parse_case("B=2,T=3,D=4,V=7,reduction=none,upstream=expanded,seed=0"))
    upstream = upstream_for(inputs, torch.zeros(2, 3))
    assert upstream.stride() == (0, 0) and torch.equal(upstream, torch.ones(2, 3))
    strided = make_inputs(parse_case("B=2,T=3,D=4,V=7,reduction=none,upstream=strided,seed=0"))
    assert not upstream_for(strided, torch.zeros(2, 3)).is_contiguous()


def test_the_labels_include_the_first_and_the_last_class():
    labels = make_inputs(parse_case("N=50,D=3,V=1000,ignored=some,seed=4")).labels
    assert (labels == 0).any() and (labels == 999).any()


def test_gradients_are_requested_only_for_the_chosen_inputs():
    inputs = make_inputs(parse_case("N=3,D=2,V=5,bias=1,grads=weight+bias,seed=0"))
    assert not inputs.hidden.requires_grad
    assert inputs.weight.requires_grad and inputs.bias.requires_grad


def test_a_tied_case_takes_its_hidden_states_from_a_model_whose_head_is_its_embedding():
    inputs = make_inputs(parse_case("N=4,D=3,V=11,tied=1,seed=0"))
    assert inputs.weight is inputs.model.embedding.weight
    assert inputs.hidden.grad_fn is not None  # computed from the embedding: two gradient paths


def test_some_ignored_never_ignores_every_token():
    """Every token ignored with reduction=mean is 0/0: the behaviour matrix's business, not equivalence's."""
    for seed in range(50):
        labels = make_inputs(Case.build(tokens=(1,), dim=2, vocab=5, ignored="some", seed=seed)).labels
        assert (labels != -100).any()


@pytest.mark.parametrize("draw_on_device", [False, True])
def test_peaked_logits_give_a_training_like_loss_where_random_ones_are_near_uniform(draw_on_device):
    """Random inputs give a loss of about ln V (nothing for gradient filtering to tell apart);
    peaked ones lean each hidden state toward its label's row, for a loss of about 2.5 nats."""
    case = Case(tokens=(256,), dim=256, vocab=32000, dtype="bfloat16", ignored="some", seed=5)

    def loss(case):
        inputs = make_inputs(case, draw_on_device=draw_on_device)
        return float(reference_loss(inputs.hidden, inputs.weight, inputs.labels, inputs.spec).loss.detach())

    assert loss(case) > math.log(32000)
    assert abs(loss(case.replace(logits="peaked")) - PEAKED_LOSS) < 0.5


def test_peaked_inputs_move_only_the_hidden_states_of_tokens_not_ignored():
    case = Case(tokens=(64,), dim=16, vocab=128, ignored="some", seed=2)
    random, peaked = make_inputs(case), make_inputs(case.replace(logits="peaked"))
    ignored = random.labels == -100
    assert torch.equal(random.weight, peaked.weight) and torch.equal(random.labels, peaked.labels)
    assert torch.equal(random.hidden[ignored], peaked.hidden[ignored])
    assert not (random.hidden[~ignored] == peaked.hidden[~ignored]).all(dim=-1).any()


def test_the_default_logits_are_random_and_the_one_line_form_says_so_only_otherwise():
    assert Case(tokens=(3,), dim=2, vocab=9).logits == "random"
    case = parse_case("N=3,D=2,V=9,logits=peaked,seed=0")
    assert str(case) == "N=3,D=2,V=9,dtype=float32,reduction=mean,logits=peaked,seed=0"
