"""The processes of one run under ``torch.distributed``, and the few exchanges the layer walk needs.

``torchrun --nproc-per-node N -m bitcliff quantize ...`` starts N processes (ranks) and tells
each, through environment variables, how to reach the others; :meth:`Ranks.from_environment`
joins them, with the ``gloo`` backend on CPU and ``nccl`` on CUDA.  Outside torchrun it returns
:meth:`Ranks.single`, on which every exchange is a no-op, so the layer walk has one code path.

Every exchange is point to point between two named ranks (no collective): the error raised when
a peer dies or stops answering (:class:`RankLost`) can then say which rank was lost and during
what, and the order in which the owner of a module receives its peers' contributions is fixed
(rank order), which keeps sums deterministic.  Every wait is bounded by the process group's
timeout, so a lost rank never leaves the others waiting forever.
"""

from __future__ import annotations

import builtins
import datetime as dt
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 1800.0  # the longest a rank waits for a peer (one module's solve must fit)
CPU = torch.device("cpu")


class RankLost(RuntimeError):
    """A peer rank died or did not answer within the timeout."""


@dataclass
class Ranks:
    """This process's place among the ranks of a run.

    Attributes:
        rank: this process's index, 0 .. world - 1; rank 0 writes every file.
        world: number of processes.
        device: where exchanged tensors travel (``cuda:<local rank>`` under nccl, else cpu).
        timeout_s: the longest wait for a peer.
        exchange_s: seconds this rank has spent in exchanges so far: transfers, and waiting
            for peers that were still computing.
    """

    rank: int = 0
    world: int = 1
    device: torch.device = CPU
    timeout_s: float = DEFAULT_TIMEOUT_S
    exchange_s: float = field(default=0.0, compare=False)

    @classmethod
    def single(cls) -> Ranks:
        return cls()

    @classmethod
    def from_environment(cls, timeout_s: float = DEFAULT_TIMEOUT_S, device: torch.device | None = None) -> Ranks:
        """Join the process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``...);
        a single process when there is none or it has one rank.

        ``device``: where this rank computes (:func:`bitcliff.device.resolve_device`; None: a GPU
        when there is one).  On CUDA every rank takes its ``LOCAL_RANK`` GPU and the ranks talk over
        nccl; on the CPU over gloo.

        Raises:
            ValueError: a bad timeout, or one GPU named for every rank (``cuda:N`` with several ranks).
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls.single()
        if not (timeout_s > 0):
            raise ValueError(f"the rank timeout must be positive seconds, got {timeout_s!r}")
        on_cuda = torch.cuda.is_available() if device is None else device.type == "cuda"
        if on_cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if device is not None and device.index is not None and device.index != local \
                    and torch.cuda.device_count() > 1:
                raise ValueError(f"device {device}: with {world} ranks each rank computes on its own GPU "
                                 f"(cuda:LOCAL_RANK); pass --device cuda or auto")
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=dt.timedelta(seconds=timeout_s))
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), device=device, timeout_s=timeout_s)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def writes(self) -> bool:
        """Whether this rank writes the run's files (rank 0)."""
        return self.rank == 0

    def share(self, n: int) -> range:
        """This rank's contiguous share of ``n`` items (batches): the first ``n % world`` ranks
        take one more.  Contiguous shares keep every rank's batches in one-process order."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    def owners(self, costs: list[float]) -> list[int]:
        """The rank that owns each item, balancing the summed ``costs``: the largest items first,
        each to the least loaded rank (ties to the lower rank), so every rank computes the same."""
        load = [0.0] * self.world
        owner = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            rank = min(range(self.world), key=lambda r: (load[r], r))
            owner[i] = rank
            load[rank] += costs[i]
        return owner

    # -- exchanges ------------------------------------------------------------------------------

    def _guard(self, peer: int, what: str, exchange):
        start = time.perf_counter()
        try:
            return exchange()
        except (RuntimeError, ConnectionError) as exc:
            raise RankLost(
                f"rank {self.rank} lost rank {peer} while {what}: it died or did not answer within "
                f"{self.timeout_s:g} s ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                "run the same command again to resume"
            ) from exc
        finally:
            self.exchange_s += time.perf_counter() - start

    def send(self, obj, tensors: list[torch.Tensor], peer: int, what: str) -> None:
        """Send a picklable header ``obj`` and ``tensors`` to ``peer``."""
        meta = [obj, [(tuple(t.shape), t.dtype) for t in tensors]]

        def exchange():
            dist.send_object_list(meta, dst=peer, device=self.device)
            for t in tensors:
                dist.send(t.detach().to(self.device).contiguous(), dst=peer)

        self._guard(peer, what, exchange)

    def receive(self, peer: int, what: str) -> tuple[object, list[torch.Tensor]]:
        """What ``peer`` sent with :meth:`send`: its header and its tensors, on :attr:`device` (where
        this rank's own statistics and results are, so that the owner combines them with no copy)."""

        def exchange():
            meta = [None, None]
            dist.recv_object_list(meta, src=peer, device=self.device)
            obj, specs = meta
            tensors = []
            for shape, dtype in specs:
                t = torch.empty(shape, dtype=dtype, device=self.device)
                dist.recv(t, src=peer)
                tensors.append(t)
            return obj, tensors

        return self._guard(peer, what, exchange)

    def gather(self, obj, tensors: list[torch.Tensor], dst: int, what: str):
        """Every rank's ``(obj, tensors)`` on ``dst``, in rank order (None elsewhere)."""
        if self.rank != dst:
            self.send(obj, tensors, dst, what)
            return None
        return [(obj, tensors) if r == dst else self.receive(r, what) for r in range(self.world)]

    def broadcast(self, obj, tensors: list[torch.Tensor] | None, src: int, what: str):
        """``src``'s ``(obj, tensors)`` on every rank."""
        if self.rank == src:
            for r in range(self.world):
                if r != src:
                    self.send(obj, tensors, r, what)
            return obj, tensors
        return self.receive(src, what)

    def on_writer(self, what: str, work):
        """Run ``work()`` on rank 0 only and return its (picklable) result on every rank; an
        exception it raises is raised on every rank, with the same type and message, so that
        every process fails for the reason rank 0 found."""
        if not self.distributed:
            return work()
        if not self.writes:
            header, _ = self.receive(0, what)
            if "error" in header:
                kind, message = header["error"]
                error = getattr(builtins, kind, None)
                if not (isinstance(error, type) and issubclass(error, Exception)):
                    error = RuntimeError
                raise error(f"(on rank 0) {message}")
            return header["result"]
        try:
            result = work()
        except Exception as exc:
            self.broadcast({"error": (type(exc).__name__, str(exc))}, [], 0, what)
            raise
        self.broadcast({"result": result}, [], 0, what)
        return result

    def barrier(self, what: str) -> None:
        """Wait until every rank got here (through rank 0, so a lost rank is named)."""
        if self.distributed:
            self.gather(None, [], 0, what)
            self.broadcast(None, [], 0, what)

    def close(self) -> None:
        """Leave the process group (after the last exchange)."""
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
