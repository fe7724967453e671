"""Known failures and limitations of peer packages, declared beside each adapter.

An adapter lists what is known to be wrong with the package it wraps (``Implementation.known_issues``);
the gate excuses exactly that, on built-in implementations only (a plugin cannot take a built-in's
name, ``harness.registry``), and shows it as a known failure with a reproducer. Three kinds:

- ``KnownFailure``: a structural failure, matched by its signature: the exact shape of the
  mismatch (``matches``: a missing gradient, the retained-graph bug's ``(c + c^2) g``, a model of
  the peer's arithmetic), or the exact error it raises (``raises``: two packages that do not work
  together). Anything else that differs still fails.
- ``KnownImprecision``: a known loss of precision, as data: on the listed properties, dtypes and
  tensors, an error up to ``max_ratio`` times the gate's budget is excused, and nothing beyond. At
  most one applies to a comparison (``harness.registry`` refuses overlapping rows), so its bound is
  what the findings page shows.
- ``KnownLimitation``: documented behaviour that refuses a case loudly: an error of a given type
  whose message contains a given text makes the case "refused", counted and shown; any other error
  still fails.

Each entry's ``example`` ("property: case") shows it: the test suite expects exactly its status
there, so a fix (a pass) or a new bug (a fail) shows up, and the entry is updated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from harness.case import Case


@dataclass(frozen=True)
class Mismatch:
    """One compared tensor out of bounds, with the evidence a signature reads.

    ``expected`` is what the tensor should have been: the reference, or the other side of an
    identity. ``actual`` is None when no gradient arrived. ``allowed`` is the gate's allowance
    (``harness.check.tolerance.Allowance``).
    """

    property_id: str
    case: Case
    tensor: str
    message: str
    actual: torch.Tensor | None = None
    expected: torch.Tensor | None = None
    allowed: object | None = None
    terms: torch.Tensor | None = None
    loss_scale: float = 1.0
    identity: bool = False  # two results of the candidate compared (an identity), not one with the reference


@dataclass(frozen=True)
class KnownFailure:
    """A structural failure of a peer, by its signature (``matches``) or by the error it raises."""

    reason: str  # what is wrong, where in the peer's code, and since when
    signature: str  # what a matching mismatch looks like, in one line
    example: str  # "property: case" that shows it
    package: str  # "name version" of the package at fault
    matches: Callable[[Mismatch], bool] | None = None
    raises: tuple[str, str] | None = None  # (the exception's class name, a text its message contains)
    devices: tuple[str, ...] = ()  # where it shows; empty: everywhere
    fixed_in: str | None = None  # the package version that fixes it (the findings page says so)

    def explains_error(self, exc: BaseException) -> bool:
        return self.raises is not None and type(exc).__name__ == self.raises[0] and self.raises[1] in str(exc)


@dataclass(frozen=True)
class KnownImprecision:
    """A known loss of precision: up to ``max_ratio`` times the budget on these comparisons.

    ``requires`` names case options that must be on for it to apply (``softcap``, ``bias``, ...);
    empty ``properties`` means every property that compares with the reference or an identity.
    """

    reason: str
    example: str
    package: str
    dtypes: tuple[str, ...]
    tensors: tuple[str, ...]
    max_ratio: float
    properties: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    fixed_in: str | None = None

    @property
    def signature(self) -> str:
        where = f" with {', '.join(self.requires)}" if self.requires else ""
        return (f"{'/'.join(self.dtypes)}{where}: {', '.join(self.tensors)} off by up to {self.max_ratio:g} x "
                f"the gate's budget")

    def applies(self, property_id: str, case: Case, tensor: str) -> bool:
        return (
            case.dtype in self.dtypes
            and tensor in self.tensors
            and (not self.properties or property_id in self.properties)
            and all(case.option(name) for name in self.requires)
        )


@dataclass(frozen=True)
class KnownLimitation:
    """A documented refusal: the error it raises makes the case refused, with this reason."""

    reason: str
    properties: tuple[str, ...]
    error_type: str  # the exception's class name
    message: str  # a text the exception's message contains
    package: str
    case: str = "N=6,D=5,V=33,seed=10"  # a case of its first property that shows it (the tests run it)
    devices: tuple[str, ...] = ()
    fixed_in: str | None = None

    def matches(self, property_id: str, exc: BaseException) -> bool:
        return property_id in self.properties and type(exc).__name__ == self.error_type and self.message in str(exc)


KnownIssue = KnownFailure | KnownImprecision | KnownLimitation


def on_device(entries: tuple[KnownIssue, ...], device: str) -> tuple[KnownIssue, ...]:
    """The entries that show on ``device``."""
    return tuple(e for e in entries if not e.devices or device in e.devices)


def overlapping_imprecisions(entries: tuple[KnownIssue, ...]) -> list[tuple[str, str, str]]:
    """(property, dtype, tensor) cells that two imprecision rows of one implementation both cover on
    some device: at most one row may apply to a comparison (a case can have every option on at once,
    so ``requires`` does not separate rows)."""
    rows = [e for e in entries if isinstance(e, KnownImprecision)]
    overlaps = []
    for i, first in enumerate(rows):
        for second in rows[i + 1:]:
            if first.devices and second.devices and not set(first.devices) & set(second.devices):
                continue
            if first.properties and second.properties:
                properties = sorted(set(first.properties) & set(second.properties))
            else:
                properties = list(first.properties or second.properties or ("every property",))
            overlaps += [(p, d, t) for p in properties for d in sorted(set(first.dtypes) & set(second.dtypes))
                         for t in sorted(set(first.tensors) & set(second.tensors))]
    return overlaps
