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

# The option vocabulary every implementation declares its support in. "bias" is an input, not a
# spec field, but users choose implementations by it just the same.
#
# ORIGINAL_OPTIONS are those of the first contract: an adapter that lists no options supports
# them. An option added since is supported only by the adapters that list it by name, so an
# adapter written before it existed never claims it.
ORIGINAL_OPTIONS = (
    "bias",
    "ignore_index",
    "label_smoothing",
    "z_loss",
    "softcap",
    "loss_div_factor",
    "class_weight",
)
OPTIONS = ORIGINAL_OPTIONS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise HarnessError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}") from None


@dataclass(frozen=True)
class LossSpec:
    """Options of the LM-head loss. The defaults are PyTorch's ``F.cross_entropy`` defaults.

    - ``reduction``: ``mean`` (over tokens not ignored; over the sum of their class weights when
      ``class_weight`` is given), ``sum``, or ``none`` (per-token, 0 at ignored positions).
    - ``ignore_index``: label value whose tokens contribute nothing to loss or gradients.
    - ``label_smoothing``: PyTorch's definition (mixture with the uniform distribution).
    - ``z_loss_multiplier``: adds ``m * logsumexp(logits)**2`` per token not ignored, reduced like
      the loss but never class-weighted (mean divides by the number of tokens not ignored).
    - ``softcap``: logits become ``cap * tanh(logits / cap)`` before the softmax.
    - ``loss_div_factor``: the reduced loss (and z-loss) is divided by it, e.g. Hugging Face's
      ``num_items_in_batch`` for gradient accumulation.
    - ``class_weight``: PyTorch's ``weight``; a ``(V,)`` tensor, compared by identity.
    """

    reduction: str = "mean"
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss_multiplier: float = 0.0
    softcap: float | None = None
    loss_div_factor: float = 1.0
    class_weight: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise HarnessError(f"unknown reduction {self.reduction!r}; expected one of {', '.join(REDUCTIONS)}")
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise HarnessError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")
        if not math.isfinite(self.z_loss_multiplier) or self.z_loss_multiplier < 0:
            raise HarnessError(f"z_loss_multiplier must be finite and >= 0, got {self.z_loss_multiplier}")
        if self.softcap is not None and not (math.isfinite(self.softcap) and self.softcap > 0):
            raise HarnessError(f"softcap must be a positive number or None, got {self.softcap}")
        if not (math.isfinite(self.loss_div_factor) and self.loss_div_factor > 0):
            raise HarnessError(f"loss_div_factor must be a positive number, got {self.loss_div_factor}")
        if self.class_weight is not None and (
            not isinstance(self.class_weight, torch.Tensor) or self.class_weight.dim() != 1
        ):
            raise HarnessError("class_weight must be a 1-D tensor of shape (V,)")

    def options_used(self, *, has_bias: bool) -> frozenset[str]:
        """The names from ``OPTIONS`` this spec (and a bias, if given) actually exercises."""
        used = set()
        if has_bias:
            used.add("bias")
        if self.ignore_index != -100:
            used.add("ignore_index")
        if self.label_smoothing:
            used.add("label_smoothing")
        if self.z_loss_multiplier:
            used.add("z_loss")
        if self.softcap is not None:
            used.add("softcap")
        if self.loss_div_factor != 1.0:
            used.add("loss_div_factor")
        if self.class_weight is not None:
            used.add("class_weight")
        return frozenset(used)

    def describe(self) -> str:
        """A compact ``key=value`` list of the non-default options, for tables and reproducers."""
        parts = [f"reduction={self.reduction}"]
        for f in dataclasses.fields(self):
            if f.name in ("reduction", "class_weight"):
                continue
            value = getattr(self, f.name)
            if value != f.default:
                parts.append(f"{f.name}={value}")
        if self.class_weight is not None:
            parts.append("class_weight=<tensor>")
        return ", ".join(parts)

    def replace(self, **changes) -> LossSpec:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class LossOutput:
    """What an implementation returns: the loss (already including any z-loss) and, separately,
    the z-loss term for logging (``None`` when the implementation cannot report it)."""

    loss: torch.Tensor
    z_loss: torch.Tensor | None = None


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
    if spec.class_weight is not None and tuple(spec.class_weight.shape) != (vocab,):
        raise HarnessError(f"class_weight must have shape ({vocab},), got {tuple(spec.class_weight.shape)}")
    if check_label_values and labels.numel():
        bad = (labels != spec.ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            position = int(bad.flatten().nonzero()[0])
            value = int(labels.flatten()[position])
            raise HarnessError(
                f"label {value} at flat position {position} is out of range for vocabulary size {vocab} "
                f"(ignore_index is {spec.ignore_index})"
            )
