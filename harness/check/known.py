"""Known failures of built-in implementations, recorded in one place.

- A **failure** is a genuine numerical or contract failure of a peer package (a bug, or an
  accuracy trade-off made by design, as the reason says). Mismatches it explains
  (its implementation, properties, compared tensors, dtypes and reductions) are recorded instead
  of failing the property, which then shows "known-failure (reason)" with a reproducer and does
  not fail ``check``'s exit status; anything else that differs still fails. Its ``example`` is a
  case that shows it: ``tests/test_check_known.py`` expects that case to fail (strictly), so a
  fixed failure shows up as an unexpected pass and its entry is removed.
- A **limitation** is documented behaviour that refuses a case loudly (it raises an error)
  instead of computing something wrong: the property shows "unsupported" with the error, as a
  declared unsupported option would. Were it to return a wrong result instead of raising, the
  property would fail.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.check.case import Case


@dataclass(frozen=True)
class Known:
    implementation: str
    kind: str  # "failure" or "limitation"
    reason: str
    properties: tuple[str, ...] = ()  # property ids; empty: every property
    tensors: tuple[str, ...] = ()  # failure: the compared tensors it explains (loss, grad_hidden, ...)
    dtypes: tuple[str, ...] = ()  # failure: the dtypes it shows in; empty: every dtype
    reductions: tuple[str, ...] = ()  # failure: the reductions it shows in; empty: every reduction
    frozen: tuple[str, ...] = ()  # failure: shows only when these inputs do not require grad
    example: str = ""  # a --case that shows it, with the property it fails: "property: case"

    def explains(self, property_id: str, case: Case, tensor: str) -> bool:
        """Whether this known failure accounts for a mismatch of ``tensor`` in this property and case."""
        return (
            self.kind == "failure"
            and (not self.properties or property_id in self.properties)
            and tensor in self.tensors
            and (not self.dtypes or case.dtype in self.dtypes)
            and (not self.reductions or case.reduction in self.reductions)
            and not any(name in case.grads for name in self.frozen)
        )


KNOWN = (
    Known(
        "liger",
        "failure",
        "liger-kernel 0.8.5 computes the head's gradients only when the hidden states require grad: "
        "with a frozen backbone the weight and bias get no gradient at all, silently",
        properties=("autograd/grad-subsets",),
        tensors=("grad_weight", "grad_bias"),
        frozen=("hidden",),
        example="autograd/grad-subsets: N=5,D=3,V=17,dtype=float32,reduction=mean,bias=1,grads=weight+bias,seed=5",
    ),
    Known(
        "liger",
        "failure",
        "liger-kernel 0.8.5 multiplies the gradients saved in the forward by the upstream gradient in "
        "place (element_mul_kernel): a second backward through a retained graph of a scaled loss "
        "adds c^2 instead of c times the gradient",
        properties=("autograd/retain-graph",),
        tensors=("grad_hidden", "grad_weight", "grad_bias"),
        reductions=("mean", "sum"),
        example="autograd/retain-graph: N=6,D=5,V=33,dtype=float32,reduction=mean,bias=1,ignored=some,seed=10",
    ),
    Known(
        "torch-linear-ce",
        "limitation",
        "F.linear_cross_entropy frees its saved gradients after one backward unless "
        "LinearCrossEntropyOptions(allow_retain_graph=True) (documented; the default is False)",
        properties=("autograd/retain-graph",),
    ),
    Known(
        "torch-compile",
        "limitation",
        "torch.compile donates the saved buffers of its backward by default: a second backward "
        "(retain_graph=True) raises and names the switch, torch._functorch.config.donated_buffer=False",
        properties=("autograd/retain-graph",),
    ),
    Known(
        "cce",
        "limitation",
        "on a CPU, cut-cross-entropy runs its torch.compile implementation, whose backward donates "
        "its saved buffers: a second backward (retain_graph=True) raises (its Triton kernels on a GPU do not)",
        properties=("autograd/retain-graph",),
    ),
)


def known_failures(implementation: str) -> tuple[Known, ...]:
    return tuple(k for k in KNOWN if k.implementation == implementation and k.kind == "failure")


def known_limitation(implementation: str, property_id: str) -> Known | None:
    for known in KNOWN:
        if known.implementation == implementation and known.kind == "limitation" and property_id in known.properties:
            return known
    return None
