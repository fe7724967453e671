"""What an implementation supports here: declared by its adapter, or discovered by calling a plugin.

Built-in adapters declare their capabilities. A plugin (family "plugin", e.g. a plain function
given as ``module:attr``) may only find out when it runs, by raising ``NotImplementedError``
(``UnsupportedCase``); so each dtype, reduction and option is tried once, alone, on a tiny case.
The checks then draw cases only from what is supported, and a combination that still turns
out unsupported is counted as such, never as a failure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.adapter import Implementation
from harness.case import Case, make_inputs
from harness.errors import UnsupportedCase
from harness.spec import OPTION_DECLARATIONS, REDUCTIONS, dtype_name

@dataclass(frozen=True)
class Support:
    """Dtypes (names), reductions and options one implementation runs here; ``why_not`` says why not."""

    available: bool
    dtypes: tuple[str, ...]
    reductions: tuple[str, ...]
    options: frozenset[str]
    why_not: dict[str, str] = field(default_factory=dict)  # dtype, reduction or option -> reason

    def to_json(self) -> dict:
        return {"available": self.available, "dtypes": list(self.dtypes), "reductions": list(self.reductions),
                "options": sorted(self.options), "why_not": dict(self.why_not)}

    @staticmethod
    def from_json(data: dict) -> Support:
        return Support(data["available"], tuple(data["dtypes"]), tuple(data["reductions"]),
                       frozenset(data["options"]), dict(data["why_not"]))

    def allows(self, case: Case) -> bool:
        return (
            case.dtype in self.dtypes
            and case.reduction in self.reductions
            and case.options_used() <= self.options
        )


def _probe(impl: Implementation, case: Case, device: str) -> str | None:
    """Run the case once; the reason when it raises ``UnsupportedCase``, else None (even on errors:
    a crash is for the properties to report, not a statement about support)."""
    inputs = make_inputs(case, device=device)
    try:
        impl.loss(inputs.hidden, inputs.weight, inputs.labels, inputs.spec, bias=inputs.bias)
    except UnsupportedCase as exc:
        return str(exc)
    except Exception:  # noqa: BLE001 - reported by the properties, with a reproducer
        return None
    return None


def discover_support(impl: Implementation, device: str) -> Support:
    available = impl.availability()
    if not available.available:
        return Support(False, (), (), frozenset(), {"implementation": available.detail})
    if device not in impl.devices:
        reason = f"{impl.name} does not run on {device}"
        return Support(False, (), (), frozenset(), {"implementation": reason})
    caps = impl.capabilities(device)
    why_not = caps.reasons()
    dtypes = [dtype_name(d) for d in caps.dtypes]
    reductions = [r for r in REDUCTIONS if r in caps.reductions]
    options = set(caps.options)
    for dtype in ("float32", "bfloat16", "float16"):
        if dtype not in dtypes:
            why_not[dtype] = f"{impl.name} does not support {dtype} on {device}"
    for reduction in REDUCTIONS:
        if reduction not in reductions:
            why_not[reduction] = f"{impl.name} does not support reduction={reduction}"
    if impl.family == "plugin" and dtypes and reductions:
        base = Case(tokens=(3,), dim=4, vocab=5, dtype=dtypes[0], reduction=reductions[0], seed=0)
        reason = _probe(impl, base, device)
        if reason:  # not even the simplest case runs
            return Support(False, (), (), frozenset(), {"implementation": reason})
        for dtype in list(dtypes[1:]):
            reason = _probe(impl, base.replace(dtype=dtype), device)
            if reason:
                dtypes.remove(dtype)
                why_not[dtype] = reason
        for reduction in list(reductions[1:]):
            reason = _probe(impl, base.replace(reduction=reduction), device)
            if reason:
                reductions.remove(reduction)
                why_not[reduction] = reason
        for option in OPTION_DECLARATIONS:  # one at a time, at its first strong value
            if option.name in options:
                probe = base.replace(**{option.name: option.values[0]})
                if option.acts_on_ignored_tokens:
                    probe = probe.replace(ignored="some")
                reason = _probe(impl, probe, device)
                if reason:
                    options.discard(option.name)
                    why_not[option.name] = reason
    return Support(True, tuple(dtypes), tuple(reductions), frozenset(options), why_not)

