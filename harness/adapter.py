"""The contract every LM-head/loss implementation is put behind.

An implementation subclasses ``Implementation`` and provides:

- ``availability()``: can it run on this machine at all, and if not, why (one line);
- ``capabilities(device)``: the dtypes, reductions and options it supports on that device
  (``supported_options``, a positive list), and, for an option it lacks, why
  (``unsupported_options``);
- ``compute(hidden, weight, labels, spec, bias)``: the loss on 2-D inputs.

Callers use ``loss(...)``, which validates the inputs, flattens ``(B, T, D)`` inputs, refuses
unsupported cases with ``UnsupportedCase``, applies ``loss_div_factor`` and restores the
``(B, T)`` shape of per-token losses, so that ``compute`` stays about the kernel alone.

A whole head (a module with its own options, norm and conventions) and a plain-function plugin
set ``takes_batches``: ``compute`` then gets the inputs exactly as the caller gave them, ``(B, T,
D)`` or ``(N, D)``, views and all, and must return per-token losses in the labels' shape (the gate
checks the shape, nothing reshapes it); with ``applies_loss_div_factor`` it divides by
``loss_div_factor`` itself (through its own argument, e.g. HF's ``num_items_in_batch``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from harness.errors import UnsupportedCase
from harness.semantics import head_logits
from harness.spec import OPTIONS, ORIGINAL_OPTIONS, REDUCTIONS, LossOutput, LossSpec, dtype_name, validate_inputs

if TYPE_CHECKING:
    from harness.known import KnownIssue

FAMILIES = ("native", "triton", "cuda", "distributed", "heads", "plugin")  # heads: real modules (OLMo-core, HF)
ALL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Availability:
    """Whether an implementation can run here; ``detail`` says why not, or how it runs."""

    available: bool
    detail: str = ""


@dataclass(frozen=True)
class Capabilities:
    """What an implementation supports on one device.

    ``supported_options`` lists the options from ``harness.spec.OPTIONS`` it supports (None: the
    original seven, ``harness.spec.ORIGINAL_OPTIONS``); anything unlisted is unsupported.
    ``unsupported_options`` says why, for an option it lacks (listed or not: it wins).
    """

    dtypes: tuple[torch.dtype, ...] = ALL_DTYPES
    reductions: tuple[str, ...] = REDUCTIONS
    unsupported_options: dict[str, str] = field(default_factory=dict)
    supported_options: tuple[str, ...] | None = None

    @property
    def options(self) -> tuple[str, ...]:
        listed = ORIGINAL_OPTIONS if self.supported_options is None else self.supported_options
        return tuple(o for o in OPTIONS if o in listed and o not in self.unsupported_options)

    def reasons(self) -> dict[str, str]:
        """Why each option it lacks is unsupported, in ``OPTIONS`` order."""
        supported = self.options
        return {
            o: self.unsupported_options.get(o, "not among the options the implementation declares it supports")
            for o in OPTIONS
            if o not in supported
        }


class Implementation:
    """Base class of every adapter: the contract the gate checks and the sweep measures.

    A subclass sets ``name`` (its own: not a built-in's) and ``compute``, and where they differ
    from the defaults ``family``, ``summary``, ``devices``, ``availability()`` (can it run here at
    all, and why not), ``capabilities(device)`` (the dtypes, reductions and ``harness.spec.OPTIONS``
    it supports there), ``with_chunk_size()``, ``logits()``, ``takes_batches`` and
    ``applies_loss_div_factor``.

    ``compute(hidden, weight, labels, spec, bias)`` gets ``hidden`` ``(N, D)`` and ``weight``
    ``(V, D)`` in one dtype, ``labels`` ``(N,)`` int64 (``spec.ignore_index`` marks the tokens
    that count for nothing), ``bias`` ``(V,)`` or None, and every other option in ``spec`` (a
    ``LossSpec``: class weights, smoothing, z-loss, softcap, logit scale, and a head's norm and
    class scale with their parameters). It returns a ``LossOutput``: the loss reduced as
    ``spec.reduction`` says (``mean`` over the tokens not ignored, class-weighted; ``sum``; or per
    token, 0 where ignored), z-loss included, and the z-loss term alone (or None), in the input
    dtype or float32. What the gate holds it to: the float64 reference's value and gradients
    (``harness.semantics``) within the tolerance of ``harness.check.tolerance``; gradients by
    autograd for exactly the inputs that require grad, scaled by the upstream gradient, twice over
    on a retained graph; the same loss under ``torch.no_grad()``; inputs left unmodified,
    non-contiguous ones included. A case it cannot run is either outside its capabilities (then it
    is never called with it) or refused with ``UnsupportedCase`` and the reason, never run with an
    option silently ignored. ``loss()`` applies ``spec.loss_div_factor`` unless
    ``applies_loss_div_factor``.
    """

    name: str = ""
    family: str = "native"
    summary: str = ""
    devices: tuple[str, ...] = ("cpu", "cuda")
    has_logits_path: bool = True  # ``logits()`` is the implementation's own head (checked by the gate)
    takes_batches: bool = False  # ``compute`` gets (B, T, D) inputs unflattened (a whole head)
    applies_loss_div_factor: bool = False  # ``compute`` divides by ``spec.loss_div_factor`` itself
    # Sweep modes it has no such thing as, with the reason (e.g. a backward run inside the forward).
    unsupported_modes: dict[str, str] = {}

    def availability(self) -> Availability:
        return Availability(True)

    def capabilities(self, device: str) -> Capabilities:
        return Capabilities()

    def compute(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        spec: LossSpec,
        bias: torch.Tensor | None,
    ) -> LossOutput:
        """The loss of ``(N, D)`` hidden against ``(N,)`` labels, ignoring ``spec.loss_div_factor``."""
        raise NotImplementedError

    def known_issues(self, device: str) -> tuple[KnownIssue, ...]:
        """What is known to be wrong with the package behind this adapter on ``device``
        (``harness.known``): the gate excuses exactly that, for built-in implementations only."""
        return ()

    def with_chunk_size(self, chunk_size: int) -> Implementation | None:
        """The same implementation with a fixed token chunk size, or None if it has no such knob."""
        return None

    # --- what callers use -------------------------------------------------------------------

    def unsupported_reason(
        self, spec: LossSpec, *, dtype: torch.dtype, device: str, has_bias: bool
    ) -> str | None:
        """One line saying why this case cannot run here, or None when it can."""
        available = self.availability()
        if not available.available:
            return available.detail
        if device not in self.devices:
            return f"{self.name} does not run on {device} (runs on {', '.join(self.devices)})"
        caps = self.capabilities(device)
        if dtype not in caps.dtypes:
            return f"{self.name} does not support {dtype_name(dtype)} on {device}"
        if spec.reduction not in caps.reductions:
            return f"{self.name} does not support reduction={spec.reduction}"
        reasons = caps.reasons()
        for option in sorted(spec.options_used(has_bias=has_bias)):
            if option in reasons:
                return f"{option}: {reasons[option]}"
        return None

    def loss(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        spec: LossSpec = LossSpec(),
        *,
        bias: torch.Tensor | None = None,
        validate: bool = True,
    ) -> LossOutput:
        """Loss of ``(N, D)`` or ``(B, T, D)`` hidden states through a ``(V, D)`` head.

        Raises ``HarnessError`` for bad inputs (when ``validate``), ``UnsupportedCase`` when this
        implementation cannot run the case here. ``validate=False`` skips the label-range check,
        which synchronises with the GPU; the benchmark and the behaviour matrix use it.
        """
        validate_inputs(hidden, weight, labels, spec, bias, check_label_values=validate)
        reason = self.unsupported_reason(
            spec, dtype=hidden.dtype, device=hidden.device.type, has_bias=bias is not None
        )
        if reason is not None:
            raise UnsupportedCase(reason)
        if self.takes_batches:  # as given: its shapes are its own, and the gate checks them
            out = self.compute(hidden, weight, labels, spec, bias)
        else:
            out = self.compute(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), spec, bias)
        loss, z_loss = out.loss, out.z_loss
        if spec.loss_div_factor != 1.0 and not self.applies_loss_div_factor:
            loss = loss / spec.loss_div_factor
            z_loss = None if z_loss is None else z_loss / spec.loss_div_factor
        if spec.reduction == "none" and not self.takes_batches:
            loss = loss.view(labels.shape)
            z_loss = None if z_loss is None else z_loss.view(labels.shape)
        return LossOutput(loss, z_loss)

    def logits(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        *,
        bias: torch.Tensor | None = None,
        spec: LossSpec | None = None,
        logits_to_keep: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """The head without labels (generation): logits of the positions ``logits_to_keep`` names (the
        last ones for an int, 0 for all; a tensor of positions, see ``harness.semantics.head_logits``),
        under the head's options in ``spec`` (norm, scales, softcap; its loss options play no part)."""
        return head_logits(hidden, weight, bias, spec, logits_to_keep=logits_to_keep)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
