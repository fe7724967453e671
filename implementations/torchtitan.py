"""torchtitan 0.3.0's losses (``torchtitan/components/loss.py``), as its trainer calls them.

- ``torchtitan-chunked``: ``ChunkedLossWrapper`` around its ``CrossEntropyLoss``: the hidden states
  ``(B, L, D)`` are detached and split into ``num_chunks`` equal chunks along the sequence; per
  chunk, the ``lm_head`` module (here ``nn.Linear`` holding the caller's weight and bias) makes the
  logits, the loss is the float32 cross-entropy summed over the chunk and divided by
  ``global_valid_tokens``, and ``backward()`` runs at once, in the forward: the head's gradients
  land in ``.grad`` there, the hidden states' gradient is kept and handed to autograd by the
  returned loss's backward;
- ``torchtitan-loss-parallel``: its vocab-parallel cross-entropy (``_LossParallelCrossEntropy``,
  reached as its trainer reaches it: ``cross_entropy_loss`` on class-sharded ``DTensor`` logits with
  the ``partial_dtensor`` SPMD backend) over P gloo ranks (NCCL on GPUs), split as torchtitan
  splits (ceil(V / P) classes per rank, the last fewer).

Conventions bridged, and nothing else:

- **reduction**: torchtitan's loss is the sum over the tokens divided by ``global_valid_tokens``,
  the trainer's count of tokens not ignored (an int64 tensor). ``mean`` passes that count,
  ``sum`` none; a ``loss_div_factor`` multiplies it (the count over every micro-batch, as gradient
  accumulation does). Per-token losses (``none``) its cross-entropy does not return;
- **ignore_index**: torchtitan ignores the label -100 only (``IGNORE_INDEX``, not a parameter);
- **num_chunks**: its default is 8 and the sequence length must be divisible by it; the adapter
  uses the largest divisor of the case's sequence length up to 8 (the value a user would
  configure for that length);
- **no grad**: a decoder run under ``torch.no_grad()`` returns hidden states that do not require
  grad, and the wrapper then runs the forward alone (its validation path); the adapter hands it
  the hidden states detached there, as the decoder would.

The package's own requirements (datasets, torchdata, tensorboard, wandb, tokenizers, ...) serve its
trainer; ``components/loss.py`` imports only torch, ``spmd_types`` and ``tyro`` (through
``torchtitan.config``), so the ``torchtitan`` extra installs torchtitan with those alone (see
docs/peers.md).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

import torch
from torch import nn

from harness.adapter import ALL_DTYPES, Availability, Capabilities, Implementation
from harness.errors import UnsupportedCase
from harness.known import KnownFailure, Mismatch
from harness.spec import LossOutput
from implementations.distributed import VocabParallel
from implementations.known_shapes import within

PACKAGE = "torchtitan 0.3.0"
DEFAULT_CHUNKS = 8  # ChunkedLossWrapper.Config.num_chunks
SUPPORTED = ("bias", "loss_div_factor")
UNSUPPORTED = {
    "ignore_index": "torchtitan ignores the label -100 only (components/loss.py: IGNORE_INDEX)",
    "label_smoothing": "torchtitan's cross_entropy_loss has no label smoothing",
    "z_loss": "torchtitan's cross_entropy_loss has no z-loss",
    "softcap": "torchtitan's loss takes the head's logits as they are: no softcap",
    "logit_scale": "torchtitan's loss takes the head's logits as they are: no logit scale",
    "class_weight": "torchtitan's cross_entropy_loss takes no class weights",
}
REDUCTIONS_SUPPORTED = ("mean", "sum")  # the sum divided by global_valid_tokens, or not divided
FROZEN_BACKBONE = (
    "torchtitan's ChunkedLossWrapper computes no gradient at all when the hidden states do not require grad "
    "(documented: 'When pred does not require grad (e.g. validation), runs chunked forward only'): with a frozen "
    "backbone the head gets none"
)


def torchtitan_availability() -> Availability:
    if importlib.util.find_spec("torchtitan") is None:
        return Availability(False, "torchtitan is not installed (pip install 'lmhead-bench[torchtitan]', see "
                                   "docs/peers.md for installing it without its trainer's dependencies)")
    try:
        import torchtitan.components.loss  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure makes it unavailable, with the reason
        return Availability(False, f"torchtitan.components.loss does not import: {type(exc).__name__}: {exc}")
    return Availability(True, f"torchtitan {importlib.metadata.version('torchtitan')}")


def global_valid_tokens(labels: torch.Tensor, reduction: str, loss_div_factor: float) -> torch.Tensor | None:
    """What torchtitan's trainer passes to divide the summed loss by (see the module docstring)."""
    count = (labels != -100).sum()
    if reduction == "sum":
        return None if loss_div_factor == 1.0 else torch.tensor(loss_div_factor, device=labels.device)
    return count if loss_div_factor == 1.0 else count * loss_div_factor


def chunks_for(seq_len: int) -> int:
    """The largest divisor of ``seq_len`` up to ``DEFAULT_CHUNKS``."""
    return max(k for k in range(1, DEFAULT_CHUNKS + 1) if seq_len % k == 0) if seq_len else 1


def _use_as_parameter(module: nn.Module, name: str, tensor: torch.Tensor | None) -> None:
    """Make ``tensor`` the module's ``name``, so that its gradient lands on the caller's tensor."""
    del module._parameters[name]
    setattr(module, name, tensor)


class TorchtitanChunked(Implementation):
    name = "torchtitan-chunked"
    family = "native"
    summary = ("torchtitan's ChunkedLossWrapper: nn.Linear head and float32 cross-entropy per sequence chunk, "
               "backward inside the forward")
    takes_batches = True  # (B, L, D) as given: it chunks along L
    applies_loss_div_factor = True  # through global_valid_tokens
    has_logits_path = False  # its lm_head is a plain nn.Linear
    unsupported_modes = {"backward": "it runs the head's backward inside its forward (ChunkedLossWrapper), so a "
                                     "backward alone has none of the head's work to time"}

    def availability(self) -> Availability:
        return torchtitan_availability()

    def capabilities(self, device):
        return Capabilities(dtypes=ALL_DTYPES, reductions=REDUCTIONS_SUPPORTED, supported_options=SUPPORTED,
                            unsupported_options=UNSUPPORTED)

    def known_issues(self, device):
        return CHUNKED_ISSUES

    def lm_head(self, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        vocab, dim = weight.shape
        head = nn.Linear(dim, vocab, bias=bias is not None, device="meta", dtype=weight.dtype)
        _use_as_parameter(head, "weight", weight)
        if bias is not None:
            _use_as_parameter(head, "bias", bias)
        return head

    def compute(self, hidden, weight, labels, spec, bias):
        from torchtitan.components.loss import ChunkedLossWrapper

        head_needs_grad = weight.requires_grad or (bias is not None and bias.requires_grad)
        if torch.is_grad_enabled() and head_needs_grad and not hidden.requires_grad:
            raise UnsupportedCase(FROZEN_BACKBONE)
        batched = hidden.dim() == 3
        pred = hidden if batched else hidden.unsqueeze(0)
        target = labels if batched else labels.unsqueeze(0)
        if not torch.is_grad_enabled():
            pred = pred.detach()  # what a decoder returns under no_grad
        wrapper = ChunkedLossWrapper.Config(num_chunks=chunks_for(pred.shape[1])).build()
        wrapper.set_lm_head(self.lm_head(weight, bias))
        loss, _ = wrapper(pred, target, global_valid_tokens(target, spec.reduction, spec.loss_div_factor))
        return LossOutput(loss, None)


class TorchtitanLossParallel(VocabParallel):
    name = "torchtitan-loss-parallel"
    summary = ("torchtitan's vocab-parallel cross-entropy (_LossParallelCrossEntropy via cross_entropy_loss on "
               "Shard(-1) DTensor logits) over P ranks")
    rank_family = "torchtitan"
    split = "ceil"  # torchtitan: chunk_size = ceil(V / P), rank r starts at r * chunk_size

    def availability(self):
        return torchtitan_availability()

    def capabilities(self, device):
        return Capabilities(reductions=REDUCTIONS_SUPPORTED, supported_options=SUPPORTED,
                            unsupported_options=UNSUPPORTED)

    def known_issues(self, device):
        return LOSS_PARALLEL_ISSUES

    def shards(self, vocab, world_size):
        shards = super().shards(vocab, world_size)
        if any(shard.size == 0 for shard in shards):
            # Not run: the empty rank raises before any collective while the others wait in one.
            raise UnsupportedCase(
                f"torchtitan's _LossParallelCrossEntropy raises on a rank that holds no class (V = {vocab} over "
                f"P = {world_size} leaves rank {world_size - 1} empty): 'does not support empty vocab shards'"
            )
        return shards

    def _reports_z_loss(self, spec):
        return False


_MESHES: dict[tuple[int, str], object] = {}  # one named mesh per rank process and device type


def _tp_mesh(where):
    from torch.distributed.device_mesh import DeviceMesh

    key = (where.world_size, where.device.type)
    if key not in _MESHES:
        _MESHES[key] = DeviceMesh(where.device.type, list(range(where.world_size)), mesh_dim_names=("tp",))
    return _MESHES[key]


def rank_loss(request, where):
    """One rank of ``torchtitan-loss-parallel``: this rank's logits as a ``Shard(-1)`` DTensor of
    shape (1, N, V), torchtitan's ``cross_entropy_loss`` on them (sum), divided by the count of
    tokens not ignored as its trainer does."""
    from torch.distributed.tensor import DTensor, Shard
    from torchtitan.components.loss import cross_entropy_loss
    from torchtitan.distributed.utils import set_spmd_backend

    from implementations.vocab_parallel.ranks import Reply, all_reduce_hidden_gradient, leaves

    set_spmd_backend("partial_dtensor")  # the backend whose path takes DTensor logits (this rank's process)
    spec = request.spec
    (need_h, need_w, need_b), hidden, weight, bias = leaves(request)
    labels = request.labels.long()
    num_tokens = hidden.shape[0]
    grad_enabled = need_h or need_w or need_b
    with torch.set_grad_enabled(grad_enabled):
        local = torch.nn.functional.linear(hidden, weight, bias)
        pred = DTensor.from_local(local[None], _tp_mesh(where), [Shard(2)], run_check=False,
                                  shape=(1, num_tokens, request.vocab), stride=(num_tokens * request.vocab,
                                                                                 request.vocab, 1))
        loss = cross_entropy_loss(pred, labels[None])
        divisor = global_valid_tokens(labels, spec.reduction, 1.0)
        if divisor is not None:
            loss = loss / divisor
        if grad_enabled:
            (loss * request.upstream.float()).sum().backward()
    grad_h = all_reduce_hidden_gradient(hidden, need_h, where)
    return Reply(loss.detach(), None, grad_h, weight.grad if need_w else None, bias.grad if need_b else None)


# --- known issues of torchtitan 0.3.0 ---


def _gradients_of_the_unscaled_loss(m: Mismatch) -> bool:
    """Backward of ``c * loss`` gave the gradients of ``loss``: ``1 / c`` times the due ones (the
    property's c: its mismatches carry no loss scale of their own)."""
    from harness.check.properties import LOSS_SCALE

    return m.property_id == "autograd/scaled-loss" and m.tensor.startswith("grad_") and within(m, 1 / LOSS_SCALE)


def _head_gradient_of_one_backward(m: Mismatch) -> bool:
    """Two backwards through a retained graph gave the weight and bias the gradient of one. A tied
    weight's gradient adds the embedding's, which does take both backwards: no one factor describes
    it, so there any weight-gradient mismatch of this property is this one."""
    if m.property_id != "autograd/retain-graph" or m.tensor not in ("grad_weight", "grad_bias"):
        return False
    return within(m, 0.5) or (m.case.tied and m.tensor == "grad_weight")


BACKWARD_IN_FORWARD = (
    "torchtitan 0.3.0's ChunkedLossWrapper runs each chunk's backward inside its forward (components/loss.py: "
    "chunk_loss.backward() in __call__), so the head's gradients land in .grad there, and the returned loss's "
    "backward (_DecoderOutputGradientBackProp.backward) hands the decoder the accumulated hidden-state gradient "
    "without multiplying it by grad_output (its own comment: 'not safe if downstream accidentally runs tensor ops "
    "after the loss returns')"
)
CHUNKED_ISSUES = (
    KnownFailure(
        f"{BACKWARD_IN_FORWARD}: the gradients are those of the loss itself, whatever the caller scales it by "
        "(a loss weight, a GradScaler's scale, c x loss)",
        "scaled-loss: every gradient is that of the unscaled loss, 1 / c times the due one",
        "autograd/scaled-loss: N=6,D=5,V=33,dtype=float32,reduction=mean,bias=1,ignored=some,seed=10",
        PACKAGE,
        matches=_gradients_of_the_unscaled_loss,
    ),
    KnownFailure(
        f"{BACKWARD_IN_FORWARD}: a second backward through a retained graph adds the hidden states' gradient "
        "again but nothing to the head's, which was computed once",
        "retain-graph: the weight and bias hold the gradient of one backward where two were due (a tied weight: its "
        "head part)",
        "autograd/retain-graph: N=6,D=5,V=33,dtype=float32,reduction=mean,bias=1,ignored=some,seed=10",
        PACKAGE,
        matches=_head_gradient_of_one_backward,
    ),
)
LOSS_PARALLEL_ISSUES: tuple = ()
