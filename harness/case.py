"""One case: a small frozen description of a head's inputs that determines every tensor from its seed.

The correctness gate, the behaviour matrix and the sweep all describe their work with ``Case``.
It is what Hypothesis draws, what a failure prints and what ``--case`` parses back, so a
reproducer is one line:

    N=7,D=5,V=65537,dtype=bfloat16,reduction=mean,bias=1,label_smoothing=0.1,seed=123

The loss options are those declared in ``harness.spec.OPTION_DECLARATIONS``, by the same names
(``case.option("softcap")``, ``Case.build(..., softcap=5.0)``, ``softcap=5`` in a case line), so
a new option needs no change here.

``make_inputs(case)`` builds the tensors: hidden states, head weight, optional bias, labels (with
the requested ignore pattern), class weights and the upstream gradient of per-token losses. With
``tied=1`` the hidden states come from a ``TinyLM`` whose head weight is its embedding, so the
weight gradient is the sum of both paths. ``layout`` says how the inputs are laid out in memory
(the views users pass, see ``LAYOUTS``; ``strided=1`` is the older spelling of ``layout=strided``),
``upstream`` how the gradient of per-token losses arrives, ``ignored`` where the padding is
(``IGNORE_PATTERNS``). With ``logits=peaked`` each hidden state leans toward its label's row of the
head, so the softmax is peaked at the label as in a trained model (a loss of about ``PEAKED_LOSS``
nats); with ``logits=confident`` so much that the label's probability is near 1
(``CONFIDENT_LOSS``, late in training); the default ``random`` gives near-uniform logits (a loss of
about ln V).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from harness.errors import HarnessError
from harness.model import TinyLM
from harness.spec import DTYPES, OPTION_BY_NAME, OPTION_DECLARATIONS, OPTIONS, REDUCTIONS, LossSpec, parse_dtype, parse_flag

# Where ignored tokens are: none; some, scattered (SOME_IGNORED_FRACTION); all; runs: long runs of
# padding, whole sequences and runs of a kernel's chunk size (64, 128 tokens) among real tokens;
# right: right-padded sequences of different lengths, as a batch of documents is.
IGNORE_PATTERNS = ("none", "some", "all", "runs", "right")
LOGIT_MODES = ("random", "peaked", "confident")  # the distribution of the logits (see make_inputs)
# The loss, in nats, that "peaked" inputs aim at: a language model's in training is about 2-3.
# Gradient filtering (Cut Cross-Entropy's) skips the classes whose softmax is negligible, which
# depends on this: on random inputs every class has about the same small probability.
PEAKED_LOSS = 2.5
# "confident": the label's probability about 0.999, which rounds to 1 in bfloat16 and float16, so
# that a true-class gradient p_y - 1 formed from a rounded p_y vanishes.
CONFIDENT_LOSS = 1e-3
# How inputs sit in memory. contiguous; strided: every other element of the last axis (a tensor
# packed with another); sliced: the views a model passes, at an offset into a larger buffer with
# rows longer than they are (hidden states a column slice or one half of a split, or the first T
# positions of T + 1; labels shifted by one, ``ids[:, 1:]``; a weight that is a block of a larger
# matrix); transposed: sequence-first activations ((T, B, D) transposed, as Megatron keeps them)
# and a column-major weight.
LAYOUTS = ("contiguous", "strided", "sliced", "transposed")
# How the gradient of per-token losses (reduction none) arrives: random values; expanded: the
# stride-0 ones of ``loss.sum().backward()``; strided: random values in a non-contiguous view.
UPSTREAMS = ("random", "expanded", "strided")
# The tensors whose gradients a case can ask for: the head's input and every parameter of the head.
GRADIENT_INPUTS = ("hidden", "weight", "bias", "norm_weight", "norm_bias", "class_scale")

# Share of tokens ignored by the "some" pattern (at least one is, and at least one is not).
SOME_IGNORED_FRACTION = 0.3


@dataclass(frozen=True)
class OptionValues:
    """The options a case turns on: ``(name, value)`` pairs of the non-default ones, in ``OPTIONS`` order."""

    items: tuple[tuple[str, object], ...] = ()

    @staticmethod
    def of(**values) -> OptionValues:
        unknown = [name for name in values if name not in OPTION_BY_NAME]
        if unknown:
            raise HarnessError(f"unknown option {unknown[0]!r}; expected one of {', '.join(OPTIONS)}")
        return OptionValues(tuple((name, values[name]) for name in OPTIONS
                                  if name in values and values[name] != OPTION_BY_NAME[name].default))

    def get(self, name: str) -> object:
        return dict(self.items).get(name, OPTION_BY_NAME[name].default)

    def replace(self, **changes) -> OptionValues:
        return OptionValues.of(**{**dict(self.items), **changes})

    @property
    def names(self) -> frozenset[str]:
        """The options in use (every one listed is, as defaults are dropped)."""
        return frozenset(name for name, _ in self.items)

    def spec(self, reduction: str, class_weight: torch.Tensor | None = None) -> LossSpec:
        """The ``LossSpec`` (``class_weight``: the tensor, when the case has class weights)."""
        fields = {option.spec_field: self.get(option.name) for option in OPTION_DECLARATIONS if option.spec_field}
        return LossSpec(reduction=reduction, class_weight=class_weight, **fields)


@dataclass(frozen=True)
class Case:
    """Shape, dtype, loss options and seed of one case; see the module docstring for the syntax."""

    tokens: tuple[int, ...]  # (N,) for (N, D) inputs or (B, T) for (B, T, D) inputs
    dim: int  # D
    vocab: int  # V
    dtype: str = "float32"
    reduction: str = "mean"
    options: OptionValues = OptionValues()
    tied: bool = False  # the hidden states come from a model whose embedding is the head weight
    ignored: str = "none"  # which labels are ignore_index: none, some or all
    scale: float = 1.0  # standard deviation of the logits (untied heads)
    grads: tuple[str, ...] = GRADIENT_INPUTS  # inputs that require grad
    chunk: int | None = None  # the implementation's chunk size (None: its default)
    keep: int = 0  # logits_to_keep of the logits path (0: every position)
    layout: str = "contiguous"  # how the inputs sit in memory (LAYOUTS)
    upstream: str = "random"  # how the gradient of per-token losses arrives (UPSTREAMS)
    logits: str = "random"  # random (near-uniform softmax), peaked or confident at the labels (LOGIT_MODES)
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.tokens) not in (1, 2) or any(n < 1 for n in self.tokens):
            raise HarnessError(f"case tokens must be N >= 1 or B, T >= 1, got {self.tokens}")
        if self.dim < 1:
            raise HarnessError(f"case D must be >= 1, got {self.dim}")
        if self.vocab < 2:
            raise HarnessError(f"case V must be >= 2, got {self.vocab}")
        parse_dtype(self.dtype)
        if self.ignored not in IGNORE_PATTERNS:
            raise HarnessError(f"case ignored must be one of {', '.join(IGNORE_PATTERNS)}, got {self.ignored!r}")
        unknown = [g for g in self.grads if g not in GRADIENT_INPUTS]
        if unknown or not self.grads:
            raise HarnessError(f"case grads must be a '+'-joined subset of {'+'.join(GRADIENT_INPUTS)}, got {self.grads}")
        if self.logits not in LOGIT_MODES:
            raise HarnessError(f"case logits must be one of {', '.join(LOGIT_MODES)}, got {self.logits!r}")
        if self.layout not in LAYOUTS:
            raise HarnessError(f"case layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.upstream not in UPSTREAMS:
            raise HarnessError(f"case upstream must be one of {', '.join(UPSTREAMS)}, got {self.upstream!r}")
        if self.tied and self.logits != "random":
            raise HarnessError(f"a tied case takes its hidden states from a model: logits={self.logits} needs tied=0")
        if self.tied and self.layout != "contiguous":
            raise HarnessError(f"a tied case takes its hidden states from a model: layout={self.layout} needs tied=0")
        if self.tied and set(self.grads) != set(GRADIENT_INPUTS):
            raise HarnessError("a tied case trains the whole model: grads cannot be restricted with tied=1")
        if self.chunk is not None and self.chunk < 1:
            raise HarnessError(f"case chunk must be >= 1, got {self.chunk}")
        if not 0 <= self.keep <= self.tokens[-1]:
            raise HarnessError(f"case keep (logits_to_keep) must be in [0, {self.tokens[-1]}], got {self.keep}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise HarnessError(f"case scale must be a positive number, got {self.scale}")
        self.spec()  # the loss options raise their own one-line errors

    @staticmethod
    def build(**fields) -> Case:
        """A case from its fields and its options by name: ``Case.build(tokens=(7,), dim=5, vocab=9, softcap=5.0)``."""
        return Case(tokens=fields.pop("tokens"), dim=fields.pop("dim"), vocab=fields.pop("vocab")).replace(**fields)

    def replace(self, **changes) -> Case:
        """A copy with fields and options (by name) changed."""
        options = {name: changes.pop(name) for name in list(changes) if name in OPTION_BY_NAME}
        if options:
            changes["options"] = changes.get("options", self.options).replace(**options)
        return dataclasses.replace(self, **changes)

    def option(self, name: str) -> object:
        """The value of one option (its default when the case does not use it)."""
        return self.options.get(name)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.tokens)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def spec(self, class_weight: torch.Tensor | None = None) -> LossSpec:
        return self.options.spec(self.reduction, class_weight)

    def options_used(self) -> frozenset[str]:
        """The ``harness.spec.OPTIONS`` this case exercises."""
        return self.options.names

    @property
    def parameters(self) -> tuple[str, ...]:
        """The names from ``GRADIENT_INPUTS`` of the tensors this case has (hidden and weight always)."""
        norm = self.option("norm")
        present = {"hidden": True, "weight": True, "bias": self.option("bias"), "norm_weight": norm is not None,
                   "norm_bias": norm == "layernorm", "class_scale": self.option("class_scale")}
        return tuple(name for name in GRADIENT_INPUTS if present[name])

    def _spec_without_tensors(self) -> LossSpec:
        """The spec with a stand-in class-weight tensor: only its presence matters to what it says."""
        return self.spec(torch.ones(self.vocab) if self.option("class_weight") else None)

    def describe_options(self) -> str:
        """The reduction and the options in use, e.g. ``reduction=mean, softcap=30.0, bias``."""
        return self._spec_without_tensors().describe() + (", bias" if self.option("bias") else "")

    def unsupported_reason(self, impl, device: str) -> str | None:
        """Why ``impl`` says it cannot run this case on ``device`` ("cpu" or "cuda"), or None."""
        return impl.unsupported_reason(self._spec_without_tensors(), dtype=self.torch_dtype, device=device,
                                       has_bias=bool(self.option("bias")))

    @property
    def logits_bytes(self) -> int:
        """Bytes of the N x V logits in the input dtype."""
        return self.num_tokens * self.vocab * self.torch_dtype.itemsize

    @property
    def gradient_bytes(self) -> int:
        """The lower bound on memory (Cut Cross-Entropy paper): the gradients of hidden and weight (and bias)."""
        bias = self.vocab if self.option("bias") else 0
        return (self.num_tokens * self.dim + self.vocab * self.dim + bias) * self.torch_dtype.itemsize

    def matmul_flops(self, mode: str) -> int:
        """Matmul work: 2*N*D*V forward (the logits), 6*N*D*V forward+backward (plus both gradients)."""
        per_pass = 2 * self.num_tokens * self.dim * self.vocab
        return {"forward": per_pass, "forward_backward": 3 * per_pass}[mode]

    def __str__(self) -> str:
        return format_case(self)


# --- the one-line syntax -----------------------------------------------------------------------

# key -> (Case field, parser); the options' keys are their names (see OPTION_DECLARATIONS).
_FIELD_KEYS = {
    "D": ("dim", int),
    "V": ("vocab", int),
    "dtype": ("dtype", str),
    "reduction": ("reduction", str),
    "tied": ("tied", parse_flag),
    "ignored": ("ignored", str),
    "scale": ("scale", float),
    "grads": ("grads", lambda v: tuple(v.split("+"))),
    "chunk": ("chunk", lambda v: None if v.lower() == "none" else int(v)),
    "keep": ("keep", int),
    "layout": ("layout", str),
    "upstream": ("upstream", str),
    "logits": ("logits", str),
    "seed": ("seed", int),
}
_OPTION_KEYS = {key: option for option in OPTION_DECLARATIONS for key in (option.name, *option.aliases)}
CASE_KEYS = ("N", "B", "T", *_FIELD_KEYS, *OPTIONS, "strided")
_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Case) if f.default is not dataclasses.MISSING}


def _format_value(value: object) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, tuple):
        return "+".join(value)
    return str(value)


def format_case(case: Case) -> str:
    """The one-line form: shape, dtype, reduction and seed always, other fields when not default."""
    if len(case.tokens) == 1:
        parts = [f"N={case.tokens[0]}"]
    else:
        parts = [f"B={case.tokens[0]}", f"T={case.tokens[1]}"]
    parts += [f"D={case.dim}", f"V={case.vocab}", f"dtype={case.dtype}", f"reduction={case.reduction}"]
    parts += [f"{name}={_format_value(value)}" for name, value in case.options.items]
    for key, (name, _) in _FIELD_KEYS.items():
        value = getattr(case, name)
        if key not in ("D", "V", "dtype", "reduction", "seed") and value != _FIELD_DEFAULTS[name]:
            parts.append(f"{key}={_format_value(value)}")
    parts.append(f"seed={case.seed}")
    return ",".join(parts)


def parse_case(text: str) -> Case:
    """Parse the one-line form; a malformed string raises a one-line ``HarnessError``."""
    fields: dict = {}
    options: dict = {}
    shape: dict[str, int] = {}
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not value:
            raise HarnessError(f"malformed --case item {item!r}: expected key=value (e.g. N=7,D=5,V=257,seed=1)")
        try:
            if key in ("N", "B", "T"):
                shape[key] = int(value)
            elif key == "strided":  # the older spelling of layout=strided
                fields["layout"] = "strided" if parse_flag(value) else "contiguous"
            elif key in _FIELD_KEYS:
                name, parse = _FIELD_KEYS[key]
                fields[name] = parse(value)
            elif key in _OPTION_KEYS:
                options[_OPTION_KEYS[key].name] = _OPTION_KEYS[key].parse(value)
            else:
                raise HarnessError(f"unknown --case key {key!r}; expected one of {', '.join(CASE_KEYS)}")
        except ValueError as exc:
            raise HarnessError(f"bad value for --case key {key!r}: {value!r} ({exc})") from None
    if "N" in shape and ("B" in shape or "T" in shape):
        raise HarnessError("--case gives N and B/T: use N=... for (N, D) inputs or B=...,T=... for (B, T, D)")
    if "N" in shape:
        fields["tokens"] = (shape["N"],)
    elif "B" in shape and "T" in shape:
        fields["tokens"] = (shape["B"], shape["T"])
    else:
        raise HarnessError("--case needs the token shape: N=... or B=...,T=...")
    missing = [key for key, name in (("D", "dim"), ("V", "vocab")) if name not in fields]
    if missing:
        raise HarnessError(f"--case needs {' and '.join(missing)} (e.g. N=7,D=5,V=257,seed=1)")
    if fields.get("reduction", "mean") not in REDUCTIONS:
        raise HarnessError(f"unknown reduction {fields['reduction']!r}; expected one of {', '.join(REDUCTIONS)}")
    return Case(options=OptionValues.of(**options), **fields)


# --- the tensors -------------------------------------------------------------------------------


@dataclass
class Inputs:
    """The tensors of one case, on one device, in the case's dtype (or float64 for the reference).

    ``gradient_inputs`` maps names from ``GRADIENT_INPUTS`` to the tensors whose gradients are
    checked (the hidden states of a tied model are not a leaf: their gradient is retained). The
    head's norm and class scale travel in ``spec`` (see ``LossSpec``); the properties below name them.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    labels: torch.Tensor
    spec: LossSpec
    upstream: torch.Tensor | None  # gradient of per-token losses (reduction "none"), float64, CPU
    gradient_inputs: dict[str, torch.Tensor]
    model: TinyLM | None = None  # tied cases: the model, and the tokens it embeds
    token_ids: torch.Tensor | None = None
    upstream_layout: str = "random"  # how ``upstream`` is handed to backward (UPSTREAMS)

    def reset_grads(self) -> None:
        for tensor in self.gradient_inputs.values():
            tensor.grad = None

    @property
    def norm_weight(self) -> torch.Tensor | None:
        return self.spec.norm_weight

    @property
    def norm_bias(self) -> torch.Tensor | None:
        return self.spec.norm_bias

    @property
    def class_scale(self) -> torch.Tensor | None:
        return self.spec.class_scale


def make_labels(case: Case, generator: torch.Generator) -> torch.Tensor:
    """Random labels with the case's ignore pattern; the first and last class (0 and V - 1) are
    always among the labels of the tokens not ignored, when there are two such tokens.

    Kernels get the edges of the vocabulary wrong (a mask off by one, a last partial block): a
    label at each edge puts the one-hot part of the gradient there.
    """
    ignore_index = case.option("ignore_index")
    labels = torch.randint(0, case.vocab, case.tokens, generator=generator)
    if case.ignored == "all":
        ignored = torch.ones(case.tokens, dtype=torch.bool)
    elif case.ignored == "some":  # at least one token ignored and one not (a single token is kept)
        ignored = torch.rand(case.tokens, generator=generator) < SOME_IGNORED_FRACTION
        flat = ignored.view(-1)
        if case.num_tokens >= 2 and not flat.any():
            flat[int(torch.randint(0, flat.numel(), (1,), generator=generator))] = True
        if flat.all():
            flat[int(torch.randint(0, flat.numel(), (1,), generator=generator))] = False
    elif case.ignored in ("runs", "right"):
        ignored = padding_runs(case) if case.ignored == "runs" else right_padding(case)
    else:
        ignored = torch.zeros(case.tokens, dtype=torch.bool)
    kept = (~ignored).view(-1).nonzero().flatten()
    if len(kept) >= 2:
        first, last = kept[torch.randperm(len(kept), generator=generator)[:2]]
        labels.view(-1)[first], labels.view(-1)[last] = 0, case.vocab - 1
    if 0 <= ignore_index < case.vocab:  # an in-range ignore_index must only mark ignored tokens
        labels[labels == ignore_index] = (ignore_index + 1) % case.vocab
    return labels.masked_fill(ignored, ignore_index)


def padding_runs(case: Case) -> torch.Tensor:
    """Long runs of padding among real tokens: with (B, T) tokens the first sequence is all padding;
    along the flat tokens, runs of 64 and of 128 (a kernel's chunk size) start at a multiple of 64, and
    the last token is real (at least one token is real)."""
    ignored = torch.zeros(case.tokens, dtype=torch.bool)
    if len(case.tokens) == 2 and case.tokens[0] > 1:
        ignored[0] = True
    flat = ignored.view(-1)
    for start, length in ((64, 64), (256, 128), (0, 32)):
        if start < flat.numel():
            flat[start:start + length] = True
    flat[-1] = False
    return ignored


def right_padding(case: Case) -> torch.Tensor:
    """Right-padded sequences: each sequence (the one sequence of (N,) tokens) ends in padding, of a
    length drawn from the case's seed (some none, one all but its first token)."""
    generator = torch.Generator().manual_seed(case.seed + 0x50414444)
    batch, length = (1, case.tokens[0]) if len(case.tokens) == 1 else case.tokens
    kept = torch.randint(1, length + 1, (batch,), generator=generator)
    kept[0] = 1
    if batch > 1:
        kept[-1] = length
    return (torch.arange(length)[None, :] >= kept[:, None]).reshape(case.tokens)


def make_inputs(case: Case, *, device: str = "cpu", reference: bool = False, draw_on_device: bool = False) -> Inputs:
    """Build the case's tensors from its seed; ``reference=True`` gives their exact float64 copies.

    The hidden states and the head are drawn in float64 on the CPU, so a case line gives the same
    tensors on every machine. ``draw_on_device=True`` draws them in float32 on ``device`` instead:
    other values, but made in milliseconds at a benchmark's sizes (a Gemma-2 head in float64 is
    4.7 GB drawn on one CPU core). It has no reference and no tied model.
    """
    generator = torch.Generator().manual_seed(case.seed)
    dtype = case.torch_dtype
    labels = make_labels(case, generator)
    class_weight = torch.rand(case.vocab, generator=generator) * 1.5 + 0.5 if case.option("class_weight") else None
    upstream = None
    if case.reduction == "none":  # multiples of 1/4: exact in every dtype, so all see the same upstream
        upstream = torch.randint(-8, 9, case.tokens, generator=generator).double() / 4
        if case.upstream == "expanded":  # loss.sum().backward(): ones (laid out by ``upstream_for``)
            upstream = torch.ones(case.tokens, dtype=torch.float64)
    if class_weight is not None:
        class_weight = class_weight.to(device, torch.float64 if reference else torch.float32)
    spec = case.spec(class_weight)
    labels = labels.to(device)
    has_bias = bool(case.option("bias"))

    model = token_ids = None
    if case.tied:
        if draw_on_device:
            raise HarnessError("a tied case is drawn on the CPU (its model is seeded there): use draw_on_device=False")
        model = TinyLM(case.vocab, case.dim, tied=True, bias=has_bias, dtype=dtype, seed=case.seed)
        if reference:
            model = model.double()
        model = model.to(device)
        token_ids = torch.randint(0, case.vocab, case.tokens, generator=generator).to(device)
        hidden, weight, bias = model.hidden_states(token_ids), model.head_weight, model.head_bias
        hidden.retain_grad()
    elif draw_on_device:
        if reference:
            raise HarnessError("inputs drawn on the device have no reference copy: use draw_on_device=False")
        hidden, weight, bias = _draw_on_device(case, device, has_bias, labels)
    else:
        work_dtype = torch.float64 if reference else dtype
        hidden = torch.randn(*case.tokens, case.dim, generator=generator, dtype=torch.float64)
        weight = torch.randn(case.vocab, case.dim, generator=generator, dtype=torch.float64) * (case.scale / case.dim**0.5)
        bias = torch.randn(case.vocab, generator=generator, dtype=torch.float64) * (case.scale / 2) if has_bias else None
        if case.logits != "random":
            hidden = peaked_hidden(hidden, weight, labels, case)
        if case.option("norm") is not None:
            hidden = hidden * norm_input_scales(case)
        # Round to the case's dtype first, so the reference sees exactly the candidate's inputs.
        hidden, weight = (t.to(dtype).to(device, work_dtype) for t in (hidden, weight))
        bias = None if bias is None else bias.to(dtype).to(device, work_dtype)
    if not reference:
        hidden, weight, bias, labels = lay_out(case.layout, hidden, weight, bias, labels)
    # Drawn last, so that a case without them draws exactly what it drew before they existed.
    head = _head_parameters(case, generator, device, torch.float64 if reference else dtype)
    spec = spec.replace(**head)
    tensors = {"hidden": hidden, "weight": weight, "bias": bias, **head}
    gradient_inputs = {}
    for name, tensor in tensors.items():
        if tensor is None or (model is None and name not in case.grads):  # a tied model trains everything
            continue
        if tensor.is_leaf:  # a tied model's hidden states are not: their gradient is retained
            tensor.requires_grad_()
        gradient_inputs[name] = tensor
    return Inputs(hidden, weight, bias, labels, spec, upstream, gradient_inputs, model, token_ids, case.upstream)


def norm_input_scales(case: Case) -> torch.Tensor:
    """A scale per token, 10^-3 to 10^0.5, for the hidden states a norm takes.

    A norm does not see the scale of its input, except through its epsilon: a mean square near
    ``norm_eps`` is where an epsilon in the wrong place, or statistics in a low precision, show.
    Drawn from a generator of their own, so the other tensors are those of the case without a norm.
    """
    generator = torch.Generator().manual_seed(case.seed + 0x4E4F524D)
    exponent = torch.rand(*case.tokens, 1, generator=generator, dtype=torch.float64) * 3.5 - 3.0
    return 10.0**exponent


def _head_parameters(case: Case, generator: torch.Generator, device: str, dtype: torch.dtype) -> dict:
    """The norm's weight (and, for a LayerNorm, bias) and the class scale, when the case has them.

    The gains lie in [0.5, 1.5] and the scales in [0.5, 2], the range of trained ones, where ``g - 1``
    is exact in every dtype (Gemma stores its RMSNorm gain as ``g - 1``); the norm's bias is small
    beside the normalized values it shifts.
    """
    norm = case.option("norm")
    drawn = {"norm_weight": None, "norm_bias": None, "class_scale": None}
    if norm is not None:
        drawn["norm_weight"] = torch.rand(case.dim, generator=generator, dtype=torch.float64) + 0.5
        if norm == "layernorm":
            drawn["norm_bias"] = torch.randn(case.dim, generator=generator, dtype=torch.float64) * 0.25
    if case.option("class_scale"):
        drawn["class_scale"] = torch.rand(case.vocab, generator=generator, dtype=torch.float64) * 1.5 + 0.5
    return {name: None if t is None else t.to(case.torch_dtype).to(device, dtype) for name, t in drawn.items()}


def _draw_on_device(case: Case, device: str, has_bias: bool, labels: torch.Tensor):
    """Hidden states, head and bias with the distributions of the CPU draw, in float32 on ``device``."""
    generator = torch.Generator(device=device).manual_seed(case.seed)

    def draw(*shape, std):
        return torch.randn(*shape, generator=generator, device=device, dtype=torch.float32) * std

    hidden = draw(*case.tokens, case.dim, std=1.0)
    weight = draw(case.vocab, case.dim, std=case.scale / case.dim**0.5)
    bias = draw(case.vocab, std=case.scale / 2) if has_bias else None
    if case.logits != "random":
        hidden = peaked_hidden(hidden, weight, labels, case)
    return tuple(None if t is None else t.to(case.torch_dtype) for t in (hidden, weight, bias))


def peaked_margin(vocab: int, scale: float, loss: float = PEAKED_LOSS) -> float:
    """How far above the others a target logit must lie for a loss of about ``loss`` nats.

    The other V - 1 logits are about normal with standard deviation ``scale``, so their softmax
    mass relative to the target's is about (V - 1) exp(scale^2 / 2 - margin); the loss is the log
    of one plus that. With a large ``scale`` that mass is the largest logit's, about scale
    sqrt(2 ln V) above the mean, so the margin is the smaller of the two. A vocabulary too small to
    reach that loss gets no margin.
    """
    spread = min(scale**2 / 2, scale * math.sqrt(2 * math.log(vocab)))
    return max(0.0, math.log(vocab - 1) + spread - math.log(math.expm1(loss)))


def peaked_hidden(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, case: Case) -> torch.Tensor:
    """``hidden`` moved along its label's row of the head, so that its target logit gains
    ``peaked_margin``; the hidden states of ignored tokens are left as they are."""
    ignore_index = case.option("ignore_index")
    labels = labels.to(hidden.device)
    kept = (labels != ignore_index) & (labels >= 0) & (labels < case.vocab)
    rows = weight[labels.clamp(0, case.vocab - 1)]
    loss = CONFIDENT_LOSS if case.logits == "confident" else PEAKED_LOSS
    step = peaked_margin(case.vocab, case.scale, loss) * kept.to(hidden.dtype) / rows.square().sum(-1)
    return hidden + step.unsqueeze(-1) * rows


def lay_out(layout: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The same values as views of the given layout (``LAYOUTS``)."""
    if layout == "strided":
        return strided_copy(hidden), strided_copy(weight), bias if bias is None else strided_copy(bias), strided_copy(labels)
    if layout == "sliced":
        return sliced_hidden(hidden), _block_of(weight, rows=(1, 2), columns=(0, 3)), \
            bias if bias is None else _block_of(bias, rows=(1, 0)), shifted(labels)
    if layout == "transposed":
        hidden = _transposed_copy(hidden, (1, 0) if hidden.dim() == 2 else (1, 0, 2))
        labels = labels if labels.dim() == 1 else _transposed_copy(labels, (1, 0))
        return hidden, _transposed_copy(weight, (1, 0)), bias, labels
    return hidden, weight, bias, labels


def _block_of(tensor: torch.Tensor, rows: tuple[int, int], columns: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """``tensor`` as a block of a larger buffer, ``rows`` (before, after) rows and ``columns`` (before,
    after) columns around it (a 1-D tensor takes ``rows`` only)."""
    if tensor.dim() == 1:
        buffer = tensor.new_zeros(rows[0] + tensor.shape[0] + rows[1])
        buffer[rows[0]:rows[0] + tensor.shape[0]] = tensor
        return buffer[rows[0]:rows[0] + tensor.shape[0]]
    height, width = tensor.shape
    buffer = tensor.new_zeros(rows[0] + height + rows[1], columns[0] + width + columns[1])
    buffer[rows[0]:rows[0] + height, columns[0]:columns[0] + width] = tensor
    return buffer[rows[0]:rows[0] + height, columns[0]:columns[0] + width]


def sliced_hidden(hidden: torch.Tensor) -> torch.Tensor:
    """``(N, D)`` hidden states as the second half of a ``torch.split`` of ``(N, 2D)`` (rows of 2D);
    ``(B, T, D)`` ones as the first T positions of ``(B, T + 1, D)``."""
    if hidden.dim() == 2:
        buffer = hidden.new_zeros(hidden.shape[0], 2 * hidden.shape[1])
        buffer[:, hidden.shape[1]:] = hidden
        return torch.split(buffer, hidden.shape[1], dim=1)[1]
    buffer = hidden.new_zeros(hidden.shape[0], hidden.shape[1] + 1, hidden.shape[2])
    buffer[:, :-1] = hidden
    return buffer[:, :-1]


def shifted(labels: torch.Tensor) -> torch.Tensor:
    """Labels as a causal LM takes them from its token ids: ``ids[..., 1:]`` of one more position."""
    buffer = labels.new_zeros(*labels.shape[:-1], labels.shape[-1] + 1)
    buffer[..., 1:] = labels
    return buffer[..., 1:]


def _transposed_copy(tensor: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """The same values, stored in the order ``order`` of the axes (a permuted contiguous buffer)."""
    return tensor.permute(*order).contiguous().permute(*[order.index(i) for i in range(len(order))])


def strided_copy(tensor: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view into a larger buffer: every other element of the
    last axis. That is the layout of labels shifted by one (``labels[:, 1:]``), of hidden states
    sliced from a wider activation, of a weight packed with others; a kernel that reads its inputs
    through the data pointer as if they were contiguous reads the gaps instead."""
    buffer = tensor.new_zeros(*tensor.shape[:-1], 2 * tensor.shape[-1])
    buffer[..., ::2] = tensor
    return buffer[..., ::2]
