"""Turn implementation names into implementations: built-in names, or ``package.module:attr``.

``attr`` may be an ``Implementation`` (instance or class) or a plain function

    fn(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
       label_smoothing=0.0, z_loss_multiplier=0.0, softcap=None, class_weight=None) -> loss

It gets the inputs exactly as the caller has them: ``(N, D)`` hidden states and ``(N,)`` labels,
or ``(B, T, D)`` and ``(B, T)``, possibly non-contiguous views, and returns a 0-d loss, or with
reduction ``none`` one of exactly the labels' shape.

that raises ``NotImplementedError`` for an option it does not support. It is called with the
keywords of the options a case uses only (and ``reduction``): a function without the keyword of an
option in use cannot run that case, which is then *unsupported*, with that reason. So a plugin
written before an option existed keeps working, and never silently ignores the new option.
"""

from __future__ import annotations

import importlib
import inspect

from harness.adapter import Capabilities, Implementation
from harness.errors import HarnessError, UnsupportedCase
from harness.spec import OPTION_DECLARATIONS, OPTIONS, ORIGINAL_OPTIONS, LossOutput


# A plain function's keyword for each option: its LossSpec field, or for an input its own name.
OPTION_KEYWORDS = {option.name: option.spec_field or option.name for option in OPTION_DECLARATIONS}


class FunctionImplementation(Implementation):
    """Adapter for a plain loss function given as ``module:attr``.

    Its support is discovered when it runs: ``NotImplementedError`` makes a case "unsupported".
    It cannot report the z-loss separately, and ``loss_div_factor`` is applied by the harness.
    """

    family = "plugin"
    has_logits_path = False  # a loss function has no logits path of its own
    takes_batches = True  # it gets (B, T, D) and (B, T) inputs as given, and its output shape is checked

    def __init__(self, name: str, function) -> None:
        self.name = name
        self.function = function
        doc = inspect.getdoc(function) or ""
        self.summary = doc.splitlines()[0] if doc else f"plain function {name}"
        try:
            parameters = inspect.signature(function).parameters.values()
        except (TypeError, ValueError):  # a builtin or C function: assume it takes every keyword
            parameters = ()
            self._any_keyword = True
        else:
            self._any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        self._keywords = frozenset(p.name for p in parameters if p.kind in named)

    def capabilities(self, device: str) -> Capabilities:
        # The options it names a keyword for; a **kwargs function also the first contract's (an
        # option added since must be named, so a plugin written before it keeps working); the
        # support probe then finds what it really does. loss_div_factor is the harness's.
        takes = tuple(o for o in OPTIONS if o != "norm" and (
            o == "loss_div_factor" or OPTION_KEYWORDS[o] in self._keywords or (self._any_keyword and o in ORIGINAL_OPTIONS)))
        by_name = " by name (an option newer than its **kwargs must be named)" if self._any_keyword else ""
        missing = {o: f"{self.name}: takes no {OPTION_KEYWORDS[o]} keyword{by_name}" for o in OPTIONS if o not in takes}
        # A norm is a module with parameters, not a keyword: a loss function starts after it.
        missing["norm"] = f"{self.name}: a plain loss function takes the hidden states after the head's norm"
        return Capabilities(supported_options=takes, unsupported_options=missing)

    def _takes(self, keyword: str) -> bool:
        return self._any_keyword or keyword in self._keywords

    def compute(self, hidden, weight, labels, spec, bias):
        used = spec.options_used(has_bias=bias is not None) - {"loss_div_factor"}  # the harness applies it
        kwargs = {OPTION_KEYWORDS[option]: bias if option == "bias" else getattr(spec, OPTION_KEYWORDS[option])
                  for option in sorted(used)}
        if spec.reduction != "mean" or self._takes("reduction"):
            kwargs["reduction"] = spec.reduction
        missing = [keyword for keyword in kwargs if not self._takes(keyword)]
        if missing:
            raise UnsupportedCase(f"{self.name}: takes no {', '.join(missing)} keyword")
        try:
            loss = self.function(hidden, weight, labels, **kwargs)
        except NotImplementedError as exc:
            raise UnsupportedCase(f"{self.name}: {exc or 'NotImplementedError'}") from None
        return LossOutput(loss, None)


def builtin_names() -> tuple[str, ...]:
    from implementations import builtin_implementations

    return tuple(impl.name for impl in builtin_implementations())


def resolve(name: str) -> Implementation:
    """The implementation called ``name``; ``HarnessError`` with a one-line reason otherwise."""
    from implementations import builtin_implementations

    for impl in builtin_implementations():
        if impl.name == name:
            return impl
    if ":" not in name:
        raise HarnessError(
            f"unknown implementation {name!r}; known: {', '.join(builtin_names())} "
            "(or give a plugin as package.module:attr)"
        )
    return load_plugin(name)


def resolve_many(names: list[str] | None) -> list[Implementation]:
    """Implementations for ``names`` (all built-ins when empty), without duplicates."""
    from implementations import builtin_implementations

    if not names:
        return list(builtin_implementations())
    seen: dict[str, Implementation] = {}
    for name in names:
        impl = resolve(name)
        seen.setdefault(impl.name, impl)
    return list(seen.values())


def load_plugin(spec: str) -> Implementation:
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise HarnessError(f"bad plugin {spec!r}: expected package.module:attr")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise HarnessError(f"cannot import plugin module {module_name!r} for {spec!r}: {exc}") from None
    except Exception as exc:  # a plugin module that fails on import is still the user's input
        raise HarnessError(f"plugin module {module_name!r} failed on import: {type(exc).__name__}: {exc}") from None
    obj = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise HarnessError(f"plugin module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if isinstance(obj, Implementation):
        impl = obj
    elif inspect.isclass(obj) and issubclass(obj, Implementation):
        impl = obj()
    elif callable(obj) and not inspect.isclass(obj):
        return FunctionImplementation(spec, obj)
    else:
        raise HarnessError(
            f"plugin {spec!r} is a {type(obj).__name__}, not an Implementation or a loss function"
        )
    if not impl.name:
        raise HarnessError(f"plugin {spec!r} is an Implementation without a name")
    if impl.name in builtin_names():
        raise HarnessError(
            f"plugin {spec!r} is named {impl.name!r}, the name of a built-in implementation; give it a name of its own"
        )
    return impl
