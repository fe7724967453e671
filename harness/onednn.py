"""oneDNN's matmul on the CPU, as torch reaches it from Python.

torch.mm on the CPU calls the BLAS torch was built with: MKL in the PyPI wheels, whose generic x86
path is what it runs on AMD CPUs. oneDNN, also inside those wheels, has AVX-512 kernels for them:
on the project's AMD CPU machine it runs a float32 matmul at about twice torch.mm's rate
(docs/measurements/2026-12-02-chunked-onednn.md). Python reaches oneDNN's matmul through the op
inductor's CPU path calls, ``torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")``:
``x @ w.T + b``, float32 in, accumulated and returned in float32 (a new tensor: it has no
``out=``). It is an internal op, so it is probed once and used only if it computes that.

Two of its ways: it reads a bias as if it were contiguous (a strided bias gives wrong logits, so
callers pass a contiguous one), and a weight operand that is a non-dense view (a column block of a
larger matrix) sends it to a reference kernel about a thousand times slower.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def onednn_linear():
    """oneDNN's linear, ``linear(x, w, b, "none", [], "") = x @ w.T + b``, if this build of torch has it
    and it computes that here (checked once on a small product against torch.addmm), else None."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        if not torch.backends.mkldnn.is_available():
            return None
        generator = torch.Generator().manual_seed(0)
        x, w = torch.randn(5, 33, generator=generator), torch.randn(7, 33, generator=generator)
        b = torch.randn(7, generator=generator)
        ok = torch.allclose(op(x, w, b, "none", [], ""), torch.addmm(b, x, w.t()), rtol=1e-5, atol=1e-5)
    except (AttributeError, RuntimeError):
        return None
    return op if ok else None
