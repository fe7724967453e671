"""One checked case: a small frozen description that determines every input tensor from its seed.

A ``Case`` is what Hypothesis draws, what a failure prints and what ``--case`` parses back, so
a reproducer is one line:

    N=7,D=5,V=65537,dtype=bfloat16,reduction=mean,label_smoothing=0.1,bias=1,seed=123

``make_inputs(case)`` builds the tensors: hidden states, head weight, optional bias, labels (with
the requested ignore pattern), class weights and the upstream gradient of per-token losses. With
``tied=1`` the hidden states come from a ``TinyLM`` whose head weight is its embedding, so the
weight gradient is the sum of both paths. With ``strided=1`` every input is a non-contiguous view.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from harness.errors import HarnessError
from harness.model import TinyLM
from harness.spec import DTYPES, REDUCTIONS, LossSpec, parse_dtype

IGNORE_PATTERNS = ("none", "some", "all")
GRADIENT_INPUTS = ("hidden", "weight", "bias")

# Share of tokens ignored by the "some" pattern (at least one is, and at least one is not).
SOME_IGNORED_FRACTION = 0.3


@dataclass(frozen=True)
class Case:
    """Shape, dtype, loss options and seed of one check; see the module docstring for the syntax."""

    tokens: tuple[int, ...]  # (N,) for (N, D) inputs or (B, T) for (B, T, D) inputs
    dim: int
    vocab: int
    dtype: str = "float32"
    reduction: str = "mean"
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    loss_div_factor: float = 1.0
    class_weight: bool = False
    bias: bool = False
    tied: bool = False
    ignored: str = "none"  # which labels are ignore_index: none, some or all
    scale: float = 1.0  # standard deviation of the logits (untied heads)
    grads: tuple[str, ...] = GRADIENT_INPUTS  # inputs that require grad
    chunk: int | None = None  # the implementation's chunk size (None: its default)
    keep: int = 0  # logits_to_keep of the logits path (0: every position)
    strided: bool = False  # inputs are non-contiguous views (see make_inputs)
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
        if self.tied and self.strided:
            raise HarnessError("a tied case takes its hidden states from a model: strided=1 needs tied=0")
        if self.tied and set(self.grads) != set(GRADIENT_INPUTS):
            raise HarnessError("a tied case trains the whole model: grads cannot be restricted with tied=1")
        if self.chunk is not None and self.chunk < 1:
            raise HarnessError(f"case chunk must be >= 1, got {self.chunk}")
        if not 0 <= self.keep <= self.tokens[-1]:
            raise HarnessError(f"case keep (logits_to_keep) must be in [0, {self.tokens[-1]}], got {self.keep}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise HarnessError(f"case scale must be a positive number, got {self.scale}")
        self.spec()  # the loss options raise their own one-line errors

    @property
    def num_tokens(self) -> int:
        return math.prod(self.tokens)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def spec(self, class_weight: torch.Tensor | None = None) -> LossSpec:
        return LossSpec(
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            z_loss_multiplier=self.z_loss,
            softcap=self.softcap,
            loss_div_factor=self.loss_div_factor,
            class_weight=class_weight,
        )

    def options_used(self) -> frozenset[str]:
        """The ``harness.spec.OPTIONS`` this case exercises."""
        marker = torch.ones(1) if self.class_weight else None
        return self.spec(marker).options_used(has_bias=self.bias)

    def replace(self, **changes) -> Case:
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        return format_case(self)


# --- the one-line syntax -----------------------------------------------------------------------

_KEYS = {
    # key -> (Case field, parser)
    "D": ("dim", int),
    "V": ("vocab", int),
    "dtype": ("dtype", str),
    "reduction": ("reduction", str),
    "ignore_index": ("ignore_index", int),
    "label_smoothing": ("label_smoothing", float),
    "z_loss": ("z_loss", float),
    "softcap": ("softcap", lambda v: None if v.lower() == "none" else float(v)),
    "loss_div_factor": ("loss_div_factor", float),
    "class_weight": ("class_weight", lambda v: _parse_flag(v)),
    "bias": ("bias", lambda v: _parse_flag(v)),
    "tied": ("tied", lambda v: _parse_flag(v)),
    "ignored": ("ignored", str),
    "scale": ("scale", float),
    "grads": ("grads", lambda v: tuple(v.split("+"))),
    "chunk": ("chunk", lambda v: None if v.lower() == "none" else int(v)),
    "keep": ("keep", int),
    "strided": ("strided", lambda v: _parse_flag(v)),
    "seed": ("seed", int),
}
CASE_KEYS = ("N", "B", "T", *_KEYS)


def _parse_flag(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes"):
        return True
    if lowered in ("0", "false", "no"):
        return False
    raise ValueError(f"expected 0 or 1, got {value!r}")


def format_case(case: Case) -> str:
    """The one-line form: shape, dtype, reduction and seed always, other fields when not default."""
    if len(case.tokens) == 1:
        parts = [f"N={case.tokens[0]}"]
    else:
        parts = [f"B={case.tokens[0]}", f"T={case.tokens[1]}"]
    parts += [f"D={case.dim}", f"V={case.vocab}", f"dtype={case.dtype}", f"reduction={case.reduction}"]
    defaults = {f.name: f.default for f in dataclasses.fields(Case) if f.default is not dataclasses.MISSING}
    for key, (name, _) in _KEYS.items():
        if key in ("D", "V", "dtype", "reduction", "seed"):
            continue
        value = getattr(case, name)
        if value == defaults[name]:
            continue
        if isinstance(value, bool):
            value = int(value)
        elif isinstance(value, tuple):
            value = "+".join(value)
        parts.append(f"{key}={value}")
    parts.append(f"seed={case.seed}")
    return ",".join(parts)


def parse_case(text: str) -> Case:
    """Parse the one-line form; a malformed string raises a one-line ``HarnessError``."""
    fields: dict = {}
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
            elif key in _KEYS:
                name, parse = _KEYS[key]
                fields[name] = parse(value)
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
    return Case(**fields)


# --- the tensors -------------------------------------------------------------------------------


@dataclass
class Inputs:
    """The tensors of one case, on one device, in the case's dtype (or float64 for the reference).

    ``gradient_inputs`` maps "hidden", "weight" and "bias" to the tensors whose gradients are
    checked (the hidden states of a tied model are not a leaf: their gradient is retained).
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    labels: torch.Tensor
    spec: LossSpec
    upstream: torch.Tensor | None  # gradient of per-token losses (reduction "none"), float64
    gradient_inputs: dict[str, torch.Tensor]
    model: TinyLM | None = None  # tied cases: the model, and the tokens it embeds
    token_ids: torch.Tensor | None = None


def make_labels(case: Case, generator: torch.Generator) -> torch.Tensor:
    """Random labels with the case's ignore pattern; the first and last class (0 and V - 1) are
    always among the labels of the tokens not ignored, when there are two such tokens.

    Kernels get the edges of the vocabulary wrong (a mask off by one, a last partial block): a
    label at each edge puts the one-hot part of the gradient there.
    """
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
    else:
        ignored = torch.zeros(case.tokens, dtype=torch.bool)
    kept = (~ignored).view(-1).nonzero().flatten()
    if len(kept) >= 2:
        first, last = kept[torch.randperm(len(kept), generator=generator)[:2]]
        labels.view(-1)[first], labels.view(-1)[last] = 0, case.vocab - 1
    if 0 <= case.ignore_index < case.vocab:  # an in-range ignore_index must only mark ignored tokens
        labels[labels == case.ignore_index] = (case.ignore_index + 1) % case.vocab
    return labels.masked_fill(ignored, case.ignore_index)


def make_inputs(case: Case, *, device: str = "cpu", reference: bool = False) -> Inputs:
    """Build the case's tensors from its seed; ``reference=True`` gives their exact float64 copies."""
    generator = torch.Generator().manual_seed(case.seed)
    dtype = case.torch_dtype
    labels = make_labels(case, generator)
    class_weight = torch.rand(case.vocab, generator=generator) * 1.5 + 0.5 if case.class_weight else None
    upstream = None
    if case.reduction == "none":  # multiples of 1/4: exact in every dtype, so all see the same upstream
        upstream = torch.randint(-8, 9, case.tokens, generator=generator).double() / 4
    if class_weight is not None:
        class_weight = class_weight.to(device, torch.float64 if reference else torch.float32)
    spec = case.spec(class_weight)
    labels = labels.to(device)

    if case.tied:
        model = TinyLM(case.vocab, case.dim, tied=True, bias=case.bias, dtype=dtype, seed=case.seed)
        if reference:
            model = model.double()
        model = model.to(device)
        token_ids = torch.randint(0, case.vocab, case.tokens, generator=generator).to(device)
        hidden = model.hidden_states(token_ids)
        hidden.retain_grad()
        gradient_inputs = {"hidden": hidden, "weight": model.head_weight}
        if model.head_bias is not None:
            gradient_inputs["bias"] = model.head_bias
        return Inputs(
            hidden, model.head_weight, model.head_bias, labels, spec, upstream, gradient_inputs, model, token_ids
        )

    work_dtype = torch.float64 if reference else dtype
    hidden = torch.randn(*case.tokens, case.dim, generator=generator, dtype=torch.float64)
    weight = torch.randn(case.vocab, case.dim, generator=generator, dtype=torch.float64) * (case.scale / case.dim**0.5)
    bias = torch.randn(case.vocab, generator=generator, dtype=torch.float64) * (case.scale / 2) if case.bias else None
    # Round to the case's dtype first, so the reference sees exactly the candidate's inputs.
    hidden, weight = (t.to(dtype).to(device, work_dtype) for t in (hidden, weight))
    bias = None if bias is None else bias.to(dtype).to(device, work_dtype)
    if case.strided and not reference:
        hidden, weight, bias, labels = (None if t is None else strided_copy(t) for t in (hidden, weight, bias, labels))
    tensors = {"hidden": hidden, "weight": weight, "bias": bias}
    gradient_inputs = {}
    for name, tensor in tensors.items():
        if tensor is not None and name in case.grads:
            tensor.requires_grad_()
            gradient_inputs[name] = tensor
    return Inputs(hidden, weight, bias, labels, spec, upstream, gradient_inputs)


def strided_copy(tensor: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view into a larger buffer: every other element of the
    last axis. That is the layout of labels shifted by one (``labels[:, 1:]``), of hidden states
    sliced from a wider activation, of a weight packed with others; a kernel that reads its inputs
    through the data pointer as if they were contiguous reads the gaps instead."""
    buffer = tensor.new_zeros(*tensor.shape[:-1], 2 * tensor.shape[-1])
    buffer[..., ::2] = tensor
    return buffer[..., ::2]
