"""This process's place among the ranks that hold one model, and the collectives they use."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class CollectiveStats:
    """Time this rank spent in collectives since start (what tensor parallelism costs in communication)."""

    num_calls: int = 0
    seconds: float = 0.0


@dataclass
class TensorParallel:
    """Rank `rank` of `world_size` in torch.distributed's default process group (gloo on CPU,
    nccl on CUDA); rank 0 drives the engine."""

    rank: int
    world_size: int
    stats: CollectiveStats = field(default_factory=CollectiveStats)

    def _timed(self, started: float) -> None:
        self.stats.num_calls += 1
        self.stats.seconds += time.perf_counter() - started

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over the ranks, in place."""
        started = time.perf_counter()
        dist.all_reduce(tensor)
        self._timed(started)

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        """[..., n] on each rank -> [..., world_size * n], rank 0's slice first."""
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        started = time.perf_counter()
        dist.all_gather(parts, tensor)
        self._timed(started)
        return torch.cat(parts, dim=-1)

    def broadcast(self, obj=None):
        """Rank 0's `obj` on every rank (pickled by torch.distributed's broadcast_object_list)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
