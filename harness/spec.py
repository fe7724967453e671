"""What an LM-head loss computes: the options (``LossSpec``), its result (``LossOutput``), input checks.

The arithmetic itself lives in ``harness.semantics``; this module only describes and validates.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from harness.errors import HarnessError

REDUCTIONS = ("mean", "sum", "none")
NORMS = ("layernorm", "rmsnorm")  # the pre-projection norms a head may have (see the "norm" option)

@dataclass(frozen=True)
class Option:
    """One loss option, declared once: every table of the harness is derived from these.

    ``kind`` says what a value is: ``flag`` (an input that is there or not: a bias, class weights),
    ``int``, ``float``, ``optional_float`` (``None`` is off) or ``choice`` (one of ``values``, or
    ``None``: off). ``spec_field`` is the ``LossSpec``
    field it sets (None for the flags: a case says whether the tensor exists). ``values`` are the
    strong settings examples and Hypothesis use, the first also support probes; ``aliases`` are
    older names case files and case lines still accept.
    """

    name: str
    kind: str
    default: object
    values: tuple
    meaning: str
    spec_field: str | None = None
    aliases: tuple[str, ...] = ()
    acts_on_ignored_tokens: bool = False  # only visible when some tokens are ignored

    def parse(self, text: str) -> object:
        """The value of a ``key=value`` string (command line, one-line case); ValueError if malformed."""
        if self.kind == "flag":
            return parse_flag(text)
        if self.kind == "int":
            return int(text)
        if self.kind in ("optional_float", "choice") and text.lower() == "none":
            return None
        if self.kind == "choice":
            return self._choice(text)
        return float(text)

    def _choice(self, value: str) -> str:
        if value not in self.values:
            raise ValueError(f"expected one of {', '.join(self.values)}")
        return value

    def from_toml(self, value: object) -> object:
        """The value of a case file's ``options`` entry; ValueError naming what was expected."""
        if self.kind == "flag":
            if not isinstance(value, bool):
                raise ValueError("expected true or false")
            return value
        if self.kind == "choice":
            if not isinstance(value, str):
                raise ValueError(f"expected one of {', '.join(self.values)}")
            return self._choice(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("expected a number")
        if self.kind == "int":
            if not isinstance(value, int):
                raise ValueError("expected an integer")
            return value
        return float(value)


def parse_flag(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes"):
        return True
    if lowered in ("0", "false", "no"):
        return False
    raise ValueError(f"expected 0 or 1, got {text!r}")


# The options, in the order tables list them: the head's (in the order it applies them), then the
# loss's. Values: logits of size 16 against a softcap of 5
# make the cap bite; ignore_index -1 is negative, 0 a real class id; a loss_div_factor below 1
# scales up.
OPTION_DECLARATIONS = (
    Option("norm", "choice", None, NORMS, "a norm of the hidden states before the projection, "
           "with a learned `(D,)` weight: `layernorm` also has a `(D,)` bias (GPT-2's `ln_f`, OLMo-core's "
           "`LayerNorm`), `rmsnorm` has none (Llama's and Gemma's final norm)", spec_field="norm"),
    Option("bias", "flag", False, (True,), "a `(V,)` bias added to the logits"),
    Option("class_scale", "flag", False, (True,), "a learned `(V,)` scale of each class's logit, after the bias "
           "(nGPT's `sz`: OLMo-core's `NormalizedLMHead`)"),
    Option("ignore_index", "int", -100, (-1, 0), "label value whose tokens contribute nothing to loss or gradients",
           spec_field="ignore_index", acts_on_ignored_tokens=True),
    Option("label_smoothing", "float", 0.0, (0.1, 0.5), "PyTorch's definition (a mixture with the uniform "
           "distribution)", spec_field="label_smoothing"),
    Option("z_loss", "float", 0.0, (1e-3, 1e-2), "adds `m · logsumexp(logits)²` per token not ignored, reduced like "
           "the loss (never class-weighted); also reported separately", spec_field="z_loss_multiplier",
           aliases=("z_loss_multiplier",)),
    Option("logit_scale", "float", 1.0, (0.125, 4.0), "multiplies the logits after the class scale, before the softcap "
           "(Cohere's `logit_scale`; Granite divides by `logits_scaling`)", spec_field="logit_scale"),
    Option("softcap", "optional_float", None, (5.0, 30.0), "logits become `cap · tanh(logits / cap)` before the "
           "softmax (Gemma 2: 30)", spec_field="softcap"),
    Option("loss_div_factor", "float", 1.0, (3.0, 0.5), "divides the reduced loss (gradient accumulation, HF's "
           "`num_items_in_batch`)", spec_field="loss_div_factor"),
    Option("class_weight", "flag", False, (True,), "PyTorch's `weight`, a `(V,)` tensor"),
)
OPTION_BY_NAME = {option.name: option for option in OPTION_DECLARATIONS}
OPTIONS = tuple(OPTION_BY_NAME)

# The options of the first contract: an adapter that lists no options supports these. An option
# added since is supported only by the adapters that list it by name, so an adapter written
# before it existed never claims it.
ORIGINAL_OPTIONS = (
    "bias",
    "ignore_index",
    "label_smoothing",
    "z_loss",
    "softcap",
    "loss_div_factor",
    "class_weight",
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the machine epsilon: the largest relative error of rounding one value to ``dtype``."""
    return torch.finfo(dtype).eps / 2


def underflow(dtype: torch.dtype) -> float:
    """Half the smallest subnormal of ``dtype``: the absolute error of rounding a value near zero."""
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps / 2


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise HarnessError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}") from None


@dataclass(frozen=True)
class LossSpec:
    """Options of the LM-head loss. The defaults are PyTorch's ``F.cross_entropy`` defaults.

    ``reduction`` is ``mean`` (over tokens not ignored; over the sum of their class weights when
    ``class_weight`` is given), ``sum``, or ``none`` (per-token, 0 at ignored positions). Every other
    field is the ``spec_field`` of one ``Option`` in ``OPTION_DECLARATIONS``, which says what it
    means, or one of its tensors, compared by identity: ``class_weight`` (V,), and the head's own
    parameters besides its weight and bias, ``norm_weight`` and ``norm_bias`` (D,) and
    ``class_scale`` (V,). The parameters travel in the spec, as the class weights do, so that the
    contract keeps one signature for a bare loss kernel and for a whole head.
    """

    reduction: str = "mean"
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss_multiplier: float = 0.0
    softcap: float | None = None
    loss_div_factor: float = 1.0
    class_weight: torch.Tensor | None = field(default=None, compare=False, repr=False)
    logit_scale: float = 1.0
    norm: str | None = None
    norm_eps: float = 1e-5  # the norm's epsilon (OLMo-core's and PyTorch's default; HF configs say theirs)
    norm_weight: torch.Tensor | None = field(default=None, compare=False, repr=False)
    norm_bias: torch.Tensor | None = field(default=None, compare=False, repr=False)
    class_scale: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise HarnessError(f"unknown reduction {self.reduction!r}; expected one of {', '.join(REDUCTIONS)}")
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise HarnessError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")
        if not math.isfinite(self.z_loss_multiplier) or self.z_loss_multiplier < 0:
            raise HarnessError(f"z_loss_multiplier must be finite and >= 0, got {self.z_loss_multiplier}")
        if not (math.isfinite(self.logit_scale) and self.logit_scale > 0):
            raise HarnessError(f"logit_scale must be a positive number, got {self.logit_scale}")
        if self.softcap is not None and not (math.isfinite(self.softcap) and self.softcap > 0):
            raise HarnessError(f"softcap must be a positive number or None, got {self.softcap}")
        if not (math.isfinite(self.loss_div_factor) and self.loss_div_factor > 0):
            raise HarnessError(f"loss_div_factor must be a positive number, got {self.loss_div_factor}")
        if self.norm not in (None, *NORMS):
            raise HarnessError(f"unknown norm {self.norm!r}; expected one of {', '.join(NORMS)} or None")
        if not (math.isfinite(self.norm_eps) and self.norm_eps >= 0):
            raise HarnessError(f"norm_eps must be a finite number >= 0, got {self.norm_eps}")
        if self.norm is None and (self.norm_weight is not None or self.norm_bias is not None):
            raise HarnessError("norm_weight and norm_bias need a norm (norm=layernorm or rmsnorm)")
        for name in ("class_weight", "norm_weight", "norm_bias", "class_scale"):
            tensor = getattr(self, name)
            if tensor is not None and (not isinstance(tensor, torch.Tensor) or tensor.dim() != 1):
                raise HarnessError(f"{name} must be a 1-D tensor")

    def options_used(self, *, has_bias: bool) -> frozenset[str]:
        """The names from ``OPTIONS`` this spec (and a bias, if given) actually exercises."""
        used = {"bias"} if has_bias else set()
        for tensor_option in ("class_weight", "class_scale"):
            if getattr(self, tensor_option) is not None:
                used.add(tensor_option)
        for option in OPTION_DECLARATIONS:
            if option.spec_field is not None and getattr(self, option.spec_field) != option.default:
                used.add(option.name)
        return frozenset(used)

    def describe(self) -> str:
        """A compact ``key=value`` list of the non-default options, for tables and reproducers."""
        parts = [f"reduction={self.reduction}"]
        for f in dataclasses.fields(self):
            if f.name == "reduction" or not f.compare or (f.name == "norm_eps" and self.norm is None):
                continue
            value = getattr(self, f.name)
            if value != f.default:
                parts.append(f"{f.name}={value}")
        for tensor_option in ("class_scale", "class_weight"):
            if getattr(self, tensor_option) is not None:
                parts.append(f"{tensor_option}=<tensor>")
        return ", ".join(parts)

    def replace(self, **changes) -> LossSpec:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class LossOutput:
    """What an implementation returns: the loss (already including any z-loss) and, separately,
    the z-loss term for logging (``None`` when the implementation cannot report it)."""

    loss: torch.Tensor
    z_loss: torch.Tensor | None = None


def known_choices(what: str, given, known: tuple[str, ...], *, empty_allowed: bool = False) -> tuple[str, ...]:
    """``given`` (one name or several; None: all of ``known``) as a tuple without repeats;
    ``HarnessError`` for a name ``known`` lacks, or for none at all unless ``empty_allowed``."""
    if given is None:
        return known
    chosen = tuple(dict.fromkeys([given] if isinstance(given, str) else given))
    unknown = [value for value in chosen if value not in known]
    if unknown:
        raise HarnessError(f"unknown {what} {unknown[0]!r}; expected some of {', '.join(known)}")
    if not chosen and not empty_allowed:
        raise HarnessError(f"no {what} given; expected some of {', '.join(known)}")
    return chosen


def validate_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    spec: LossSpec,
    bias: torch.Tensor | None = None,
    *,
    check_label_values: bool = True,
) -> None:
    """Raise a one-line ``HarnessError`` naming the first problem with these inputs."""
    if hidden.dim() not in (2, 3):
        raise HarnessError(f"hidden must be (N, D) or (B, T, D), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise HarnessError(f"head weight must be (V, D), got shape {tuple(weight.shape)}")
    vocab, dim = weight.shape
    if hidden.shape[-1] != dim:
        raise HarnessError(
            f"hidden size mismatch: hidden is {tuple(hidden.shape)} but head weight is {tuple(weight.shape)}"
        )
    if vocab == 0:
        raise HarnessError("head weight has an empty vocabulary (V = 0)")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise HarnessError(f"hidden ({hidden.dtype}) and head weight ({weight.dtype}) must share one floating dtype")
    if hidden.device != weight.device:
        raise HarnessError(f"hidden is on {hidden.device} but head weight is on {weight.device}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise HarnessError(
            f"labels shape {tuple(labels.shape)} does not match hidden {tuple(hidden.shape)}; "
            f"expected {tuple(hidden.shape[:-1])}"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise HarnessError(f"labels must be int64 (or int32) class indices, got {labels.dtype}")
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise HarnessError(f"bias must have shape ({vocab},), got {tuple(bias.shape)}")
    for name, size in (("class_weight", vocab), ("class_scale", vocab), ("norm_weight", dim), ("norm_bias", dim)):
        tensor = getattr(spec, name)
        if tensor is not None and tuple(tensor.shape) != (size,):
            raise HarnessError(f"{name} must have shape ({size},), got {tuple(tensor.shape)}")
    if check_label_values and labels.numel():
        bad = (labels != spec.ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            position = int(bad.flatten().nonzero()[0])
            value = int(labels.flatten()[position])
            raise HarnessError(
                f"label {value} at flat position {position} is out of range for vocabulary size {vocab} "
                f"(ignore_index is {spec.ignore_index})"
            )
