"""What ``python -m harness sweep`` with no case files measures, chosen from the machine it finds.

- A CUDA GPU: the real model heads of ``cases/models.toml`` at training token counts, plus the
  vocabulary and token sweeps, in bfloat16 (``gpu`` preset).
- CPU only: ``cases/cpu_preset.toml``, the same kinds of shapes scaled down so that the whole
  sweep, process start-up and compilation included, finishes in a few minutes (``cpu`` preset).
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


@dataclass(frozen=True)
class Preset:
    name: str
    case_files: tuple[str, ...]
    timeout_s: float  # per (case, implementation) process
    timing: TimingSettings
    summary: str


GPU_PRESET = Preset(
    name="gpu",
    case_files=("models", "sweep_vocab", "sweep_tokens"),
    timeout_s=600,
    timing=TimingSettings(measure_time=0.1, min_repeats=5, gpu_warmup=0.025),
    summary="real model heads at 4096-16384 tokens and V/N sweeps in bfloat16",
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

PRESETS = {preset.name: preset for preset in (GPU_PRESET, CPU_PRESET)}
