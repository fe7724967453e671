"""The behaviour matrix: what each implementation does on edge cases where implementations may
legitimately differ. It is recorded, never judged.

Each edge case runs with ``validate=False`` (the harness's own label check is off), forward then
backward, and is described in a few words ("loss nan; grads nan", "error (IndexError)", "loss
finite = reference; grads finite"), with the details beside it.

Edge cases run in a child process per implementation (``python -m harness.check.behaviour``,
see ``harness.isolation``): an out-of-range label can crash a process or, on a GPU, poison its
CUDA context; a crash or a timeout is then recorded as such, a poisoned context ends the child
after the edge case that poisoned it, and the remaining edge cases run in a fresh child.
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from harness.case import Inputs
from harness.errors import UnsupportedCase
from harness.isolation import FATAL_EXIT_STATUS, Limits, child_report, is_fatal, run_items
from harness.semantics import reference_loss
from harness.spec import LossSpec

EDGE_CASE_TIMEOUT_S = 300


@dataclass(frozen=True)
class EdgeCase:
    id: str
    summary: str
    build: Callable[[str], Inputs]


def _edge_inputs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, spec: LossSpec) -> Inputs:
    """Inputs no ``Case`` describes (labels out of range, NaNs, no tokens): without bias or upstream."""
    return Inputs(hidden, weight, None, labels, spec, None, {})


def _standard(device: str, *, tokens: int = 4, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, 8, generator=generator).to(device, dtype)
    weight = (torch.randn(32, 8, generator=generator) / 8**0.5).to(device, dtype)
    labels = torch.randint(0, 32, (tokens,), generator=generator).to(device)
    return hidden, weight, labels


def _all_ignored(device: str) -> Inputs:
    hidden, weight, labels = _standard(device)
    return _edge_inputs(hidden, weight, torch.full_like(labels, -100), LossSpec(reduction="mean"))


def _label(value: int) -> Callable[[str], Inputs]:
    def build(device: str) -> Inputs:
        hidden, weight, labels = _standard(device)
        labels[1] = value
        return _edge_inputs(hidden, weight, labels, LossSpec())

    return build


def _hidden_with(value: float) -> Callable[[str], Inputs]:
    def build(device: str) -> Inputs:
        hidden, weight, labels = _standard(device)
        hidden[1, 2] = value
        return _edge_inputs(hidden, weight, labels, LossSpec())

    return build


def _empty_batch(device: str) -> Inputs:
    hidden, weight, labels = _standard(device, tokens=0)
    return _edge_inputs(hidden, weight, labels, LossSpec())


def _float16_overflow(device: str) -> Inputs:
    # 8 * 96 * 96 = 73728 > 65504: class 0's logit does not fit in float16 for tokens 0 and 1.
    hidden, weight, labels = _standard(device, dtype=torch.float32)
    hidden[:2] = 96.0
    weight[0] = 96.0
    labels[:3] = torch.tensor([0, 5, 0])
    return _edge_inputs(hidden.half(), weight.half(), labels, LossSpec())


EDGE_CASES = (
    EdgeCase("all-ignored-mean", "every label is ignore_index, reduction=mean (0/0)", _all_ignored),
    EdgeCase("label-equals-vocab", "one label equals V (out of range), reduction=mean", _label(32)),
    EdgeCase("label-negative", "one label is -5 (negative, not ignore_index)", _label(-5)),
    EdgeCase("nan-in-hidden", "one hidden-state element is NaN", _hidden_with(float("nan"))),
    EdgeCase("inf-in-hidden", "one hidden-state element is +Inf", _hidden_with(float("inf"))),
    EdgeCase("empty-batch", "N = 0 tokens, reduction=mean", _empty_batch),
    EdgeCase("float16-logit-overflow", "float16 inputs whose logits exceed 65504 (the reference is finite)",
             _float16_overflow),
)
EDGE_CASE_IDS = tuple(e.id for e in EDGE_CASES)


@dataclass(frozen=True)
class BehaviourResult:
    implementation: str
    edge_case: str
    behaviour: str
    detail: str

    def row(self) -> dict:
        return {"implementation": self.implementation, "edge_case": self.edge_case,
                "behaviour": self.behaviour, "detail": self.detail}


def _error(exc: BaseException) -> str:
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message[:300]}"


def _classify(tensor: torch.Tensor) -> str:
    if tensor.numel() == 0:
        return "empty"
    values = tensor.detach().double().cpu()
    if bool(values.isnan().any()):
        return "nan"
    if bool(values.isinf().any()):
        return "inf"
    if bool((values == 0).all()):
        return "0"
    return "finite"


def probe(impl, edge: EdgeCase, device: str) -> tuple[str, str]:
    """(behaviour, detail) of one implementation on one edge case."""
    inputs = edge.build(device)
    hidden = inputs.hidden.clone().requires_grad_()
    weight = inputs.weight.clone().requires_grad_()
    try:
        # On the CPU whatever the device: the reference is defined there (CUDA inputs meeting CPU
        # labels would read as "undefined").
        reference = reference_loss(inputs.hidden.cpu(), inputs.weight.cpu(), inputs.labels.cpu(), inputs.spec).loss
        reference_text = f"reference {reference.item():.6g}" if reference.numel() == 1 else "reference computed"
    except Exception as exc:  # noqa: BLE001 - e.g. an out-of-range label: the reference is undefined
        reference, reference_text = None, f"reference undefined ({type(exc).__name__})"
    try:
        out = impl.loss(hidden, weight, inputs.labels, inputs.spec, validate=False)
        loss = out.loss
        loss_class = _classify(loss)
    except UnsupportedCase as exc:
        return "unsupported", str(exc)
    except Exception as exc:  # noqa: BLE001 - an error is one of the behaviours recorded
        return f"error ({type(exc).__name__})", _error(exc)
    value_text = f"loss {loss.item():.6g}" if loss.numel() == 1 else f"loss of shape {tuple(loss.shape)}"
    if loss_class == "finite" and reference is not None and bool(reference.isfinite().all()):
        close = torch.allclose(loss.detach().double().cpu(), reference, rtol=1e-2, atol=1e-3)
        loss_class = "finite = reference" if close else "finite, differs from reference"
    if reference is None:  # the input has no defined loss, yet the implementation returned one
        loss_class = f"{loss_class} (no error)"
    try:
        loss.sum().backward()
        grads = [t.grad for t in (hidden, weight)]
        if any(g is None for g in grads):
            grad_class = "missing"
        else:
            classes = {_classify(g) for g in grads}
            grad_class = next((c for c in ("nan", "inf", "finite", "0", "empty") if c in classes), "finite")
    except Exception as exc:  # noqa: BLE001
        grad_class = f"backward error ({type(exc).__name__})"
        return f"loss {loss_class}; {grad_class}", f"{value_text}, {reference_text}; backward: {_error(exc)}"
    return f"loss {loss_class}; grads {grad_class}", f"{value_text}, {reference_text}"


# --- running in a child process ---------------------------------------------------------------


def run_behaviour(
    given: str, device: str, *, limits: Limits = Limits(timeout_s=EDGE_CASE_TIMEOUT_S),
    env: dict[str, str] | None = None, cancel: threading.Event | None = None,
) -> Iterator[BehaviourResult]:
    """Yield the behaviour of implementation ``given`` on every edge case, as each finishes (the
    time limit is per edge case)."""
    args = ["--impl", given, "--device", device]
    edge_cases = list(EDGE_CASE_IDS)
    for outcome in run_items("harness.check.behaviour", args, edge_cases, limits=limits, env=env, cancel=cancel):
        if outcome.record is None:
            yield BehaviourResult(given, outcome.item, outcome.failure, outcome.detail)
        else:
            yield BehaviourResult(given, outcome.item, outcome.record["behaviour"], outcome.record["detail"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="behaviour-matrix worker (one implementation)")
    parser.add_argument("report", help="the file the messages are appended to")
    parser.add_argument("--impl", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("edge_cases", nargs="+", choices=EDGE_CASE_IDS)
    args = parser.parse_args(argv)

    from harness.registry import resolve

    report = child_report(args.report)
    impl = resolve(args.impl)
    by_id = {e.id: e for e in EDGE_CASES}
    for edge_id in args.edge_cases:
        report.send({"started": edge_id})
        behaviour, detail = probe(impl, by_id[edge_id], args.device)
        report.send({"item": edge_id, "behaviour": behaviour, "detail": detail})
        if is_fatal(detail):  # e.g. a device-side assert on an out-of-range label: the rest need a fresh process
            return FATAL_EXIT_STATUS
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
