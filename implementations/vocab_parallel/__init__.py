"""Vocab-parallel LM-head losses across processes: the pieces behind ``implementations.distributed``.

- ``shards``: how a vocabulary of V classes is split over P ranks (two conventions);
- ``ranks``: what one rank computes on its shard (the project's sharded chunked loss, torch's
  DTensor ``loss_parallel``, Megatron-core's ``vocab_parallel_cross_entropy``), and how the bytes
  of the collectives it issues are counted;
- ``pool``: a persistent pool of P rank processes (gloo on CPU) that the adapters send work to, so
  that the gate's hundreds of calls do not each start P processes;
- ``torchrun``: the sweep's job for these implementations, one process per rank under
  ``torchrun --nproc-per-node P``: time, per-rank peak memory and bytes communicated.
"""
