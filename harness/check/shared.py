"""What the checks of every implementation share in one gate run: the float64 reference of a case
(with its term magnitudes) and the yardstick's outcome on it.

Both depend on the case alone, and they are most of an equivalence check's time (on the CPU
machine, 2026-12-07: 45% of hf-llama's equivalence properties). A gate over several
implementations runs each in processes of its own, so they meet on disk: the first check of a case
computes and saves, the others load. The folder lives as long as the run (``check`` makes it when
it checks more than one implementation and removes it at the end); without one, everything is
computed in place. A result is written under a temporary name, then renamed, so that a reader
never sees half a file; two processes that compute the same case at once write the same numbers.
Only cases that other checks meet are worth saving: every explicit example, and drawn cases in a
seeded profile (``run_property`` gives the random draws of the others no folder).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from harness.case import Case

Result = TypeVar("Result")

# A result above this is computed in place rather than saved: writing and reading it back would
# cost about what computing it does.
LARGEST_SAVED_BYTES = 1 << 30
# A run's results may take at most this share of the space that was free when its folder was made:
# they only save time, never worth a full disk (a run over thousands of cases would otherwise write
# tens of GiB). Past it, results are computed in place.
USABLE_FREE_FRACTION = 0.5
# The file in the folder that holds the free space a save must leave, in bytes.
FLOOR_FILE = "keep-free-bytes"


FOLDER_PREFIX = "lmhead-check-shared-"


def new_folder() -> tempfile.TemporaryDirectory:
    """A run's folder, named after its process, with the free space its saves must leave. The
    folders of runs whose process is gone (killed before it could remove its own) are removed first."""
    for old in Path(tempfile.gettempdir()).glob(f"{FOLDER_PREFIX}*"):
        pid = old.name[len(FOLDER_PREFIX):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    folder = tempfile.TemporaryDirectory(prefix=f"{FOLDER_PREFIX}{os.getpid()}-")
    free = shutil.disk_usage(folder.name).free
    (Path(folder.name) / FLOOR_FILE).write_text(str(int(free * (1 - USABLE_FREE_FRACTION))))
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@dataclass(frozen=True)
class SharedResults:
    folder: Path | None = None

    def get(self, kind: str, case: Case, device: str, compute: Callable[[], Result]) -> Result:
        """``compute()``'s result for (``kind``, ``case``, ``device``), loaded when a check of another
        implementation in this run saved it."""
        if self.folder is None:
            return compute()
        key = hashlib.sha256(f"{kind}|{device}|{case!r}".encode()).hexdigest()[:32]
        path = self.folder / f"{key}.pt"
        try:
            return torch.load(path, weights_only=False)
        except FileNotFoundError:
            pass
        result = compute()
        size = _size_in_bytes(result)
        if size <= LARGEST_SAVED_BYTES and _room_for(self.folder, size):
            partial = path.with_name(f"{key}.{os.getpid()}.partial")
            try:
                torch.save(result, partial)
                os.replace(partial, path)
            except OSError:  # a full disk, say: saving only saves time, so the check goes on
                partial.unlink(missing_ok=True)
        return result


def _room_for(folder: Path, size: int) -> bool:
    """Whether ``size`` more bytes leave the free space its run's folder must keep (none recorded: 0)."""
    try:
        floor = int((folder / FLOOR_FILE).read_text())
    except (FileNotFoundError, ValueError):
        floor = 0
    return shutil.disk_usage(folder).free - size >= floor


def _size_in_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_size_in_bytes(v) for v in value.values())
    if hasattr(value, "__dataclass_fields__"):
        return sum(_size_in_bytes(getattr(value, name)) for name in value.__dataclass_fields__)
    return 0
