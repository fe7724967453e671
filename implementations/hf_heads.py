"""Hugging Face transformers' own causal-LM heads: GPT-2, Llama and Gemma-2, run through their code.

Each adapter builds the real model (``GPT2LMHeadModel``, ``LlamaForCausalLM``,
``Gemma2ForCausalLM``) from a tiny random config (no download): no hidden layers, hidden size D,
vocabulary V, the case's dtype, the norm's epsilon from the spec. It then makes the head's
parameters *be* the harness's tensors (so gradients reach them directly, through any number of
backwards), feeds the harness's hidden states into the final norm with a forward pre-hook (the
0-layer trunk's output is replaced), and calls the model's own ``forward`` with dummy
``input_ids``. What runs is transformers' code: the final norm's module
(``nn.LayerNorm``, ``LlamaRMSNorm``, ``Gemma2RMSNorm``), ``lm_head``, Gemma-2's
``final_logit_softcapping``, ``slice_logits_to_keep`` and ``ForCausalLMLoss`` (logits upcast to
float32, then ``F.cross_entropy``).

The conventions bridged between the two, and nothing else:

- **label shifting**: HF's causal-LM loss shifts the labels by one (``labels[..., 1:]``, the last
  position padded with ``ignore_index``) so that ``labels = input_ids`` works. The harness's labels
  are already aligned with their positions, so they go in as ``shift_labels`` (with ``labels`` only
  to ask for a loss), which HF uses unshifted;
- **reductions**: HF's loss is the mean over the tokens not ignored, or, given
  ``num_items_in_batch``, their sum divided by it (gradient accumulation). ``sum`` passes
  ``num_items_in_batch = loss_div_factor``; ``mean`` with a ``loss_div_factor`` passes the number
  of tokens not ignored times the factor, as HF's Trainer counts the items of an accumulated batch.
  Per-token losses (``none``) HF cannot return;
- **softcap**: Gemma-2's ``config.final_logit_softcapping`` is the case's softcap (None: off, where
  Gemma-2's default is 30). GPT-2 and Llama have none;
- **Gemma's gain**: ``Gemma2RMSNorm`` computes ``x_hat * (1 + w)`` (its weight stores ``g - 1``), so
  its weight is ``g - 1``, computed from the harness's gain ``g`` inside the graph (exact for g in
  [0.5, 2], the range the harness draws);
- **tying**: GPT-2's and Gemma-2's ``lm_head`` is tied to the input embedding; both are set to the
  harness's head weight, which keeps the tie (in a tied case that weight is itself the harness
  model's embedding).

A case with a norm of the other kind than the model's (an RMSNorm for GPT-2, a LayerNorm for
Llama or Gemma-2) is refused, and so are the options HF's heads and causal-LM loss do not have.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from harness.adapter import Availability, Capabilities, Implementation
from harness.errors import UnsupportedCase
from harness.known import KnownLimitation
from harness.spec import LossOutput, LossSpec

PACKAGE_HINT = "pip install 'lmhead-bench[hf]'"

# With no layers, the attention implementation only decides the causal mask the trunk prepares and
# never uses: "eager" materialises it, (B, 1, T, T) floats (256 MiB and 0.6 s at T = 8192 on a
# CPU, billed to the head in a sweep); "sdpa" skips it for a causal batch without padding. Gemma-2
# refuses sdpa (its attention soft-caps), so it runs eager and is handed its masks already prepared,
# as generate() hands them: a dict of them, here None (see ModelKind.prepared_masks).

# What ForCausalLMLoss and the heads of these three models do not have.
NOT_IN_HF = {
    "bias": "the model's lm_head is nn.Linear(bias=False)",
    "class_scale": "the model's head has no per-class scale",
    "label_smoothing": "HF's causal-LM loss (ForCausalLMLoss) has no label smoothing",
    "z_loss": "HF's causal-LM loss (ForCausalLMLoss) has no z-loss",
    "logit_scale": "the model's head has no logit scale",
    "class_weight": "HF's causal-LM loss (ForCausalLMLoss) has no class weights",
}
NO_PER_TOKEN_LOSS = (
    "reduction=none: HF's causal-LM loss returns a reduced loss only (the mean, or the sum divided by "
    "num_items_in_batch)"
)


@dataclass(frozen=True)
class ModelKind:
    """One transformers model: how to build its config, where its final norm is, and what it has."""

    name: str  # the adapter's name
    model_class: str  # the transformers class
    norm: str  # the final norm: "layernorm" or "rmsnorm"
    norm_path: tuple[str, ...]  # attributes from the model to its final norm
    config: Callable[[int, int, int, LossSpec], object]  # (V, D, T, spec) -> config
    gain_minus_one: bool = False  # the norm computes x_hat * (1 + weight) (Gemma)
    has_softcap: bool = False
    attention: str = "sdpa"
    prepared_masks: tuple[str, ...] = ()  # the masks it takes prepared in a dict as attention_mask

    def describe_norm(self) -> str:
        return {"layernorm": "a LayerNorm with bias", "rmsnorm": "an RMSNorm without bias"}[self.norm]


def _gpt2_config(vocab: int, dim: int, positions: int, spec: LossSpec):
    from transformers import GPT2Config

    return GPT2Config(n_layer=0, n_embd=dim, n_head=1, vocab_size=vocab, n_positions=positions,
                      layer_norm_epsilon=spec.norm_eps, bos_token_id=None, eos_token_id=None,
                      attn_implementation=GPT2.attention)


def _llama_config(vocab: int, dim: int, positions: int, spec: LossSpec):
    from transformers import LlamaConfig

    # head_dim only sizes the rotary embedding (there is no attention layer): RoPE wants it even.
    return LlamaConfig(num_hidden_layers=0, hidden_size=dim, vocab_size=vocab, num_attention_heads=1,
                       num_key_value_heads=1, head_dim=2, intermediate_size=1, rms_norm_eps=spec.norm_eps,
                       max_position_embeddings=positions, bos_token_id=None, eos_token_id=None,
                       pad_token_id=None, attn_implementation=LLAMA.attention)


def _gemma2_config(vocab: int, dim: int, positions: int, spec: LossSpec):
    from transformers import Gemma2Config

    return Gemma2Config(num_hidden_layers=0, hidden_size=dim, vocab_size=vocab, num_attention_heads=1,
                        num_key_value_heads=1, head_dim=2, intermediate_size=1, rms_norm_eps=spec.norm_eps,
                        max_position_embeddings=positions, final_logit_softcapping=spec.softcap,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None,
                        attn_implementation=GEMMA2.attention)


GPT2 = ModelKind("hf-gpt2", "GPT2LMHeadModel", "layernorm", ("transformer", "ln_f"), _gpt2_config)
LLAMA = ModelKind("hf-llama", "LlamaForCausalLM", "rmsnorm", ("model", "norm"), _llama_config)
GEMMA2 = ModelKind("hf-gemma2", "Gemma2ForCausalLM", "rmsnorm", ("model", "norm"), _gemma2_config,
                   gain_minus_one=True, has_softcap=True, attention="eager",
                   prepared_masks=("full_attention", "sliding_attention"))
KINDS = (GPT2, LLAMA, GEMMA2)


def _install(module: nn.Module, name: str, tensor: torch.Tensor | None) -> None:
    """Make ``module.<name>`` be ``tensor`` itself (not a copy), so that autograd reaches it."""
    if name in module._parameters:
        delattr(module, name)
    setattr(module, name, tensor)


def head_only(spec: LossSpec | None) -> LossSpec:
    """The head's options of ``spec`` (its loss options play no part in the logits)."""
    spec = spec or LossSpec()
    return LossSpec(norm=spec.norm, norm_eps=spec.norm_eps, norm_weight=spec.norm_weight,
                    norm_bias=spec.norm_bias, class_scale=spec.class_scale, logit_scale=spec.logit_scale,
                    softcap=spec.softcap)


class HFHead(Implementation):
    """A transformers causal-LM model's own head and loss (see the module docstring)."""

    family = "heads"
    takes_batches = True  # HF models take (B, T, D); (N, D) inputs run as one sequence
    applies_loss_div_factor = True  # through num_items_in_batch

    def __init__(self, kind: ModelKind) -> None:
        self.kind = kind
        self.name = kind.name
        softcap = ", final_logit_softcapping" if kind.has_softcap else ""
        tied = "lm_head tied to the embedding" if kind is not LLAMA else "untied lm_head"
        self.summary = (
            f"transformers' {kind.model_class} with 0 layers: its final {kind.norm}, {tied}{softcap} and "
            "ForCausalLMLoss (labels passed as shift_labels; sum / num_items_in_batch)"
        )

    def availability(self) -> Availability:
        if importlib.util.find_spec("transformers") is None:
            return Availability(False, f"transformers is not installed: {PACKAGE_HINT}")
        return Availability(True, f"transformers' {self.kind.model_class}, 0 layers, random config")

    def capabilities(self, device):
        supported = ("norm", "ignore_index", "loss_div_factor") + (("softcap",) if self.kind.has_softcap else ())
        unsupported = dict(NOT_IN_HF)
        if not self.kind.has_softcap:
            unsupported["softcap"] = "the model has no final logit softcapping (Gemma-2's config has)"
        return Capabilities(reductions=("mean", "sum"), supported_options=supported, unsupported_options=unsupported)

    def unsupported_reason(self, spec, *, dtype, device, has_bias):
        reason = super().unsupported_reason(spec, dtype=dtype, device=device, has_bias=has_bias)
        if reason is not None:
            # Where it runs at all, every device and dtype: then a reduction refused is "none", and why.
            return NO_PER_TOKEN_LOSS if spec.reduction == "none" and self.availability().available else reason
        if spec.norm is not None and spec.norm != self.kind.norm:
            return (f"norm={spec.norm}: {self.kind.model_class}'s final norm is {self.kind.describe_norm()} "
                    f"(norm={self.kind.norm})")
        return None

    # --- the model -------------------------------------------------------------------------------

    def build(self, weight: torch.Tensor, spec: LossSpec, *, positions: int = 1) -> nn.Module:
        """The model, with the harness's tensors as its head: ``lm_head.weight`` (and the tied input
        embedding) is ``weight``, the final norm's parameters are the spec's (``g - 1`` for Gemma),
        or the norm is ``nn.Identity()`` when the spec has none. ``positions``: the longest sequence."""
        import transformers
        from transformers.initialization import no_init_weights

        config = self.kind.config(weight.shape[0], weight.shape[1], max(positions, 1), spec)
        model_class = getattr(transformers, self.kind.model_class)
        # Its own parameters are replaced by the harness's or unused: skip their random
        # initialisation, then tie the weights as from_pretrained does after loading (the skipped
        # init_weights would have).
        with no_init_weights(), torch.device(weight.device):
            model = model_class._from_config(config, dtype=weight.dtype)
        model.tie_weights()
        # GPT2LMHeadModel's class name names no loss, so HF falls back to ForCausalLMLoss with a
        # warning; name it, as every *ForCausalLM class's name does.
        if model.loss_type is None:
            model.loss_type = "ForCausalLM"
        own = list(model.parameters())
        model.requires_grad_(False)  # before the harness's tensors are in: they keep theirs
        embedding = model.get_input_embeddings()
        tied = model.lm_head.weight is embedding.weight
        _install(model.lm_head, "weight", weight)
        # The trunk embeds the dummy input_ids, whose states the hook then replaces: tied, its
        # embedding is the head weight; untied, a zero-stride (V, D) view of zeros, not V x D of memory.
        vocab, dim = weight.shape
        _install(embedding, "weight", weight if tied else weight.new_zeros(1, dim).expand(vocab, dim))
        parent, attribute = self._norm_parent(model)
        if spec.norm is None:
            setattr(parent, attribute, nn.Identity())
        else:
            self._install_norm(getattr(parent, attribute), spec, weight.dtype)
        remaining = {id(p) for p in model.parameters()}
        with torch.no_grad():  # what stays of its own (GPT-2's position embedding): deterministic
            for parameter in own:
                if id(parameter) in remaining:
                    parameter.zero_()
        return model.eval()  # no dropout (GPT-2's embedding dropout is in the replaced trunk anyway)

    def _norm_parent(self, model: nn.Module) -> tuple[nn.Module, str]:
        parent = model
        for attribute in self.kind.norm_path[:-1]:
            parent = getattr(parent, attribute)
        return parent, self.kind.norm_path[-1]

    def _install_norm(self, norm: nn.Module, spec: LossSpec, dtype: torch.dtype) -> None:
        dim = norm.weight.shape[0]
        gain = None if spec.norm_weight is None else spec.norm_weight.to(dtype)
        if self.kind.norm == "layernorm":  # nn.LayerNorm takes None for either
            _install(norm, "weight", gain)
            _install(norm, "bias", None if spec.norm_bias is None else spec.norm_bias.to(dtype))
        elif self.kind.gain_minus_one:  # Gemma2RMSNorm: x_hat * (1 + weight)
            _install(norm, "weight", norm.weight.new_zeros(dim) if gain is None else gain - 1)
        else:
            _install(norm, "weight", norm.weight.new_ones(dim) if gain is None else gain)

    def final_norm(self, model: nn.Module) -> nn.Module:
        parent, attribute = self._norm_parent(model)
        return getattr(parent, attribute)

    def forward(self, model: nn.Module, hidden: torch.Tensor, **kwargs):
        """``model(input_ids=zeros(B, T), **kwargs)`` with ``hidden`` ``(B, T, D)`` fed into the final
        norm in place of the trunk's output."""
        handle = self.final_norm(model).register_forward_pre_hook(lambda module, args: (hidden,))
        try:
            input_ids = torch.zeros(hidden.shape[:-1], dtype=torch.long, device=hidden.device)
            if self.kind.prepared_masks:
                kwargs["attention_mask"] = dict.fromkeys(self.kind.prepared_masks)
            return model(input_ids=input_ids, use_cache=False, **kwargs)
        finally:
            handle.remove()

    # --- the contract ----------------------------------------------------------------------------

    def known_issues(self, device):
        return (SHIFT_LABELS_VIEWED,)

    def compute(self, hidden, weight, labels, spec, bias):
        batched = hidden.dim() == 3
        hidden = hidden if batched else hidden.unsqueeze(0)
        labels = (labels if batched else labels.unsqueeze(0)).long()
        model = self.build(weight, spec, positions=hidden.shape[1])
        kwargs = {"labels": labels, "shift_labels": labels, "ignore_index": spec.ignore_index}
        if spec.reduction == "sum":
            kwargs["num_items_in_batch"] = spec.loss_div_factor
        elif spec.loss_div_factor != 1.0:  # the items of the accumulated batch: this one's, times the factor
            kwargs["num_items_in_batch"] = (labels != spec.ignore_index).sum() * spec.loss_div_factor
        return LossOutput(self.forward(model, hidden, **kwargs).loss, None)

    def logits(self, hidden, weight, *, bias=None, spec=None, logits_to_keep=0):
        head = head_only(spec)
        reason = self.unsupported_reason(head, dtype=hidden.dtype, device=hidden.device.type,
                                         has_bias=bias is not None)
        if reason is not None:
            raise UnsupportedCase(reason)
        batched = hidden.dim() == 3
        if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dim() != 1 and not batched:
            raise UnsupportedCase("logits_to_keep for (N, D) hidden states is an int or a (K,) tensor of positions")
        hidden = hidden if batched else hidden.unsqueeze(0)
        model = self.build(weight, head, positions=hidden.shape[1])
        logits = self.forward(model, hidden, logits_to_keep=logits_to_keep).logits
        return logits if batched else logits.squeeze(0)


def hf_implementations() -> tuple[HFHead, ...]:
    return tuple(HFHead(kind) for kind in KINDS)


# Gemma2ForCausalLM soft-caps the logits in the model's dtype (modeling_gemma2.py) and upcasts only in the
# loss: within the gate's budget (0.27 x the allowance on the case that showed it under the old rule; CPU
# machine, 2026-12-07), so no entry.


# --- known issues of transformers 5.23 ---

# Every property that runs the loss on the case's laid-out inputs.
_LOSS_PROPERTIES = (
    "equivalence/float32", "equivalence/bfloat16", "equivalence/float16", "equivalence/large-vocab",
    "equivalence/model-sizes", "precision/at-scale", "autograd/grad-subsets", "autograd/scaled-loss",
    "autograd/retain-graph", "autograd/no-grad", "autograd/inputs-unchanged", "autograd/tied-weights",
    "autograd/interleaved", "autograd/training-steps", "invariance/sum-split", "invariance/permutation",
)
SHIFT_LABELS_VIEWED = KnownLimitation(
    "transformers 5.23's ForCausalLMLoss flattens shift_labels with .view(-1) (loss/loss_utils.py), which raises "
    "for a non-contiguous one: labels already shifted by the caller and passed as a view (ids[:, 1:] of a batch, "
    "the harness's 'sliced' layout) are refused; labels= (which it pads and copies) works",
    _LOSS_PROPERTIES, "RuntimeError", "view size is not compatible with input tensor's size and stride",
    "transformers 5.23",
    case="B=3,T=37,D=33,V=131,dtype=float32,reduction=sum,ignored=some,layout=sliced,seed=1451",
)
