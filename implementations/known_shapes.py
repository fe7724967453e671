"""Shapes of a failure that several peers share, for their known issues (``harness.known``).

Liger-Kernel's losses and fla-core's (adapted from Liger's) compute the gradients in the forward,
save them, and in backward multiply the saved buffers by the upstream gradient in place. A second
backward through a retained graph then scales them again: two backwards of ``c * loss`` give
``c g + c^2 g`` where ``2 c g`` was due, or ``2 c^2 g`` for a tensor whose ``.grad`` autograd made
the saved buffer itself (it then holds ``c^2 g`` and receives ``c^2 g`` again). Here ``c`` is
the upstream gradient at the peer's own output: the property's loss scale divided by the case's
``loss_div_factor``, which the harness applies after the peer.
"""

from __future__ import annotations

import dataclasses

from harness.known import Mismatch


def within(m: Mismatch, factor: float) -> bool:
    """The actual tensor is ``factor`` times the expected one, within the allowance scaled alike."""
    from harness.check.tolerance import mismatch

    if m.actual is None or m.expected is None or m.allowed is None:
        return False
    allowed = dataclasses.replace(m.allowed, bound=m.allowed.bound * factor, norm=m.allowed.norm * factor)
    return mismatch(m.tensor, m.actual, m.expected * factor, allowed) is None


def second_backward_rescales_the_saved_gradient(m: Mismatch) -> bool:
    """Retain-graph, mean or sum: each gradient is ``(c + c^2) g`` or ``2 c^2 g`` where ``2 c g`` was due."""
    if m.property_id != "autograd/retain-graph" or m.case.reduction not in ("mean", "sum"):
        return False
    if not m.tensor.startswith("grad_"):
        return False
    c = upstream_at_the_peer(m)
    return within(m, (1 + c) / 2) or within(m, c)


def upstream_at_the_peer(m: Mismatch) -> float:
    """The gradient reaching the peer's loss in backward: the loss scale over the loss_div_factor
    (applied by the harness after the peer, for the adapters of these peers)."""
    return m.loss_scale / (m.case.option("loss_div_factor") or 1.0)
