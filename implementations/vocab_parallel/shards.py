"""How V classes are split over P ranks: each rank holds a contiguous range of rows of the head.

Two conventions are in use, and an implementation must use the one its library assumes, since
the library derives each rank's first class id from it:

- ``balanced``: the first ``V mod P`` ranks hold ``ceil(V / P)`` classes, the others
  ``floor(V / P)`` (``numpy.array_split``). The project's sharded chunked loss uses it.
- ``ceil``: every rank holds ``ceil(V / P)`` classes until they run out, so the last ranks hold
  fewer, possibly none (``torch.chunk``; DTensor's ``Shard`` placement). With V = 4 and P = 3:
  2, 2 and 0.
- Megatron-core assumes V divisible by P (it pads the vocabulary with trainable rows); its
  adapter refuses other cases.
"""

from __future__ import annotations

from dataclasses import dataclass

SPLITS = ("balanced", "ceil")


@dataclass(frozen=True)
class Shard:
    """Rank ``rank``'s classes: ``start`` (inclusive) to ``stop`` (exclusive)."""

    rank: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def split_vocab(vocab: int, world_size: int, how: str) -> tuple[Shard, ...]:
    """The P shards of ``vocab`` classes under convention ``how`` (see the module docstring)."""
    if world_size < 1:
        raise ValueError(f"world size must be at least 1, got {world_size}")
    if how == "balanced":
        base, extra = divmod(vocab, world_size)
        sizes = [base + (rank < extra) for rank in range(world_size)]
    elif how == "ceil":
        per_rank = -(-vocab // world_size)
        sizes = [max(0, min(per_rank, vocab - rank * per_rank)) for rank in range(world_size)]
    else:
        raise ValueError(f"unknown vocabulary split {how!r}; expected one of {', '.join(SPLITS)}")
    shards, start = [], 0
    for rank, size in enumerate(sizes):
        shards.append(Shard(rank, start, start + size))
        start += size
    return tuple(shards)
