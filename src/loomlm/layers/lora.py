"""Batched multi-LoRA: many adapters (and none) in one flat batch.

Each request's tokens are contiguous in the flat batch, so the model runner
groups token indices by adapter slot (`LoRABatch`). A `Linear` holding adapter
weights adds, for each adapter present in the batch, x[idx] @ A^T @ B^T (scaling
folded into B) to its rows idx, the shards of a fused projection (q, k, v; gate,
up) in one pair of matmuls: no loop over tokens, each adapter at its own rank (no
padding to the largest). Source: the segment-grouped
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


@dataclass
class SlotLoRA:
    """One adapter's updates of all the shards of a Linear, fused into one pair of matmuls:
    A of the shards side by side, B block-diagonal over the full output width (zeros where a
    shard is not targeted), so x @ a_t @ b_t is every shard's update at once."""

    shards: list[ShardLoRA]
    a_t: torch.Tensor  # [in_features, sum of the shards' ranks]
    b_t: torch.Tensor  # [sum of ranks, out_features]

    @classmethod
    def fuse(cls, shards: list[ShardLoRA], out_features: int) -> SlotLoRA:
        a_t = torch.cat([s.a_t for s in shards], dim=1)
        b_t = torch.zeros(a_t.shape[1], out_features, dtype=a_t.dtype, device=a_t.device)
        row = 0
        for s in shards:
            b_t[row:row + s.a_t.shape[1], s.start:s.end] = s.b_t
            row += s.a_t.shape[1]
        return cls(shards, a_t, b_t)


def add_lora(x: torch.Tensor, y: torch.Tensor, slots: dict[int, SlotLoRA], batch: LoRABatch) -> torch.Tensor:
    """y[idx] += x[idx] @ a_t @ b_t for every adapter segment; x: [T, in], y: [T, out] (in place)."""
    for slot, idx in batch.segments:
        lora = slots.get(slot)
        if lora is None:
            continue  # this adapter leaves this projection alone
        y.index_add_(0, idx, (x.index_select(0, idx) @ lora.a_t) @ lora.b_t)  # [n, out]
    return y
