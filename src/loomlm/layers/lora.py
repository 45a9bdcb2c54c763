"""Batched multi-LoRA: many adapters (and none) in one flat batch.

Each request's tokens are contiguous in the flat batch, so the model runner
groups token indices by adapter slot (`LoRABatch`). A `Linear` holding adapter
weights adds, for each adapter present in the batch, x[idx] @ A^T @ B^T (scaling
folded into B) to its rows idx and to the output slice of each targeted shard:
one pair of small matmuls per adapter and shard, no loop over tokens, each
adapter at its own rank (no padding to the largest). Source: the segment-grouped
batching of Punica / S-LoRA, as LoRAX and vLLM use it, in plain PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoRABatch:
    """Which tokens of the flat batch run with which adapter slot."""

    segments: list[tuple[int, torch.Tensor]]  # (slot, token indices [n] int64), one entry per adapter present


@dataclass
class ShardLoRA:
    """One adapter's update of one output slice [start, end) of a (fused) Linear."""

    start: int
    end: int
    a_t: torch.Tensor  # [in_features, rank]
    b_t: torch.Tensor  # [rank, end - start], scaling folded in


def add_lora(x: torch.Tensor, y: torch.Tensor, slots: dict[int, list[ShardLoRA]], batch: LoRABatch) -> torch.Tensor:
    """y[idx, start:end] += x[idx] @ a_t @ b_t for every adapter segment; x: [T, in], y: [T, out] (in place)."""
    for slot, idx in batch.segments:
        shards = slots.get(slot)
        if not shards:
            continue  # this adapter leaves this projection alone
        xs = x.index_select(0, idx)  # [n, in]
        for shard in shards:
            y[:, shard.start:shard.end].index_add_(0, idx, (xs @ shard.a_t) @ shard.b_t)
    return y
