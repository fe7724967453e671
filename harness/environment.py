"""Where a run happens: the device it uses, and what a run's ``meta.json`` records about it.

``host_environment`` runs in the sweep's own process and never touches the GPU (so the parent
holds no CUDA context while cases run). ``device_environment`` runs in a child process, like a
case: the device's name, memory, driver and CUDA versions, and its matmul rate per dtype.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import torch


PROJECT_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "triton", "liger-kernel", "cut-cross-entropy", "numpy", "pandas")


def local_device() -> str:
    """The device runs use by default: the GPU when torch sees one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def missing_gpu() -> str | None:
    """One line when torch is a CUDA build but sees no GPU (None otherwise).

    Everything then falls back quietly to the CPU: the harness turns on Triton's interpreter, and
    ``sweep`` picks the CPU preset. On a machine meant to measure a GPU that is a wasted run, so
    the commands print this loudly and ``meta.json`` records it (``gpu_missing``).
    """
    if torch.version.cuda is None or torch.cuda.is_available():
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hint = f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "check the driver with nvidia-smi"
    return (f"WARNING: torch {torch.__version__} is a CUDA build (CUDA {torch.version.cuda}) but sees no GPU "
            f"({hint}): running on the CPU, Triton kernels through its interpreter")


def warn_if_gpu_missing() -> str | None:
    """Print ``missing_gpu()``'s line on stderr, if any, and return it."""
    warning = missing_gpu()
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)
    return warning


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["torch"] = torch.__version__  # includes the build (+cpu, +cu124)
    return versions


def git_commit(root: Path = PROJECT_ROOT) -> dict[str, object]:
    """The project's commit and whether tracked files differ from it (None outside a git checkout)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit, "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_bytes(field: str = "MemTotal") -> int | None:
    """A field of /proc/meminfo in bytes (MemTotal, MemAvailable), None where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def host_environment(argv: list[str] | None = None) -> dict:
    """Host, software and command line, gathered in the sweep process."""
    argv = sys.argv if argv is None else argv
    return {
        "host": socket.gethostname(),
        "created": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "harness", *argv[1:]]) if argv and argv[0].endswith("__main__.py")
        else shlex.join(argv),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "host_memory_bytes": memory_bytes("MemTotal"),
        "packages": package_versions(),
        "gpu_missing": missing_gpu(),
        **git_commit(),
    }


def device_environment(device: str) -> dict:
    """The device a case runs on, described from inside a child process."""
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        driver = None
        try:
            driver = torch._C._cuda_getDriverVersion()  # e.g. 12040 for 12.4; no public API for it
        except (AttributeError, RuntimeError):
            pass
        return {
            "device_name": props.name,
            "device_kind": "cuda",
            "device_memory_bytes": props.total_memory,
            "device_count_visible": torch.cuda.device_count(),
            "cuda_driver_version": driver,
            "cuda_runtime_version": torch.version.cuda,
            "compute_capability": f"{props.major}.{props.minor}",
        }
    return {
        "device_name": f"CPU: {cpu_model()}, {torch.get_num_threads()} threads (no GPU)",
        "device_kind": "cpu",
        "device_memory_bytes": memory_bytes("MemTotal"),
        "torch_threads": torch.get_num_threads(),
        "cuda_driver_version": None,
        "cuda_runtime_version": torch.version.cuda,
    }
