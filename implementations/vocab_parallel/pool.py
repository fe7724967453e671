"""A persistent pool of P rank processes that compute vocab-parallel losses for the calling process.

The gate calls an implementation hundreds of times; starting P processes (each importing torch,
then forming a process group) for every call would take seconds each. So each world size gets
one pool, started on first use and kept until the calling process exits (``atexit``, and each
rank also dies with its parent: ``PR_SET_PDEATHSIG``). That pool is the only state this module
keeps.

- Each rank is ``python -m implementations.vocab_parallel.pool`` (a fresh interpreter: not a
  fork of the caller, and not the spawn method, which re-imports the caller's main script). The
  ranks form a process group over a ``TCPStore`` that the calling process hosts on 127.0.0.1 (no
  port to guess), gloo on CPU and NCCL on GPUs, and run one thread each.
- A call sends each rank its ``ranks.Request`` and waits for every ``ranks.Reply``. Requests and
  replies travel as ``torch.save`` bytes over an authenticated local connection
  (``multiprocessing.connection``), so any dtype goes and nothing is shared.
- An error on a rank comes back as the same exception type (builtin ones; others as
  ``RuntimeError``), its message prefixed by ``rank r of P``. When only some ranks failed, or one
  did not answer within ``REPLY_TIMEOUT_S``, the ranks may disagree on how many collectives they
  issued, so the pool is closed and the next call starts a fresh one. (A collective that waits on
  a rank which left it fails after ``COLLECTIVE_TIMEOUT``.)
"""

from __future__ import annotations

import argparse
import atexit
import builtins
import ctypes
import datetime as dt
import io
import os
import secrets
import signal
import subprocess
import sys
from multiprocessing.connection import Client, Listener

import torch

from implementations.vocab_parallel.ranks import RankFailure, Reply, Request

COLLECTIVE_TIMEOUT = dt.timedelta(seconds=60)
REPLY_TIMEOUT_S = 240.0
START_TIMEOUT_S = 120.0


def pack(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def unpack(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)  # our own processes' data


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def serve(rank: int, world_size: int, store_port: int, listener_port: int, backend: str) -> None:
    """A rank's life: join the group, then answer requests until told to stop (None)."""
    import torch.distributed as dist

    from implementations.vocab_parallel.ranks import Group, compute

    _die_with_parent()
    torch.set_num_threads(1)  # P ranks share the machine's cores with the calling process
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    connection = Client(("127.0.0.1", listener_port), authkey=bytes.fromhex(os.environ["VOCAB_PARALLEL_AUTHKEY"]))
    connection.send_bytes(pack(rank))  # at once: the caller accepts every rank before any can form the group
    store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=COLLECTIVE_TIMEOUT)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    where = Group(rank, world_size, dist.group.WORLD, device)
    connection.send_bytes(pack("ready"))
    try:
        while True:
            try:
                request = unpack(connection.recv_bytes())
            except EOFError:  # the caller went away
                break
            if request is None:
                break
            try:
                reply = compute(_to(request, device), where)
                if rank != 0:  # every rank holds the same hidden-state gradient; one sends it
                    reply = Reply(reply.loss, reply.z_loss, None, reply.grad_weight, reply.grad_bias)
                reply = _to(reply, torch.device("cpu"))
            except Exception as exc:  # noqa: BLE001 - every error goes back to the caller
                reply = RankFailure(type(exc).__name__, " ".join(str(exc).split())[:500])
            connection.send_bytes(pack(reply))
    finally:
        dist.destroy_process_group()


def _to(value, device: torch.device):
    """A Request or Reply with its tensors on ``device``."""
    import dataclasses

    changes = {f.name: getattr(value, f.name).to(device) for f in dataclasses.fields(value)
               if isinstance(getattr(value, f.name), torch.Tensor)}
    return dataclasses.replace(value, **changes)


def _exception(rank: int, world_size: int, failure: RankFailure) -> Exception:
    kind = getattr(builtins, failure.error_type, None)
    if not (isinstance(kind, type) and issubclass(kind, Exception)):
        kind = RuntimeError
    return kind(f"rank {rank} of {world_size}: {failure.error_type}: {failure.message}")


class RankPool:
    """P rank processes and the pipes to them; ``run`` sends one request per rank."""

    def __init__(self, world_size: int, backend: str) -> None:
        self.world_size, self.backend = world_size, backend
        self._processes: list = []
        self._connections: list = []
        self._store = None

    @property
    def running(self) -> bool:
        return bool(self._processes)

    def start(self) -> None:
        import torch.distributed as dist

        # The store lives in this process, on a port the system picks; the ranks connect to it.
        self._store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                    timeout=COLLECTIVE_TIMEOUT)
        authkey = secrets.token_bytes(16)
        environment = dict(os.environ, VOCAB_PARALLEL_AUTHKEY=authkey.hex(),
                           PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        with Listener(("127.0.0.1", 0), authkey=authkey) as listener:
            host, port = listener.address
            for rank in range(self.world_size):
                command = [sys.executable, "-m", "implementations.vocab_parallel.pool", "--rank", str(rank),
                           "--world-size", str(self.world_size), "--store-port", str(self._store.port),
                           "--listener-port", str(port), "--backend", self.backend]
                self._processes.append(subprocess.Popen(command, env=environment, stdin=subprocess.DEVNULL))
            connections = {}
            # accept() would wait forever for a rank that died before connecting: give it a limit
            # (multiprocessing.connection has no public knob for it).
            listener._listener._socket.settimeout(START_TIMEOUT_S)
            try:
                for _ in range(self.world_size):
                    connection = listener.accept()
                    connections[unpack(connection.recv_bytes())] = connection
                for connection in connections.values():
                    if not connection.poll(START_TIMEOUT_S):
                        raise TimeoutError
                    unpack(connection.recv_bytes())
            except (OSError, EOFError) as exc:  # TimeoutError is an OSError
                self._connections = list(connections.values())
                self.close()
                raise RuntimeError(f"the {self.world_size} vocab-parallel ranks did not all start within "
                                   f"{START_TIMEOUT_S:.0f} s ({type(exc).__name__})") from None
        self._connections = [connections[rank] for rank in range(self.world_size)]

    def run(self, requests: list[Request]) -> list[Reply]:
        """Every rank's reply; raises the lowest rank's error when one failed."""
        if len(requests) != self.world_size:
            raise ValueError(f"{len(requests)} requests for a pool of {self.world_size} ranks")
        if not self.running:
            self.start()
        try:
            for connection, request in zip(self._connections, requests):
                connection.send_bytes(pack(request))
            replies = []
            for rank, connection in enumerate(self._connections):
                if not connection.poll(REPLY_TIMEOUT_S):
                    raise TimeoutError(f"vocab-parallel rank {rank} of {self.world_size} did not answer within "
                                       f"{REPLY_TIMEOUT_S:.0f} s; its pool was stopped")
                replies.append(unpack(connection.recv_bytes()))
        except (OSError, EOFError, TimeoutError) as exc:  # a rank died or hung: start afresh next time
            self.close()
            if isinstance(exc, TimeoutError):
                raise
            raise RuntimeError(f"a vocab-parallel rank of {self.world_size} died ({type(exc).__name__}); "
                               "its pool was stopped") from None
        failures = [(rank, r) for rank, r in enumerate(replies) if isinstance(r, RankFailure)]
        if failures:
            if len(failures) < self.world_size:  # the ranks may be out of step in their collectives
                self.close()
            # The cause, not the ranks left waiting for the one that failed (gloo: "Timed out waiting").
            rank, failure = min(failures, key=lambda f: ("timed out" in f[1].message.lower(), f[0]))
            raise _exception(rank, self.world_size, failure)
        return replies

    def close(self) -> None:
        for connection in self._connections:
            try:
                connection.send_bytes(pack(None))
            except OSError:
                pass
        for process in self._processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:  # stuck in a collective: nothing left to save
                process.kill()
                process.wait()
        for connection in self._connections:
            connection.close()
        self._processes, self._connections, self._store = [], [], None


_POOLS: dict[tuple[int, str], RankPool] = {}


def pool_for(world_size: int, backend: str) -> RankPool:
    """The pool of ``world_size`` ranks on ``backend`` (started at its first ``run``)."""
    key = (world_size, backend)
    if key not in _POOLS:
        _POOLS[key] = RankPool(world_size, backend)
    return _POOLS[key]


def close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


atexit.register(close_pools)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one rank of a vocab-parallel pool (started by RankPool)")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--store-port", type=int, required=True)
    parser.add_argument("--listener-port", type=int, required=True)
    parser.add_argument("--backend", choices=("gloo", "nccl"), required=True)
    args = parser.parse_args(argv)
    serve(args.rank, args.world_size, args.store_port, args.listener_port, args.backend)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
