"""What ``python -m harness sweep`` with no case files measures, chosen from the machine it finds.

- A CUDA GPU: ``cases/gpu_smoke.toml``, the CCE paper's Table 1 head (Gemma 2 2B at N = 8192,
  with and without its softcap, random and peaked inputs), Llama-3 8B and one N = 16384 case, in
  bfloat16, sized for one ten-minute command (``gpu`` preset). ``gpu-full`` is every real model
  head of ``cases/models.toml`` at 4096-16384 tokens plus the vocabulary and token sweeps: about
  250 jobs, most of an hour on one H100.
- CPU only: ``cases/cpu_preset.toml``, the same kinds of shapes scaled down so that the whole
  sweep, process start-up and compilation included, finishes in a few minutes (``cpu`` preset).

A preset leaves out the implementations that cannot run with the packages the project pins
(``KNOWN_FAILURES``), each with its reason, which the sweep prints and records in ``meta.json``
(``excluded``) and the dashboard shows. Naming one with ``--impl`` runs it anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.sweep.measure import TimingSettings


@dataclass(frozen=True)
class DeviceDescription:
    """The machine as the preset choice sees it: ``kind`` is "cuda" or "cpu"."""

    kind: str
    name: str = ""
    memory_bytes: int | None = None


# Implementations a preset does not run, with why: each would only add an error row per case.
KNOWN_FAILURES = (
    ("olmo-core-fused",
     "known failure with liger-kernel 0.8 (the pinned version): OLMo-core unpacks three outputs of Liger's "
     "fused linear cross-entropy, which returns four, so the head raises at its first call"),
)


@dataclass(frozen=True)
class Preset:
    name: str
    case_files: tuple[str, ...]
    timeout_s: float  # per (case, implementation) process
    timing: TimingSettings
    summary: str
    excluded: tuple[tuple[str, str], ...] = KNOWN_FAILURES  # (implementation, why it is left out)


GPU_PRESET = Preset(
    name="gpu",
    case_files=("gpu_smoke",),
    # A job that hangs must not take the ten minutes: the slowest expected (torch-compile, cold
    # caches, Gemma 2's head) compiles in well under this.
    timeout_s=150,
    timing=TimingSettings(measure_time=0.1, min_repeats=5, gpu_warmup=0.025),
    summary="the CCE paper's Table 1 head, Gemma-2 with softcap, Llama-3 8B in bfloat16 (about 8 minutes)",
)

GPU_FULL_PRESET = Preset(
    name="gpu-full",
    case_files=("models", "sweep_vocab", "sweep_tokens"),
    timeout_s=600,
    timing=TimingSettings(measure_time=0.1, min_repeats=5, gpu_warmup=0.025),
    summary="real model heads at 4096-16384 tokens and V/N sweeps in bfloat16 (most of an hour)",
)

CPU_PRESET = Preset(
    name="cpu",
    case_files=("cpu_preset",),
    timeout_s=90,
    timing=TimingSettings(measure_time=0.2, min_repeats=3),
    summary="scaled-down heads in float32 (no GPU here), sized to finish in a few minutes",
)


def choose_preset(device: DeviceDescription) -> Preset:
    """The GPU preset on a CUDA device, the CPU preset otherwise."""
    return GPU_PRESET if device.kind == "cuda" else CPU_PRESET

PRESETS = {preset.name: preset for preset in (GPU_PRESET, GPU_FULL_PRESET, CPU_PRESET)}
