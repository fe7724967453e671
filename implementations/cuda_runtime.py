"""Why a GPU-only peer cannot run here: no CUDA GPU, or one older than its kernels need.

Checked before the package itself, so that on a CPU machine each GPU-only adapter says what it
needs (not an import error), and on a GPU machine without the package, how to install it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

import torch

from harness.adapter import Availability


def gpu_availability(kernels: str, package: str, module: str, *,
                     min_capability: tuple[int, int] | None = None) -> Availability:
    """``kernels`` (what runs, in words) needs a CUDA GPU (of at least ``min_capability``) and the
    distribution ``package`` providing ``module``; unavailable with the first reason that applies."""
    needs = "an NVIDIA GPU" if min_capability is None else (
        f"an NVIDIA GPU of compute capability {min_capability[0]}.{min_capability[1]} or newer")
    if not torch.cuda.is_available():
        return Availability(False, f"{kernels} need {needs}; this machine has no CUDA GPU")
    capability = torch.cuda.get_device_capability()
    if min_capability is not None and capability < min_capability:
        return Availability(False, f"{kernels} need {needs}; this GPU is {capability[0]}.{capability[1]}")
    if importlib.util.find_spec(module) is None:
        return Availability(False, f"{package} is not installed (its wheels: docs/peers.md)")
    return Availability(True, f"{package} {importlib.metadata.version(package)}")
