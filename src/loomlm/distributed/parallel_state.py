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


# Every this many steps the ranks exchange their collective counters (`share_stats`), so rank 0's
# /metrics shows every rank's at the cost of one small all-gather per interval.
STATS_INTERVAL_STEPS = 64


@dataclass
class TensorParallel:
    """Rank `rank` of `world_size` in torch.distributed's default process group (gloo on CPU,
    nccl on CUDA); rank 0 drives the engine."""

    rank: int
    world_size: int
    stats: CollectiveStats = field(default_factory=CollectiveStats)
    # Each rank's collective seconds as of the last exchange (rank 0 reads them for /metrics).
    rank_seconds: list[float] = field(default_factory=list)
    num_steps: int = 0

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

    def step_done(self) -> None:
        """Count a step; every STATS_INTERVAL_STEPS steps (the same step on every rank) gather
        each rank's collective seconds into `rank_seconds`."""
        self.num_steps += 1
        if self.num_steps % STATS_INTERVAL_STEPS == 0:
            mine = torch.tensor([self.stats.seconds], dtype=torch.float64)
            parts = [torch.empty_like(mine) for _ in range(self.world_size)]
            dist.all_gather(parts, mine)
            self.rank_seconds = [float(p) for p in parts]

    def broadcast(self, obj=None):
        """Rank 0's `obj` on every rank (pickled by torch.distributed's broadcast_object_list)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
