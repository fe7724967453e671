"""Spreading one sweep over several GPUs with ``torchrun --nproc-per-node K -m harness sweep``.

torchrun starts K sweep processes with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set. They
form a process group only to agree on things (the run id, the device's description and matmul
rate) and to wait for each other at the end; no tensor crosses devices, so the group always uses
the gloo backend over TCP, and the sweep processes themselves never touch a GPU. Each rank takes
every K-th job and runs its cases, each still in its own child process, on its own GPU
(``CUDA_VISIBLE_DEVICES`` set to its local rank's device for the children). All ranks append to
the same ``rows.csv`` (``RowWriter`` locks the file for each append); rank 0 writes ``meta.json``
and the report once every rank has finished.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass

import torch.distributed as dist

# Ranks wait for each other at the end of the sweep, which can be hours apart.
GROUP_TIMEOUT = dt.timedelta(hours=48)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_leader(self) -> bool:
        return self.rank == 0


def ranks_from_environment(environ: dict[str, str] | None = None) -> Ranks:
    environ = os.environ if environ is None else environ
    world_size = int(environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Ranks()
    return Ranks(rank=int(environ["RANK"]), world_size=world_size, local_rank=int(environ.get("LOCAL_RANK", "0")))


class Coordinator:
    """Broadcasts and barriers between the sweep processes; no-ops for a single process."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self.active = ranks.world_size > 1
        if self.active and not dist.is_initialized():
            dist.init_process_group(backend="gloo", timeout=GROUP_TIMEOUT)

    def share(self, value):
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if not self.active:
            return value
        box = [value if self.ranks.is_leader else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def wait_for_all(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def shard(items: list, ranks: Ranks) -> list:
    """This rank's share: every ``world_size``-th item, starting at its rank."""
    return items[ranks.rank :: ranks.world_size]


def visible_device_for(local_rank: int, environ: dict[str, str] | None = None) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` value that shows a child only its rank's GPU."""
    environ = os.environ if environ is None else environ
    visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[local_rank] if local_rank < len(visible) else str(local_rank)
