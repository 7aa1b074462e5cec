"""Which process this is in a sweep, which work is its own, and how it hears from the others.

A sweep runs in one process, or in several launched by ``torchrun`` / ``accelerate launch``
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in the environment): then this module joins the
``torch.distributed`` process group (gloo on CPU, nccl on GPU) and uses the group's key-value
store -- not collectives, whose timeouts a rank that finishes hours before another would hit --
for what ranks tell each other: rows done (rank 0's progress bar), "finished", "failed". A job
array without torch.distributed splits the work with ``--shard I/N`` instead (:class:`Shard`).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence, TypeVar

from ..errors import OptionError, TokenpruneError

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (``--shard I/N``): every ``count``-th (task, sample) item."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str | None) -> "Shard | None":
        """``"1/4"`` -> ``Shard(1, 4)``; ``None`` -> ``None``; a clear error for anything else."""
        if text is None:
            return None
        try:
            i, n = (int(x) for x in str(text).split("/"))
        except ValueError:
            i, n = -1, 0
        if not (n >= 1 and 0 <= i < n):
            raise OptionError(f"--shard must be I/N with 0 <= I < N, e.g. --shard 0/4; got {text!r}")
        return cls(i, n)

    def owns(self, position: int) -> bool:
        """Whether the item at ``position`` of the sweep's fixed item order is this shard's."""
        return position % self.count == self.index


def balanced_split(weights: Sequence[int], parts: int) -> list[int]:
    """The part (0..parts-1) of each item: greedy, heaviest load first goes to the lightest part.

    Deterministic (ties go to the lower part), so every rank computes the same split. Items of
    equal weight are dealt round-robin. ``weights``: the work of each item (its missing runs).
    """
    load = [0] * parts
    owner = [0] * len(weights)
    for i in sorted(range(len(weights)), key=lambda i: -weights[i]):  # stable: equal weights keep their order
        p = min(range(parts), key=lambda p: (load[p], p))
        owner[i] = p
        load[p] += weights[i]
    return owner


class Workers:
    """This process's place in the sweep.

    Attributes:
        rank / world: position in the ``torch.distributed`` group (0 / 1 without one).
        local_rank / local_world: position among the ranks of this node (picks the GPU).
        shard: the ``--shard`` of this run, or ``None``.
    """

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, local_world: int = 1,
                 shard: Shard | None = None, store: Any = None, owns_group: bool = False):
        self.rank, self.world = rank, world
        self.local_rank, self.local_world = local_rank, local_world
        self.shard = shard
        self._store = store
        self._owns_group = owns_group
        # the store outlives a torchrun restart (--max-restarts): keys are per attempt
        self._prefix = f"tokenprune/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"

    @classmethod
    def start(cls, shard: Shard | None = None) -> "Workers":
        """Join the process group ``torchrun`` / ``accelerate launch`` set up, if any."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(shard=shard)
        import torch
        import torch.distributed as dist

        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        owns = not dist.is_initialized()
        if owns:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(local_rank % torch.cuda.device_count())
            # Only the start-up barrier is a collective; it waits for every rank to load its data.
            dist.init_process_group(backend=backend, timeout=timedelta(hours=2))
        from torch.distributed import distributed_c10d

        return cls(rank, world, local_rank, local_world, shard, distributed_c10d._get_default_store(), owns)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        """``"rank 1 of 4"`` / ``"shard 0/2"`` / ``""``: who this is, for messages."""
        parts = []
        if self.shard is not None and self.shard.count > 1:
            parts.append(f"shard {self.shard.index}/{self.shard.count}")
        if self.distributed:
            parts.append(f"rank {self.rank} of {self.world}")
        return ", ".join(parts)

    def device(self, requested: str) -> str:
        """The device of this rank: ``auto`` -> ``cuda:<local rank>`` with GPUs, else ``cpu``; a bare
        ``cuda`` under torchrun also means this rank's own GPU."""
        import torch

        if requested == "auto":
            requested = "cuda" if torch.cuda.is_available() else "cpu"
        if requested == "cuda" and self.distributed:
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return requested

    def gpu_group(self) -> list[int]:
        """The GPUs this rank's model may span (``--device-map``): its share of the node's GPUs,
        e.g. 8 GPUs and 4 ranks per node: rank 1 gets GPUs 2 and 3."""
        import torch

        n = torch.cuda.device_count()
        if n == 0:
            return []
        per = n // self.local_world
        if per < 1:
            raise OptionError(f"{self.local_world} ranks per node but {n} GPU(s): with --device-map each rank "
                              "needs at least one GPU of its own; start fewer ranks (--nproc-per-node)")
        return list(range(self.local_rank * per, (self.local_rank + 1) * per))

    def split(self, items: Sequence[T], weights: Sequence[int]) -> list[T]:
        """This rank's items of ``items`` (the same list on every rank), balanced by ``weights``."""
        if not self.distributed:
            return list(items)
        owner = balanced_split(weights, self.world)
        return [it for it, o in zip(items, owner) if o == self.rank]

    def barrier(self) -> None:
        """Wait until every rank is here (no-op for one process)."""
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    # -- what ranks tell each other, through the store ---------------------------------------------
    def add_done(self, n: int) -> int:
        """Count ``n`` more sample-runs done by this rank; returns the count of all ranks so far."""
        if not self.distributed:
            return 0
        return int(self._store.add(self._prefix + "done", n))

    def failed(self) -> str | None:
        """The one-line error of a rank that failed, if one did."""
        if not self.distributed or not self._store.check([self._prefix + "failed"]):
            return None
        return self._store.get(self._prefix + "failed").decode()

    def report_failure(self, line: str) -> None:
        """Tell the other ranks (rank 0 stops waiting and reports it) that this rank failed."""
        if self.distributed:
            try:
                self._store.set(self._prefix + "failed", f"{self.describe()}: {line}")
            except Exception:  # noqa: BLE001 -- the store may be gone with the job; the line is printed anyway
                pass

    def wait_for_others(self, on_progress: Callable[[int], None], poll_s: float = 0.5) -> None:
        """Mark this rank finished; on rank 0, wait until every rank is, calling ``on_progress`` with
        the count of sample-runs all ranks have done. A failed rank ends the wait with its error."""
        if not self.distributed:
            return
        self._store.add(self._prefix + "finished", 1)
        if not self.is_main:
            return
        while True:
            if (line := self.failed()) is not None:
                raise TokenpruneError(line)
            on_progress(self.add_done(0))
            if int(self._store.add(self._prefix + "finished", 0)) >= self.world:
                return
            time.sleep(poll_s)

    def close(self) -> None:
        """Leave the process group if this object joined it."""
        if self._owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._owns_group = False
