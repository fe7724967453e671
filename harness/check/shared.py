"""What the checks of every implementation share in one gate run: the float64 reference of a case
(with its term magnitudes) and the yardstick's outcome on it.

Both depend on the case alone, and they are most of an equivalence check's time (on the CPU
machine, 2026-12-07: 45% of hf-llama's equivalence properties). A gate over several
implementations runs each in processes of its own, so they meet on disk: the first check of a case
computes and saves, the others load. The folder lives as long as the run (``check`` makes it when
it checks more than one implementation and removes it at the end); without one, everything is
computed in place. A result is written under a temporary name, then renamed, so that a reader
never sees half a file; two processes that compute the same case at once write the same numbers.
"""

from __future__ import annotations

import hashlib
import os
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
        if _size_in_bytes(result) <= LARGEST_SAVED_BYTES:
            partial = path.with_name(f"{key}.{os.getpid()}.partial")
            torch.save(result, partial)
            os.replace(partial, path)
        return result


def _size_in_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_size_in_bytes(v) for v in value.values())
    if hasattr(value, "__dataclass_fields__"):
        return sum(_size_in_bytes(getattr(value, name)) for name in value.__dataclass_fields__)
    return 0
