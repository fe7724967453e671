"""What one rank of a vocab-parallel head computes on its shard of the vocabulary.

Every rank holds the same hidden states ``(N, D)`` and labels, and rows ``start:start + V_r`` of
the head weight (and of the bias and class weights). Three ways to compute the loss from there:

- ``chunked``: the project's sharded chunked loss, written from the math. Per token chunk, each
  rank computes its ``(c, V_r)`` logits in float32, all-reduces their maximum (MAX), then one
  packed SUM all-reduce of the sum of exponentials, the target logit (from the rank that owns the
  label, 0 elsewhere) and, for label smoothing, the sum of the (class-weighted) logits over the
  whole vocabulary. The class weight of each token's label and the sum of all class weights are
  all-reduced once, before the chunks. The gradient of the logits is formed in the same pass and
  projected onto this rank's weight and bias rows and onto a partial hidden-state gradient, which
  is all-reduced (SUM, float32) once at the end: what a column-parallel head's backward does.
- ``dtensor``: torch's ``loss_parallel()``: this rank's logits become a ``DTensor`` sharded on the
  class dimension (``DTensor.from_local``), and ``F.cross_entropy`` runs on it, forward and
  backward inside the context, as its documentation requires. A softcap is applied elementwise to
  the local logits; the z-loss is ``torch.logsumexp`` of the DTensor.
- ``megatron``: Megatron-core's ``vocab_parallel_cross_entropy`` on ``(N, 1, V_r)`` logits; the
  caller masks ignored tokens and reduces, as Megatron's trainers do, and converts PyTorch's label
  smoothing to Megatron's convention (``megatron_smoothing``).

Peers whose rank-side computation lives beside their adapter (``PEER_MODULES``, each module's
``rank_loss``): ``liger`` (``LigerVocabParallelCrossEntropy``), ``torchtitan`` (its loss-parallel
cross-entropy) and ``fla`` (``fused_linear_cross_entropy_loss`` with a process group; NCCL only).

A label that no rank owns (out of range) makes every rank raise the same ``IndexError``, after the
all-reduce that finds it, so no rank is left waiting in a collective.

``CommCounter`` counts what a rank hands to collectives (torch.distributed's eager ones and the
functional ones DTensor issues): the bytes of each collective's input on that rank, not the wire
traffic (a ring all-reduce of B bytes sends about 2 (P - 1) / P x B per rank).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from harness.semantics import transform_logits
from harness.spec import LossSpec

FAMILIES = ("chunked", "dtensor", "megatron", "fla", "liger", "torchtitan")

# Smallest float32 chunk of logits per rank worth making (the same reasoning as the chunked
# loss's: tiny chunks make skinny matmuls and one pair of collectives each).
MIN_CHUNK_LOGITS_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Request:
    """One rank's share of one call.

    ``class_weight`` is this rank's entries (``chunked``) or all V of them (``dtensor``:
    ``loss_parallel`` takes the class weights replicated); ``spec.class_weight`` is None.
    ``upstream`` is the gradient of the returned loss (a scalar, or one per token for reduction
    ``none``); None means forward only.
    """

    family: str
    hidden: torch.Tensor
    labels: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    class_weight: torch.Tensor | None
    spec: LossSpec
    vocab: int
    start: int
    needs: tuple[bool, bool, bool]  # gradients wanted: hidden, weight, bias
    upstream: torch.Tensor | None
    chunk_size: int | None = None


@dataclass(frozen=True)
class Reply:
    """One rank's result: the loss (float32, the same on every rank), this rank's rows of the
    weight and bias gradients, and the hidden-state gradient (already all-reduced; rank 0 sends it)."""

    loss: torch.Tensor
    z_loss: torch.Tensor | None
    grad_hidden: torch.Tensor | None
    grad_weight: torch.Tensor | None
    grad_bias: torch.Tensor | None


@dataclass(frozen=True)
class RankFailure:
    """What a rank sends back instead of a ``Reply`` when its computation raised."""

    error_type: str
    message: str


@dataclass(frozen=True)
class Group:
    """This rank's place: its rank, the world size, the process group and the device."""

    rank: int
    world_size: int
    group: dist.ProcessGroup | None
    device: torch.device


def chunk_tokens(num_tokens: int, shard_vocab: int) -> int:
    """Tokens per chunk: about ``MIN_CHUNK_LOGITS_BYTES`` of float32 logits on this rank."""
    return max(1, min(max(num_tokens, 1), MIN_CHUNK_LOGITS_BYTES // (4 * max(shard_vocab, 1))))


def _all_reduce(tensor: torch.Tensor, op, where: Group) -> torch.Tensor:
    if where.world_size > 1:
        dist.all_reduce(tensor, op=op, group=where.group)
    return tensor


def _out_of_range(labels: torch.Tensor, valid: torch.Tensor, owners: torch.Tensor, vocab: int) -> IndexError:
    position = int((valid & (owners != 1)).nonzero()[0])
    return IndexError(f"label {int(labels[position])} at position {position} is outside every rank's "
                      f"vocabulary shard (V = {vocab})")


def chunked_loss(request: Request, where: Group) -> Reply:
    """The sharded chunked loss (see the module docstring); gradients of ``upstream * loss``."""
    spec = request.spec
    hidden, weight, bias = request.hidden, request.weight, request.bias
    num_tokens, shard_vocab, vocab = hidden.shape[0], weight.shape[0], request.vocab
    labels = request.labels.long()
    valid = labels != spec.ignore_index
    local = labels - request.start
    owned = valid & (local >= 0) & (local < shard_vocab)
    safe = torch.where(owned, local, 0)
    class_weight = None if request.class_weight is None else request.class_weight.float()
    eps = spec.label_smoothing

    # Once per call: how many ranks own each token's label, its class weight, the sum of all of them.
    head = torch.zeros(2, num_tokens + 1, device=hidden.device)
    head[0, :num_tokens] = owned.float()
    if class_weight is not None:
        if shard_vocab:
            head[1, :num_tokens] = torch.where(owned, class_weight[safe], 0.0)
        head[1, num_tokens] = class_weight.sum()
    _all_reduce(head, dist.ReduceOp.SUM, where)
    owners = head[0, :num_tokens]
    if bool((valid & (owners != 1)).any()):
        raise _out_of_range(labels, valid, owners, vocab)
    weight_y = head[1, :num_tokens] if class_weight is not None else torch.ones(num_tokens, device=hidden.device)
    weight_sum = head[1, num_tokens] if class_weight is not None else float(vocab)
    num_valid = valid.sum().float()
    ce_denominator = (weight_y * valid).sum() if class_weight is not None else num_valid

    if spec.reduction == "mean":
        ce_scale_all, z_scale_all = valid / ce_denominator, valid / num_valid
    else:
        ce_scale_all = z_scale_all = valid.float()

    need_h, need_w, need_b = request.needs if request.upstream is not None else (False, False, False)
    ce_all = torch.zeros(num_tokens, device=hidden.device)
    z_all = torch.zeros(num_tokens, device=hidden.device)
    grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    grad_b = torch.zeros(shard_vocab, dtype=torch.float32, device=weight.device) if need_b else None
    # The hidden-state gradient is accumulated in float32 (one rounding at the end, after the
    # all-reduce), so the weight is read in float32: a copy of this rank's rows for half dtypes.
    weight32 = weight.float() if need_h else None
    # Every rank must cut the same chunks (they all-reduce per chunk): sized by the largest shard.
    step = request.chunk_size or chunk_tokens(num_tokens, -(-vocab // where.world_size))
    for begin in range(0, num_tokens, step):
        end = min(begin + step, num_tokens)
        h = hidden[begin:end]
        rows = end - begin
        logits = transform_logits(F.linear(h, weight, bias).float(), spec)  # logit scale, softcap
        if shard_vocab:
            peak = logits.max(dim=-1).values
        else:  # an empty shard (V < P): nothing of this rank's is the maximum
            peak = torch.full((rows,), -math.inf, device=hidden.device)
        _all_reduce(peak, dist.ReduceOp.MAX, where)
        shifted = logits - peak[:, None]
        own = owned[begin:end]
        stats = torch.zeros(3, rows, device=hidden.device)
        stats[0] = shifted.exp().sum(-1)
        if shard_vocab:
            stats[1] = torch.where(own, shifted.gather(1, safe[begin:end, None]).squeeze(1), 0.0)
        if eps:  # smoothing needs the (class-weighted) sum of the logits over the whole vocabulary
            stats[2] = shifted.sum(-1) if class_weight is None else shifted @ class_weight
        _all_reduce(stats, dist.ReduceOp.SUM, where)
        log_sum, target = stats[0].log(), stats[1]
        lse = peak + log_sum
        w_y = weight_y[begin:end]
        ce = (1 - eps) * w_y * (log_sum - target)
        if eps:
            ce = ce + eps / vocab * (weight_sum * log_sum - stats[2])
        z = spec.z_loss_multiplier * lse.square()
        ce_scale, z_scale = ce_scale_all[begin:end], z_scale_all[begin:end]
        ce_all[begin:end] = ce * ce_scale
        z_all[begin:end] = z * z_scale
        if not (need_h or need_w or need_b):
            continue

        upstream = request.upstream.float()
        token_scale = upstream[begin:end] if upstream.dim() else upstream
        ce_scale, z_scale = ce_scale * token_scale, z_scale * token_scale
        probs = (shifted - log_sum[:, None]).exp()
        grad = probs * (ce_scale * ((1 - eps) * w_y + eps / vocab * weight_sum))[:, None]
        if shard_vocab:
            grad.scatter_add_(1, safe[begin:end, None], (-(1 - eps) * w_y * ce_scale * own)[:, None])
        if eps:
            per_class = 1.0 if class_weight is None else class_weight[None, :]
            grad -= (eps / vocab) * ce_scale[:, None] * per_class
        if spec.z_loss_multiplier:
            grad += (2 * spec.z_loss_multiplier * lse * z_scale)[:, None] * probs
        if spec.softcap is not None:
            grad *= 1 - (logits / spec.softcap).square()
        if spec.logit_scale != 1.0:
            grad *= spec.logit_scale
        if need_h:
            grad_h[begin:end] = grad @ weight32
        if need_w:
            grad_w.addmm_(grad.t(), h.float())
        if need_b:
            grad_b += grad.sum(0)

    if need_h:
        _all_reduce(grad_h, dist.ReduceOp.SUM, where)
    reduce = (lambda t: t) if spec.reduction == "none" else (lambda t: t.sum())
    loss, z_loss = reduce(ce_all + z_all), reduce(z_all)
    if spec.reduction == "mean" and num_tokens == 0:  # 0 / 0, as PyTorch: no token scale was ever formed
        loss, z_loss = loss * math.nan, z_loss * math.nan
    return Reply(
        loss=loss,
        z_loss=z_loss,
        grad_hidden=None if grad_h is None else grad_h.to(hidden.dtype),
        grad_weight=None if grad_w is None else grad_w.to(weight.dtype),
        grad_bias=None if grad_b is None else grad_b.to(bias.dtype),
    )


_MESHES: dict[tuple[int, str], object] = {}  # one DeviceMesh per rank process and device type


def _mesh(where: Group):
    from torch.distributed.device_mesh import DeviceMesh

    key = (where.world_size, where.device.type)
    if key not in _MESHES:
        _MESHES[key] = DeviceMesh(where.device.type, list(range(where.world_size)))
    return _MESHES[key]


def reduce_like_loss(per_token: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / valid.sum()


def all_reduce_hidden_gradient(hidden: torch.Tensor, needed: bool, where: Group) -> torch.Tensor | None:
    """The hidden states' gradient summed over the ranks, as a column-parallel head's backward does
    (in float32, one rounding to the input dtype at the end); None when not needed."""
    if not needed:
        return None
    grad = hidden.grad.float()
    _all_reduce(grad, dist.ReduceOp.SUM, where)
    return grad.to(hidden.dtype)


def leaves(request: Request):
    """(needs, hidden, weight, bias): detached copies requiring the gradients this request wants
    (none when it has no upstream gradient, i.e. a forward alone), for a peer's autograd."""
    needs = request.needs if request.upstream is not None else (False, False, False)
    hidden = request.hidden.detach().requires_grad_(needs[0])
    weight = request.weight.detach().requires_grad_(needs[1])
    bias = None if request.bias is None else request.bias.detach().requires_grad_(needs[2])
    return needs, hidden, weight, bias


def dtensor_loss(request: Request, where: Group) -> Reply:
    """torch's ``loss_parallel()`` over this rank's logits as a class-sharded DTensor."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import loss_parallel

    spec = request.spec
    (need_h, need_w, need_b), hidden, weight, bias = leaves(request)
    labels = request.labels.long()
    num_tokens = hidden.shape[0]
    grad_enabled = need_h or need_w or need_b
    with torch.set_grad_enabled(grad_enabled):
        local = F.linear(hidden, weight, bias).float()  # the float32 upcast of HF / OLMo-core heads
        if spec.softcap is not None:
            local = spec.softcap * torch.tanh(local / spec.softcap)
        logits = DTensor.from_local(local, _mesh(where), [Shard(1)], run_check=False,
                                    shape=(num_tokens, request.vocab), stride=(request.vocab, 1))
        class_weight = None if request.class_weight is None else request.class_weight.float()
        with loss_parallel():
            ce = F.cross_entropy(logits, labels, weight=class_weight, ignore_index=spec.ignore_index,
                                 reduction=spec.reduction, label_smoothing=spec.label_smoothing)
            loss = ce.full_tensor()
            z_loss = None
            if spec.z_loss_multiplier:
                valid = labels != spec.ignore_index
                lse = torch.logsumexp(logits, dim=-1).full_tensor()
                z_loss = reduce_like_loss(spec.z_loss_multiplier * lse.square() * valid, valid, spec.reduction)
                loss = loss + z_loss
            if grad_enabled:
                try:
                    (loss * request.upstream.float()).sum().backward()
                except RuntimeError as exc:  # say where: the gate's known-limitation entry matches on it
                    raise RuntimeError(f"loss_parallel backward: {exc}") from None
    grad_h = all_reduce_hidden_gradient(hidden, need_h, where)
    return Reply(
        loss=loss.detach(),
        z_loss=None if z_loss is None else z_loss.detach(),
        grad_hidden=grad_h,
        grad_weight=weight.grad if need_w else None,
        grad_bias=bias.grad if need_b else None,
    )


def _use_megatron_group(where: Group) -> None:
    """Point Megatron-core's tensor-parallel state at this pool's group (it keeps module globals)."""
    from megatron.core import parallel_state

    parallel_state._TENSOR_MODEL_PARALLEL_GROUP = where.group if where.group is not None else dist.group.WORLD
    parallel_state.set_tensor_model_parallel_world_size(where.world_size)
    parallel_state.set_tensor_model_parallel_rank(where.rank)


def megatron_smoothing(label_smoothing: float, vocab: int) -> float:
    """Megatron's ``label_smoothing`` for PyTorch's: Megatron (after NeMo) gives the target 1 - a and
    every other class a / (V - 1), PyTorch the target 1 - e + e / V and every class e / V, the same
    distribution when a = e (V - 1) / V (with one rank, Megatron then returns F.cross_entropy's loss)."""
    return label_smoothing * (vocab - 1) / vocab


def megatron_loss(request: Request, where: Group) -> Reply:
    """Megatron-core's ``vocab_parallel_cross_entropy``; ignored tokens masked and the loss reduced
    by the caller, as Megatron's trainers do with their loss mask."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    _use_megatron_group(where)
    spec = request.spec
    (need_h, need_w, need_b), hidden, weight, bias = leaves(request)
    labels = request.labels.long()
    valid = labels != spec.ignore_index
    grad_enabled = need_h or need_w or need_b
    with torch.set_grad_enabled(grad_enabled):
        logits = F.linear(hidden, weight, bias).float()
        if spec.softcap is not None:
            logits = spec.softcap * torch.tanh(logits / spec.softcap)
        per_token = vocab_parallel_cross_entropy(logits[:, None, :], torch.where(valid, labels, 0)[:, None],
                                                 megatron_smoothing(spec.label_smoothing, request.vocab))[:, 0]
        # Selected, not multiplied by the mask: an ignored token's loss may be inf (smoothing takes the
        # log of probabilities that underflow), and inf x 0 would make the whole loss NaN.
        per_token = torch.where(valid, per_token, 0.0)
        loss = reduce_like_loss(per_token, valid, spec.reduction)
        if grad_enabled:
            (loss * request.upstream.float()).sum().backward()
    grad_h = all_reduce_hidden_gradient(hidden, need_h, where)
    return Reply(loss.detach(), None, grad_h, weight.grad if need_w else None, bias.grad if need_b else None)


COMPUTE = {"chunked": chunked_loss, "dtensor": dtensor_loss, "megatron": megatron_loss}
# Peers whose rank-side computation lives beside their adapter, as ``rank_loss(request, where)``.
PEER_MODULES = {"fla": "implementations.fla", "liger": "implementations.liger",
                "torchtitan": "implementations.torchtitan"}


def compute(request: Request, where: Group) -> Reply:
    if request.family in PEER_MODULES:
        return importlib.import_module(PEER_MODULES[request.family]).rank_loss(request, where)
    return COMPUTE[request.family](request, where)


# --- counting what the collectives carry ---------------------------------------------------------

# The collectives a rank may issue, as (module, function, index of this rank's input argument):
# torch.distributed's eager ones (the chunked loss, the hidden-state gradient) and the functional
# ones DTensor issues (loss_parallel, redistributions). They are wrapped, not watched with a
# dispatch mode: a mode does not see the collectives DTensor issues inside its own dispatch.
_EAGER = (("all_reduce", 0), ("broadcast", 0), ("all_gather", 1), ("all_gather_into_tensor", 1),
          ("reduce_scatter_tensor", 1), ("all_to_all_single", 1))
_FUNCTIONAL = (("all_reduce", 0), ("all_reduce_coalesced", 0), ("all_gather_tensor", 0),
               ("all_gather_tensor_autograd", 0), ("all_gather_into_tensor_coalesced", 0),
               ("reduce_scatter_tensor", 0), ("reduce_scatter_tensor_autograd", 0),
               ("reduce_scatter_tensor_coalesced", 0), ("all_to_all_single", 0), ("all_to_all_single_autograd", 0),
               ("broadcast", 0), ("all_gather_single", 0), ("reduce_scatter_single", 0), ("all_gather_inplace", 1))


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        if hasattr(value, "to_local"):  # a DTensor: this rank's part
            value = value.to_local()
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


class CommCounter:
    """While active (``with``), counts the collectives this rank issues and the bytes of their
    inputs on this rank. A collective called from inside another counted one is not counted again."""

    def __init__(self) -> None:
        self.calls = 0
        self.bytes = 0
        self._saved: list[tuple[object, str, object]] = []
        self._depth = 0

    def _wrap(self, function, index: int):
        def counted(*args, **kwargs):
            if self._depth == 0:
                self.calls += 1
                self.bytes += _tensor_bytes(args[index] if index < len(args) else next(iter(kwargs.values()), None))
            self._depth += 1
            try:
                return function(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted

    def __enter__(self) -> CommCounter:
        import torch.distributed._functional_collectives as funcol

        for module, table in ((dist, _EAGER), (funcol, _FUNCTIONAL)):
            for name, index in table:
                original = getattr(module, name, None)
                if original is not None:
                    self._saved.append((module, name, original))
                    setattr(module, name, self._wrap(original, index))
        return self

    def __exit__(self, *exc) -> None:
        for module, name, original in reversed(self._saved):
            setattr(module, name, original)
        self._saved.clear()
