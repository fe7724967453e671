"""Is what the sweep timed the loss? Each timed job's result against torch-eager's on the same inputs.

A benchmark that only times can crown an implementation that computes the wrong thing quickly, or
that returns an answer it cached on its first call (KernelBench and gpu-mode's KernelBot check
outputs on the timed inputs for this reason). So every mode of every job is checked twice, in the
job's own process and outside its timed region:

- **the result it timed**: the loss (and in ``forward_backward`` and ``backward`` every gradient
  the case asks for) of its first call, against torch-eager's on the same inputs;
- **inputs changed in place**: after timing, the hidden states are rolled by one token in place
  (``changed_inputs``: same values, other pairs of hidden state and label, so another loss and
  another weight gradient), the implementation is called once more, and its result is checked
  against torch-eager's on the changed inputs. A result bit for bit equal to its first one, where
  torch-eager's changed, is a cached answer whatever the tolerance (``cached_answer``).

A mismatch makes the mode's status ``wrong``: it keeps its timings in the results, but no report
names it fastest. torch-eager's own jobs are not checked: it is the reference.

**The cost**, on the CPU machine under load, is about two thirds of a mode's own time again: one
more call of the implementation and two chunked torch-eager forward+backward passes (with one
more forward matmul each for the loss's terms), against its first call, its peak-memory call and
at least three timed ones.

**The reference** is torch-eager itself (``harness.results.BASELINE``) run over the tokens in
chunks (``reference``), so that its memory stays bounded at any vocabulary: the chunk's logits
(``CHUNK_LOGIT_BYTES`` in float32) and one float32 copy of each gradient, never the N x V
logits. Its per-token losses are reduced as ``F.cross_entropy`` reduces them (over the class
weights of the tokens not ignored for a mean), and its gradients are accumulated chunk by chunk.
Everything is compared in full, norm-wise, in blocks of rows (``compare``); not a sample, since
a kernel's bug is often one block of rows (the last partial tile, one class block).

**The allowance** (``relative_allowance``) stands in for the gate's until its tolerance API can be
called from here: see ``SIDE_ROUNDOFFS``. Every built-in that runs on the CPU stays within a fifth
of it (docs/measurements/2026-12-07-sweep-verification.md).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from harness.case import Inputs
from harness.semantics import apply_norm, transform_logits
from harness.spec import LossSpec, unit_roundoff

# Each side, the candidate and torch-eager, may be off the float64 reference by the gate's cap of
# 8 roundoffs of the input dtype in units of the terms (harness.check.tolerance.CAP) plus two
# roundings of its output, so two correct results differ by at most twice that sum.
SIDE_ROUNDOFFS = 8 + 2
# ... plus, on each side, the gate's summation-order floor: SUM_ORDER float32 roundoffs per square
# root of each summation length (harness.check.tolerance.SUM_ORDER).
SUM_ORDER = 4.0
# The gate states its allowance in units of the terms a result is summed from; a gradient's terms
# (|p - y| times |W| or |h|) can be a few times larger than its values in the 2-norm, which this
# factor covers without forming them (the loss's terms are cheap, and computed).
GRADIENT_TERMS_OVER_VALUES = 4.0
CHUNK_LOGIT_BYTES = 64 * 2**20  # float32 logits of one chunk of tokens in the reference
COMPARE_BLOCK_ELEMENTS = 2**24  # rows compared at a time, in float64


@dataclass
class Result:
    """What one call produced: the loss (detached) and the gradients the case asks for (None: none)."""

    loss: torch.Tensor | None
    grads: dict[str, torch.Tensor | None]

    def fingerprint(self) -> tuple:
        """Exact values summarised: equal fingerprints on different inputs mean the same answer."""
        parts = [] if self.loss is None else [tuple(self.loss.detach().double().reshape(-1)[:64].tolist())]
        for name in sorted(self.grads):
            grad = self.grads[name]
            parts.append(None if grad is None else float(grad.detach().double().sum()))
        return tuple(parts)


def result_of(output, inputs: Inputs, mode: str) -> Result:
    """The result of one call of ``mode`` (``output``: its LossOutput, None for ``backward``)."""
    loss = None if output is None else output.loss.detach()
    grads = {} if mode == "forward" else {name: t.grad for name, t in inputs.gradient_inputs.items()}
    return Result(loss, grads)


@dataclass
class Reference:
    """torch-eager's result in float32 (the loss in float64), with the size of the loss's terms."""

    loss: torch.Tensor
    loss_terms: torch.Tensor
    grads: dict[str, torch.Tensor]


def _reduction_weights(inputs: Inputs, spec: LossSpec) -> tuple[torch.Tensor, float, float]:
    """Per token: the multiplier of its loss in the reduced loss, and the denominators of the
    cross-entropy part and of the z-loss part of a mean (1 otherwise)."""
    labels = inputs.labels.reshape(-1)
    valid = labels != spec.ignore_index
    if spec.reduction == "none":
        upstream = inputs.upstream
        weights = torch.ones_like(labels, dtype=torch.float32) if upstream is None else upstream.reshape(-1)
        return weights.to(labels.device, torch.float32), 1.0, 1.0
    if spec.reduction == "sum":
        return torch.ones_like(labels, dtype=torch.float32), 1.0, 1.0
    if spec.class_weight is not None:
        safe = labels.clamp(0, spec.class_weight.numel() - 1)
        ce_denominator = float((spec.class_weight.to(torch.float64)[safe] * valid).sum())
    else:
        ce_denominator = float(valid.sum())
    return torch.ones_like(labels, dtype=torch.float32), ce_denominator, float(valid.sum())


def reference(impl_eager, inputs: Inputs, *, gradients: bool) -> Reference:
    """torch-eager's loss and gradients on ``inputs``, computed over chunks of tokens (bounded memory)."""
    spec = inputs.spec
    hidden = inputs.hidden.detach().reshape(-1, inputs.hidden.shape[-1])
    labels = inputs.labels.reshape(-1)
    vocab = inputs.weight.shape[0]
    # Leaves of their own over the same storage: the inputs' own .grad stay untouched.
    leaves = {name: t.detach().requires_grad_(gradients) for name, t in inputs.gradient_inputs.items()
              if name != "hidden"}
    sums = {name: torch.zeros(t.shape, dtype=torch.float32, device=t.device) for name, t in leaves.items()}
    weight = leaves.get("weight", inputs.weight.detach())
    bias = leaves.get("bias", None if inputs.bias is None else inputs.bias.detach())
    head = {name: leaves[name] for name in ("norm_weight", "norm_bias", "class_scale") if name in leaves}
    chunk_spec = spec.replace(reduction="none", **head)
    weights, ce_denominator, z_denominator = _reduction_weights(inputs, spec)
    per_token = spec.reduction == "none"
    wants_hidden = gradients and "hidden" in inputs.gradient_inputs
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if wants_hidden else None
    losses, terms = [], []
    rows = max(1, CHUNK_LOGIT_BYTES // (4 * vocab))
    for start in range(0, hidden.shape[0], rows):
        stop = min(start + rows, hidden.shape[0])
        h = hidden[start:stop].detach().requires_grad_(wants_hidden)
        y, w = labels[start:stop], weights[start:stop]
        with torch.set_grad_enabled(gradients):
            out = impl_eager.loss(h, weight, y, chunk_spec, bias=bias, validate=False)
            if per_token:
                value = out.loss
                scalar = (value.float() * w).sum()
            else:  # the z-loss's mean is over the tokens, the cross-entropy's over their class weights
                z_part = out.z_loss if spec.z_loss_multiplier else torch.zeros_like(out.loss)
                value = ((out.loss - z_part).float() * w).sum() / ce_denominator + z_part.float().sum() / z_denominator
                scalar = value
        if gradients and scalar.requires_grad:
            scalar.backward()
            if wants_hidden and h.grad is not None:
                grad_hidden[start:stop] = h.grad.float()
            for name, leaf in leaves.items():  # summed in float32, not in the input dtype
                if leaf.grad is not None:
                    sums[name] += leaf.grad.float()
                    leaf.grad = None
        losses.append(value.detach().double())
        terms.append(_loss_terms(h.detach(), weight.detach(), None if bias is None else bias.detach(), y,
                                 chunk_spec, ce_denominator, z_denominator, per_token))
    if per_token:
        loss, loss_terms = torch.cat(losses), torch.cat(terms)
    else:
        loss, loss_terms = torch.stack(losses).sum(), torch.stack(terms).sum()
    grads = {}
    if gradients:
        grads = {name: grad_hidden.reshape(inputs.hidden.shape) if name == "hidden" else sums[name]
                 for name in inputs.gradient_inputs}
    return Reference(loss.reshape(inputs.labels.shape) if per_token else loss, loss_terms, grads)


@torch.no_grad()
def _loss_terms(hidden, weight, bias, labels, spec: LossSpec, ce_denominator, z_denominator,
                per_token: bool) -> torch.Tensor:
    """The size of the terms each token's loss is computed from, reduced as the loss is: the
    log-sum-exp, the label's logit, label smoothing's mean logit and the z-loss's square."""
    logits = transform_logits(torch.nn.functional.linear(apply_norm(hidden, spec), weight, bias).float(), spec)
    lse = torch.logsumexp(logits, dim=-1)
    valid = labels != spec.ignore_index
    label_logit = logits.gather(-1, labels.clamp(0, logits.shape[-1] - 1).long().unsqueeze(-1)).squeeze(-1)
    ce = lse.abs() + label_logit.abs() + spec.label_smoothing * logits.abs().mean(-1)
    if spec.class_weight is not None:
        ce = ce * spec.class_weight.to(ce)[labels.clamp(0, spec.class_weight.numel() - 1).long()]
    z = spec.z_loss_multiplier * lse.square()
    ce, z = (ce * valid).double() / spec.loss_div_factor, (z * valid).double() / spec.loss_div_factor
    if per_token:
        return ce + z
    return ce.sum() / ce_denominator + z.sum() / z_denominator


def relative_allowance(dtype: torch.dtype, *, dim: int, vocab: int, tokens: int) -> float:
    """How far, relative to the size of its terms, a correct result may be from torch-eager's (norm-wise)."""
    summation = sum(math.sqrt(max(k, 1)) for k in (dim, vocab, vocab, tokens))
    return 2 * (SIDE_ROUNDOFFS * unit_roundoff(dtype) + SUM_ORDER * unit_roundoff(torch.float32) * summation)


def _distance(candidate: torch.Tensor, expected: torch.Tensor) -> float:
    """The 2-norm of the difference, in float64, a block of rows at a time; inf where it is not finite."""
    candidate = candidate.detach().reshape(candidate.shape[0] if candidate.dim() else 1, -1)
    expected = expected.detach().reshape(candidate.shape)
    rows = max(1, COMPARE_BLOCK_ELEMENTS // max(1, candidate.shape[1]))
    total = 0.0
    for start in range(0, candidate.shape[0], rows):
        mine, theirs = candidate[start:start + rows].double(), expected[start:start + rows].double()
        same = (mine == theirs) | (mine.isnan() & theirs.isnan())  # equal infinities, NaN where torch-eager has NaN
        total += float(torch.where(same, 0.0, mine - theirs).square().sum())
    return math.sqrt(total) if math.isfinite(total) else math.inf


def _norm(tensor: torch.Tensor) -> float:
    return _distance(tensor, torch.zeros_like(tensor))


@dataclass(frozen=True)
class Verdict:
    """``reason`` is empty when the result matches torch-eager's, else one line saying how it does not."""

    reason: str = ""

    @property
    def ok(self) -> bool:
        return not self.reason


def compare(result: Result, expected: Reference, *, dtype: torch.dtype, dim: int, vocab: int, tokens: int,
            what: str = "") -> Verdict:
    """``result`` against torch-eager's ``expected``: the loss within the allowance of its terms, each
    gradient within the allowance (times ``GRADIENT_TERMS_OVER_VALUES``) of torch-eager's norm."""
    allowed = relative_allowance(dtype, dim=dim, vocab=vocab, tokens=tokens)
    where = f" {what}" if what else ""
    if result.loss is not None:
        if tuple(result.loss.shape) != tuple(expected.loss.shape):
            return Verdict(f"loss{where} has shape {tuple(result.loss.shape)}, torch-eager's {tuple(expected.loss.shape)}")
        off = _distance(result.loss.to(expected.loss.device), expected.loss)
        scale = _norm(expected.loss_terms)
        if not off <= allowed * scale:
            return Verdict(f"loss{where} {_describe(result.loss)} vs torch-eager's {_describe(expected.loss)}: "
                           f"off by {_ratio(off, scale)} of its terms, allowed {allowed:.1e}")
    for name, grad in expected.grads.items():
        mine = result.grads.get(name)
        if mine is None:
            return Verdict(f"no gradient for {name}{where}")
        if tuple(mine.shape) != tuple(grad.shape):
            return Verdict(f"gradient of {name}{where} has shape {tuple(mine.shape)}, torch-eager's {tuple(grad.shape)}")
        off, scale = _distance(mine, grad), _norm(grad)
        if not off <= allowed * GRADIENT_TERMS_OVER_VALUES * scale:
            return Verdict(f"gradient of {name}{where} off torch-eager's by {_ratio(off, scale)} of its norm, "
                           f"allowed {allowed * GRADIENT_TERMS_OVER_VALUES:.1e}")
    return Verdict()


def _describe(loss: torch.Tensor) -> str:
    return f"{float(loss):.6g}" if loss.numel() == 1 else f"(norm {_norm(loss):.6g})"


def _ratio(off: float, scale: float) -> str:
    if not math.isfinite(off):
        return "a non-finite amount"
    return f"{off / scale:.1e}" if scale > 0 else f"{off:.1e} (absolute; torch-eager's is 0)"


def cached_answer(before: Result, after: Result, expected_before: Reference, expected_after: Reference) -> Verdict:
    """A result bit for bit equal to the one before the inputs changed, where torch-eager's moved."""
    reference_moved = not torch.equal(expected_before.loss, expected_after.loss)
    if reference_moved and before.fingerprint() == after.fingerprint():
        return Verdict("returned the same result after its inputs changed in place (a cached answer)")
    return Verdict()


@contextlib.contextmanager
def changed_inputs(inputs: Inputs):
    """The hidden states rolled by one token, in place (negated for one token), restored on exit."""
    hidden = inputs.hidden
    flat = hidden.detach().view(-1, hidden.shape[-1])
    with torch.no_grad():
        if flat.shape[0] > 1:
            flat.copy_(flat.roll(1, dims=0))
        else:
            flat.neg_()
    try:
        yield inputs
    finally:
        with torch.no_grad():
            if flat.shape[0] > 1:
                flat.copy_(flat.roll(-1, dims=0))
            else:
                flat.neg_()
