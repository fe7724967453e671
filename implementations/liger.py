"""Liger-Kernel's losses of an LM head.

- ``liger``, ``liger-fp32-accum``: its fused linear cross-entropy (Triton), the gradients computed
  in the forward, one token chunk of logits at a time;
- ``liger-ce``: ``LigerCrossEntropyLoss`` on logits, as a user puts it after a model's head
  (``implementations.composed``: the projection, the logit scale and the softcap as Hugging Face's
  models apply them, in the model's dtype), then the loss. Liger writes the logits' gradient into
  the logits tensor in place, in the forward;
- ``liger-vocab-parallel``: ``LigerVocabParallelCrossEntropy`` (liger-kernel 0.8.1 and later) over P
  ranks, each with an equal shard of the vocabulary (gloo on CPU), logits of the rank's own head
  rows composed as for ``liger-ce``, the caller masking and reducing as Megatron's trainers do;
- ``liger-cutedsl``: the fused linear cross-entropy through Liger's CuTe DSL implementation
  (``impl="nvidia-cutedsl"``: Hopper or newer, with ``nvidia-cutlass-dsl``), GPU only.

On a machine without a CUDA GPU the harness has turned on Triton's interpreter before Triton was
imported (see ``harness/__init__.py``), so the Triton kernels run, slowly but exactly, on the CPU.
"""

from __future__ import annotations

import importlib.util

import torch

from harness.adapter import Availability, Capabilities, Implementation
from harness.known import KnownFailure, KnownImprecision, Mismatch
from harness.spec import LossOutput
from implementations.composed import composed_logits
from implementations.distributed import VocabParallel, equal_shards_world_size
from implementations.known_shapes import second_backward_rescales_the_saved_gradient, upstream_at_the_peer
from implementations.triton_runtime import TRUNCATION, refuse_too_many_tokens_to_interpret, triton_availability

PACKAGE_HINT = "pip install 'lmhead-bench[liger]'"

# In liger-kernel 0.8.5 these kernels branches fail under Triton's interpreter with
# InterpreterError: AttributeError("'float' object has no attribute 'to'"). On a GPU they run.
# What LigerFusedLinearCrossEntropyFunction takes (loss_div_factor: applied by the harness).
SUPPORTED = ("bias", "ignore_index", "label_smoothing", "z_loss", "softcap", "loss_div_factor", "class_weight")
INTERPRETER_FAILURES = {
    "class_weight": "liger-kernel's class-weight kernel fails under Triton's interpreter (no GPU here)",
    "softcap": "liger-kernel's softcap kernel fails under Triton's interpreter (no GPU here)",
}


class Liger(Implementation):
    """``liger``: the function with its defaults, which accumulate the weight and bias gradients
    across token chunks in the input dtype; ``liger-fp32-accum``: ``accum_dtype=torch.float32``,
    the configuration OLMo-core's fused_linear head passes (and the fix for the precision the gate
    finds in bfloat16 and float16)."""

    family = "triton"

    def __init__(self, name: str = "liger", *, accum_dtype: torch.dtype | None = None) -> None:
        self.name = name
        self.accum_dtype = accum_dtype
        self.summary = (
            "Liger-Kernel LigerFusedLinearCrossEntropyFunction (chunked, gradients in the forward)"
            if accum_dtype is None
            else "the same with accum_dtype=torch.float32 (weight/bias gradients accumulated in float32)"
        )

    def availability(self) -> Availability:
        return liger_availability()

    def capabilities(self, device):
        unsupported = dict(INTERPRETER_FAILURES) if device == "cpu" else {}
        return Capabilities(supported_options=SUPPORTED, unsupported_options=unsupported)

    def known_issues(self, device):
        return (*STRUCTURAL, *(ACCUMULATES_IN_INPUT_DTYPE if self.accum_dtype is None else FLOAT32_ACCUMULATION))

    def compute(self, hidden, weight, labels, spec, bias):
        refuse_too_many_tokens_to_interpret(labels)
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        # Liger's class weights must share the logits' precision for its kernel (float32 here).
        class_weight = None if spec.class_weight is None else spec.class_weight.to(hidden.device, torch.float32)
        loss, z_loss, _, _ = LigerFusedLinearCrossEntropyFunction.apply(
            hidden,
            weight,
            labels.long(),
            bias,
            class_weight,
            spec.ignore_index,
            spec.z_loss_multiplier,
            spec.label_smoothing,
            spec.reduction,
            spec.softcap,
            True,  # return_z_loss: reported separately for logging
            self.accum_dtype,
        )
        return LossOutput(loss, z_loss)


def liger_availability() -> Availability:
    if importlib.util.find_spec("liger_kernel") is None:
        return Availability(False, f"liger-kernel is not installed ({PACKAGE_HINT})")
    return triton_availability()


# LigerCrossEntropyLoss's own options; the logit scale and the softcap are composed in front.
CE_SUPPORTED = ("bias", "ignore_index", "label_smoothing", "z_loss", "logit_scale", "softcap", "loss_div_factor",
                "class_weight")
CE_INTERPRETER_FAILURES = {
    "class_weight": "liger-kernel's class-weight kernel fails under Triton's interpreter (no GPU here)",
}
# Its loss is in the logits' dtype, so in bfloat16 its backward multiplies the bfloat16 logits'
# gradient by a bfloat16 upstream gradient (element_mul_kernel), which the interpreter gets wrong.
CE_INTERPRETER_DTYPES = (torch.float32, torch.float16)
BFLOAT16_PRODUCTS = (
    "liger-ce in bfloat16 on a CPU: Triton 3.9's interpreter keeps bfloat16 values as their uint16 bit patterns "
    "and applies numpy's multiply to them (runtime/interpreter.py: binary_op), so the product of two bfloat16 "
    "values, here the logits' gradient times the upstream gradient in LigerCrossEntropyFunction's backward "
    "(any upstream gradient but 1: a scaled loss, a loss_div_factor), is garbage (up to 1e38 or inf); on a GPU "
    "it runs"
)


class LigerCrossEntropy(Implementation):
    name = "liger-ce"
    family = "triton"
    summary = ("Liger-Kernel LigerCrossEntropyLoss on the head's logits (logit scale and softcap composed in "
               "front, as HF's models apply them)")
    has_logits_path = False  # the head in front of it is torch's, not Liger's

    def availability(self) -> Availability:
        return liger_availability()

    def capabilities(self, device):
        if device != "cpu":
            return Capabilities(supported_options=CE_SUPPORTED)
        return Capabilities(dtypes=CE_INTERPRETER_DTYPES, supported_options=CE_SUPPORTED,
                            unsupported_options=dict(CE_INTERPRETER_FAILURES))

    def unsupported_reason(self, spec, *, dtype, device, has_bias):
        if device == "cpu" and dtype == torch.bfloat16 and self.availability().available:
            return BFLOAT16_PRODUCTS
        return super().unsupported_reason(spec, dtype=dtype, device=device, has_bias=has_bias)

    def known_issues(self, device):
        return CE_KNOWN_ISSUES

    def compute(self, hidden, weight, labels, spec, bias):
        refuse_too_many_tokens_to_interpret(labels)
        from liger_kernel.transformers import LigerCrossEntropyLoss

        class_weight = None if spec.class_weight is None else spec.class_weight.to(hidden.device, torch.float32)
        loss_fn = LigerCrossEntropyLoss(weight=class_weight, ignore_index=spec.ignore_index,
                                        lse_square_scale=spec.z_loss_multiplier,
                                        label_smoothing=spec.label_smoothing, reduction=spec.reduction,
                                        return_z_loss=True)
        out = loss_fn(composed_logits(hidden, weight, bias, spec), labels.long())
        return LossOutput(out.loss, out.z_loss)


VOCAB_PARALLEL_SUPPORTED = ("bias", "ignore_index", "label_smoothing", "logit_scale", "softcap", "loss_div_factor")
VOCAB_PARALLEL_UNSUPPORTED = {
    "z_loss": "LigerVocabParallelCrossEntropy computes the cross-entropy only",
    "class_weight": "LigerVocabParallelCrossEntropy takes no class weights",
}


class LigerVocabParallel(VocabParallel):
    name = "liger-vocab-parallel"
    summary = ("Liger-Kernel LigerVocabParallelCrossEntropy over P ranks with equal vocabulary shards (the caller "
               "masks and reduces)")
    rank_family = "liger"
    split = "balanced"  # with V divisible by P (required), the equal split

    def availability(self):
        return liger_availability()

    def capabilities(self, device):
        return Capabilities(supported_options=VOCAB_PARALLEL_SUPPORTED, unsupported_options=VOCAB_PARALLEL_UNSUPPORTED)

    def known_issues(self, device):
        return VOCAB_PARALLEL_KNOWN_ISSUES

    def compute(self, hidden, weight, labels, spec, bias):
        refuse_too_many_tokens_to_interpret(labels)
        return super().compute(hidden, weight, labels, spec, bias)

    def world_size(self, num_tokens, vocab):
        # Liger derives rank r's first class as r * V_local (vocab_parallel_cross_entropy.py).
        return equal_shards_world_size(num_tokens, vocab, "liger-kernel's LigerVocabParallelCrossEntropy")

    def _reports_z_loss(self, spec):
        return False


def rank_loss(request, where):
    """One rank of ``liger-vocab-parallel``: its logits (model dtype, options composed in front),
    Liger's per-token loss over the group (PyTorch's label smoothing over the whole vocabulary:
    formula "pytorch", mode "global", its defaults), masked and reduced by the caller."""
    from liger_kernel.transformers import LigerVocabParallelCrossEntropy

    from implementations.vocab_parallel.ranks import Reply, all_reduce_hidden_gradient, leaves, reduce_like_loss

    spec = request.spec
    (need_h, need_w, need_b), hidden, weight, bias = leaves(request)
    labels = request.labels.long()
    valid = labels != spec.ignore_index
    grad_enabled = need_h or need_w or need_b
    with torch.set_grad_enabled(grad_enabled):
        logits = composed_logits(hidden, weight, bias, spec)
        loss_fn = LigerVocabParallelCrossEntropy(ignore_index=spec.ignore_index, label_smoothing=spec.label_smoothing)
        per_token = loss_fn(logits[:, None, :], labels[:, None], where.group)[:, 0]
        loss = reduce_like_loss(per_token, valid, spec.reduction)
        if grad_enabled:
            (loss * request.upstream.float()).sum().backward()
    grad_h = all_reduce_hidden_gradient(hidden, need_h, where)
    return Reply(loss.detach().float(), None, grad_h, weight.grad if need_w else None, bias.grad if need_b else None)


CUTEDSL_IMPL = "nvidia-cutedsl"


class LigerCuteDSL(Liger):
    """``liger-cutedsl``: the fused linear cross-entropy through Liger's registered CuTe DSL
    implementation, whose inner per-chunk cross-entropy is a CuTe DSL online-softmax kernel. Where
    the vocabulary is not a multiple of 16 bytes of logits, liger-kernel itself falls back to its
    Triton kernel for that call (with a LigerImplFallbackWarning)."""

    family = "cuda"
    devices = ("cuda",)

    def __init__(self) -> None:
        super().__init__("liger-cutedsl")
        self.summary = "Liger-Kernel fused linear cross-entropy with impl='nvidia-cutedsl' (CuTe DSL, SM90+)"

    def availability(self) -> Availability:
        if importlib.util.find_spec("liger_kernel") is None:
            return Availability(False, f"liger-kernel is not installed ({PACKAGE_HINT})")
        if not torch.cuda.is_available():
            return Availability(False, "Liger's CuTe DSL kernels need an NVIDIA GPU of compute capability 9.0 or newer "
                                       "(Hopper) and nvidia-cutlass-dsl; this machine has no CUDA GPU")
        from liger_kernel.backends import ImplNotAvailableError, resolve_impl

        try:
            resolve_impl("fused_linear_cross_entropy", CUTEDSL_IMPL)
        except ImplNotAvailableError as exc:
            return Availability(False, f"liger-kernel says: {exc}")
        return Availability(True, "liger-kernel's nvidia-cutedsl implementation (CuTe DSL)")

    def capabilities(self, device):
        return Capabilities(supported_options=SUPPORTED)

    def known_issues(self, device):
        return STRUCTURAL

    def compute(self, hidden, weight, labels, spec, bias):
        from liger_kernel.backends import dispatch

        class_weight = None if spec.class_weight is None else spec.class_weight.to(hidden.device, torch.float32)
        loss, z_loss, _, _ = dispatch(
            "fused_linear_cross_entropy", hidden, weight, labels.long(), bias, class_weight, spec.ignore_index,
            spec.z_loss_multiplier, spec.label_smoothing, spec.reduction, spec.softcap, True, impl=CUTEDSL_IMPL,
        )
        return LossOutput(loss, z_loss)


# --- known issues of liger-kernel 0.8.5 (and of Triton's interpreter it runs through on a CPU) ---

PACKAGE = "liger-kernel 0.8.5"


def _no_head_gradient_with_a_frozen_backbone(m: Mismatch) -> bool:
    return (m.property_id == "autograd/grad-subsets" and m.tensor in ("grad_weight", "grad_bias")
            and m.actual is None and "hidden" not in m.case.grads)


def _second_backward_scales_the_saved_gradient_again(m: Mismatch) -> bool:
    """Two backwards of ``c * loss`` gave ``(c + c^2) g`` (the weight and bias; hidden states that are
    a strided view or come from a model's layer, whose gradient goes on through another op) or
    ``2 c^2 g`` (hidden states whose ``.grad`` autograd keeps as the saved buffer itself, so the
    second in-place scaling reaches the first backward's share too) where ``2 c g`` (the other side)
    was due."""
    from harness.check.tolerance import mismatch

    if m.property_id != "autograd/retain-graph" or m.case.reduction not in ("mean", "sum"):
        return False
    if m.actual is None or m.expected is None or m.allowed is None or not m.tensor.startswith("grad_"):
        return False
    c = upstream_at_the_peer(m)
    factors = ((1 + c) / 2, c) if m.tensor == "grad_hidden" else ((1 + c) / 2,)
    return any(mismatch(m.tensor, m.actual, m.expected * factor, m.allowed) is None for factor in factors)


STRUCTURAL = (
    KnownFailure(
        "liger-kernel 0.8.5 computes the head's gradients only when the hidden states require grad: "
        "with a frozen backbone the weight and bias get no gradient at all, silently",
        "grad-subsets, hidden frozen: no gradient arrives at the weight or the bias",
        "autograd/grad-subsets: N=5,D=3,V=17,dtype=float32,reduction=mean,bias=1,grads=weight+bias,seed=5",
        PACKAGE,
        matches=_no_head_gradient_with_a_frozen_backbone,
    ),
    KnownFailure(
        "liger-kernel 0.8.5 multiplies the gradients saved in the forward by the upstream gradient in "
        "place (element_mul_kernel): a second backward through a retained graph of c x loss scales them "
        "by c again",
        "retain-graph, mean or sum: the two backwards accumulate (c + c^2) g, or 2 c^2 g at hidden states "
        "whose .grad is the saved buffer itself, instead of 2 c g",
        "autograd/retain-graph: N=6,D=5,V=33,dtype=float32,reduction=mean,bias=1,ignored=some,seed=10",
        PACKAGE,
        matches=_second_backward_scales_the_saved_gradient_again,
    ),
)

ACCUMULATION = (
    "liger-kernel 0.8.5 accumulates the weight and bias gradients across its token chunks in the input dtype "
    "unless accum_dtype=torch.float32 is passed (its default is None): one rounding of the input dtype per "
    "chunk; `liger-fp32-accum` is the configuration with float32, the one OLMo-core uses"
)
AT_SCALE = "precision/at-scale: N=2048,D=64,V=2048,dtype=bfloat16,reduction=sum,bias=1,seed=21"
PARAMETER_GRADIENTS = ("grad_weight", "grad_bias")

ACCUMULATES_IN_INPUT_DTYPE = (
    KnownImprecision(f"{ACCUMULATION}; on a CPU also: {TRUNCATION}", AT_SCALE, PACKAGE, ("bfloat16",),
                     PARAMETER_GRADIENTS, max_ratio=8.0, devices=("cpu",)),
    KnownImprecision(ACCUMULATION, AT_SCALE, PACKAGE, ("bfloat16",), PARAMETER_GRADIENTS, max_ratio=8.0,
                     devices=("cuda",)),
    KnownImprecision(ACCUMULATION, AT_SCALE.replace("bfloat16", "float16"), PACKAGE, ("float16",),
                     PARAMETER_GRADIENTS, max_ratio=8.0),
)
# With float32 accumulation, what Triton's interpreter truncates on a CPU (TRUNCATION) stays within
# the budget since the gate counts the underflow of gradients below bfloat16's normal range
# linearly: that was what its entry excused on its example (2026-12-07), so no entry.
FLOAT32_ACCUMULATION = ()

CE_KNOWN_ISSUES = (
    KnownFailure(
        "liger-kernel 0.8.5's LigerCrossEntropyFunction writes the logits' gradient into the logits in the forward "
        "and multiplies it by the upstream gradient in place in backward (ops/cross_entropy.py: "
        "cross_entropy_backward, element_mul_kernel): a second backward through a retained graph of c x loss "
        "scales it by c again",
        "retain-graph, mean or sum: the two backwards accumulate (c + c^2) g instead of 2 c g at every input of "
        "the head",
        "autograd/retain-graph: N=6,D=5,V=33,dtype=float32,reduction=mean,bias=1,ignored=some,seed=10",
        PACKAGE,
        matches=second_backward_rescales_the_saved_gradient,
    ),
)


def _probabilities_may_underflow(case) -> torch.Tensor:
    """Per token (the labels' shape): whether some class's float32 probability may be 0, i.e. its
    log-probability is below float32's smallest normal number (a subnormal is within a rounding of
    the logits of underflowing), for a token not ignored."""
    import math

    import torch.nn.functional as F

    from harness.case import make_inputs
    from harness.semantics import transform_logits

    inputs = make_inputs(case, reference=True)
    with torch.no_grad():
        logits = transform_logits(F.linear(inputs.hidden, inputs.weight, inputs.bias), inputs.spec)
        smallest = logits.amin(-1) - torch.logsumexp(logits, -1)
    return (smallest < math.log(torch.finfo(torch.float32).tiny)) & (inputs.labels != inputs.spec.ignore_index)


def _log_of_an_underflowed_probability(m: Mismatch) -> bool:
    """With label smoothing, the loss is +inf exactly where a probability may underflow (a scalar loss:
    where any may), and within the allowance elsewhere."""
    from harness.check.tolerance import mismatch

    if m.tensor != "loss" or not m.case.option("label_smoothing") or m.actual is None or m.expected is None:
        return False
    if m.allowed is None or m.identity or not bool(m.actual.isposinf().any()):
        return False
    may = _probabilities_may_underflow(m.case)
    may = may.reshape(m.actual.shape) if m.case.reduction == "none" else may.any()
    infinite = m.actual.isposinf()
    if bool((infinite & ~may).any()):
        return False
    return mismatch(m.tensor, torch.where(infinite, m.expected.to(m.actual.dtype), m.actual), m.expected,
                    m.allowed) is None


VOCAB_PARALLEL_KNOWN_ISSUES = (
    KnownFailure(
        "liger-kernel 0.8.5's LigerVocabParallelCEFunction takes the log of the float32 exponentials it saved "
        "for label smoothing (ops/vocab_parallel_cross_entropy.py: log_probs_local = torch.log(exp_buf) - "
        "torch.log(sum_exp_local)): a probability that underflows to 0 (logits spread by more than about 103) "
        "gives log 0 = -inf, so the loss is +inf where F.cross_entropy is finite; the gradients do not use it",
        "label smoothing: the loss +inf where a token's smallest probability is below float32's smallest normal, "
        "otherwise within the allowance",
        "equivalence/float32: N=129,D=66,V=129,dtype=float32,reduction=mean,ignore_index=0,label_smoothing=0.5,"
        "ignored=some,scale=16.0,seed=1115",
        PACKAGE,
        matches=_log_of_an_underflowed_probability,
    ),
)
