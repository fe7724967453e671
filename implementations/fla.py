"""fla-core's fused linear cross-entropy (``fla.modules.fused_linear_cross_entropy``, Triton).

flash-linear-attention's loss, adapted from Liger-Kernel's: the logits of one token chunk at a
time, their gradient written in place in the forward, the weight and bias gradients accumulated
in float32 (``accumulate_grad_in_fp32=True``, its default). Two adapters:

- ``fla``: ``fused_linear_cross_entropy_loss`` on one process;
- ``fla-vocab-parallel``: the same function with its ``process_group``: the head's weight and bias
  split into P equal contiguous shards of the vocabulary over NCCL ranks, hidden states and labels
  replicated; it all-reduces the softmax's statistics and the hidden-state gradient itself. fla
  assumes equal shards (rank r's first class is r V / P), so V must be divisible by P; other cases
  are refused. GPUs only: fla gathers the ranks' log-sum-exps with ``all_gather_into_tensor`` into
  a stacked ``(P, N)`` tensor, a form NCCL accepts and torch 2.13's gloo backend rejects
  (``ProcessGroupGloo::allgather: invalid tensor size at index 0``), so it cannot run over the gloo
  ranks of a CPU machine.

On a CPU ``fla`` runs through Triton's interpreter (``implementations.triton_runtime``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

import torch

from harness.adapter import Availability, Capabilities, Implementation
from harness.known import KnownFailure
from harness.spec import LossOutput
from implementations.distributed import VocabParallel, equal_shards_world_size
from implementations.known_shapes import second_backward_rescales_the_saved_gradient
from implementations.triton_runtime import refuse_too_many_tokens_to_interpret, triton_availability

PACKAGE_HINT = "pip install 'lmhead-bench[fla]'"
PACKAGE = "fla-core 0.6.0"

# What fused_linear_cross_entropy_loss takes (loss_div_factor: applied by the harness).
SUPPORTED = ("bias", "ignore_index", "label_smoothing", "logit_scale", "softcap", "loss_div_factor")
REDUCTIONS_SUPPORTED = ("mean", "sum")  # it always sums the per-token losses (and divides for mean)
UNSUPPORTED = {
    "z_loss": "fla-core's fused_linear_cross_entropy_loss has no z-loss (only its logits-side cross_entropy_loss "
              "has lse_square_scale)",
    "class_weight": "fla-core's fused_linear_cross_entropy_loss takes no class weights",
}
# Triton 3.9's interpreter does not implement triton.language.extra.libdevice.tanh (it returns
# None), which fla-core's cross-entropy kernel calls for the softcap.
INTERPRETER_FAILURES = {
    "softcap": "fla-core's softcap calls libdevice.tanh, which Triton's interpreter lacks (no GPU here): "
               "InterpreterError: TypeError(\"unsupported operand type(s) for *: 'float' and 'NoneType'\")",
}

GLOO_STACKED_GATHER = (
    "fla-core's process_group mode gathers the ranks' log-sum-exps with all_gather_into_tensor into a stacked "
    "(P, N) tensor (fused_cross_entropy/ops.py: cross_entropy_reduce), which torch 2.13's gloo backend rejects "
    "(ProcessGroupGloo::allgather: invalid tensor size at index 0): it runs over NCCL ranks, i.e. on GPUs only"
)


def fla_availability() -> Availability:
    if importlib.util.find_spec("fla") is None:
        return Availability(False, f"fla-core is not installed ({PACKAGE_HINT})")
    runs = triton_availability()
    if not runs.available:
        return runs
    return Availability(True, f"fla-core {importlib.metadata.version('fla-core')}; {runs.detail}")


def fla_capabilities(device: str) -> Capabilities:
    unsupported = {**UNSUPPORTED, **(INTERPRETER_FAILURES if device == "cpu" else {})}
    return Capabilities(reductions=REDUCTIONS_SUPPORTED, supported_options=SUPPORTED,
                        unsupported_options=unsupported)


def fla_loss(hidden, weight, labels, spec, bias, process_group=None) -> torch.Tensor:
    """``fused_linear_cross_entropy_loss`` with the spec's options, as a user calls it."""
    from fla.modules.fused_linear_cross_entropy import fused_linear_cross_entropy_loss

    return fused_linear_cross_entropy_loss(
        hidden, labels.long(), weight, bias, ignore_index=spec.ignore_index, label_smoothing=spec.label_smoothing,
        logit_scale=spec.logit_scale, logit_softcapping=spec.softcap, reduction=spec.reduction,
        process_group=process_group,
    )


class Fla(Implementation):
    name = "fla"
    family = "triton"
    summary = "fla-core's fused_linear_cross_entropy_loss (chunked, gradients in the forward, float32 accumulation)"

    def availability(self) -> Availability:
        return fla_availability()

    def capabilities(self, device):
        return fla_capabilities(device)

    def known_issues(self, device):
        return KNOWN_ISSUES

    def compute(self, hidden, weight, labels, spec, bias):
        refuse_too_many_tokens_to_interpret(labels)
        return LossOutput(fla_loss(hidden, weight, labels, spec, bias), None)


class FlaVocabParallel(VocabParallel):
    name = "fla-vocab-parallel"
    summary = "fla-core's fused_linear_cross_entropy_loss with its process_group: equal vocabulary shards over P ranks"
    rank_family = "fla"
    split = "balanced"  # with V divisible by P (required), the equal split
    devices = ("cuda",)

    def availability(self):
        if not torch.cuda.is_available():
            return Availability(False, GLOO_STACKED_GATHER)
        return fla_availability()

    def capabilities(self, device):
        return fla_capabilities(device)

    def world_size(self, num_tokens, vocab):
        return equal_shards_world_size(num_tokens, vocab, "fla-core's process_group")

    def _reports_z_loss(self, spec):
        return False


def rank_loss(request, where):
    """One rank of ``fla-vocab-parallel``: this rank's weight and bias rows, the function with the
    group; its hidden-state gradient is already all-reduced by fla-core."""
    from implementations.vocab_parallel.ranks import Reply, leaves

    spec = request.spec
    (need_h, need_w, need_b), hidden, weight, bias = leaves(request)
    grad_enabled = need_h or need_w or need_b
    with torch.set_grad_enabled(grad_enabled):
        loss = fla_loss(hidden, weight, request.labels, spec, bias, process_group=where.group)
        if grad_enabled:
            (loss * request.upstream.float()).sum().backward()
    return Reply(loss.detach(), None, hidden.grad if need_h else None, weight.grad if need_w else None,
                 bias.grad if need_b else None)


# --- known issues of fla-core 0.6.0 ---

KNOWN_ISSUES = (
    KnownFailure(
        "fla-core 0.6.0 saves the gradients it computes in the forward and multiplies them by the upstream "
        "gradient in place in backward (fused_linear_cross_entropy/ops.py: fused_linear_cross_entropy_bwd, "
        "elementwise_mul_kernel on dx, dw, db), as Liger-Kernel does: a second backward through a retained graph "
        "of c x loss scales them by c again",
        "retain-graph, mean or sum: the two backwards accumulate (c + c^2) g, or 2 c^2 g where .grad is the saved "
        "buffer itself, instead of 2 c g",
        "autograd/retain-graph: N=6,D=5,V=33,dtype=float32,reduction=mean,bias=1,ignored=some,seed=10",
        PACKAGE,
        matches=second_backward_rescales_the_saved_gradient,
    ),
    # Its kernel stores the logits' gradient into the logits, in their dtype, truncated by Triton's
    # interpreter on a CPU (triton_runtime.TRUNCATION): within the budget since the gate counts the
    # underflow of gradients below bfloat16's normal range linearly (the mismatches its entry
    # excused on its example, 2026-12-07), so no entry.
)
