"""Batched multi-LoRA: many adapters (and none) in one flat batch.

The model runner tags each token of the flat batch with its adapter slot
(`LoRABatch`). A `Linear` holding adapter weights keeps every installed adapter
side by side (`StackedLoRA`: the A matrices concatenated, the B matrices stacked,
scaling folded into B, the shards of a fused projection in one pair) and adds the
whole batch's updates in one shrink and one expand matmul: x @ A_all gives every
token against every adapter, a mask keeps each token's own adapter's rank
columns, and the masked product times B_all lands on y. Source: the batched
multi-adapter kernels of Punica / S-LoRA (BGMV, SGMV), as LoRAX and vLLM use them,
in plain PyTorch. Why not their per-segment loop: with PyTorch ops that costs four
op dispatches per adapter per projection, which at 8 adapters outweighed the
matmuls themselves; the stacked form costs three per projection whatever the
number of adapters, for (installed slots x rank) extra columns of arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoRABatch:
    """Which adapter slot each token of the flat batch runs with."""

    token_slots: torch.Tensor  # [num_tokens] int64: each token's adapter slot, -1 for the base model


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


@dataclass
class StackedLoRA:
    """Every adapter installed in one Linear, side by side (see the module docstring)."""

    a_t: torch.Tensor  # [in_features, R]: the slots' fused A, concatenated
    b_t: torch.Tensor  # [R, out_features]: their fused B, stacked
    col_slots: torch.Tensor  # [R] int64: the slot each rank column belongs to

    @classmethod
    def stack(cls, slots: dict[int, SlotLoRA]) -> StackedLoRA:
        order = sorted(slots)
        a_t = torch.cat([slots[i].a_t for i in order], dim=1)
        col_slots = torch.cat([torch.full((slots[i].a_t.shape[1],), i, dtype=torch.int64, device=a_t.device)
                               for i in order])
        return cls(a_t, torch.cat([slots[i].b_t for i in order], dim=0), col_slots)


def add_lora(x: torch.Tensor, y: torch.Tensor, stacked: StackedLoRA, batch: LoRABatch) -> torch.Tensor:
    """y += each token's own adapter update, x[t] @ a_t(slot) @ b_t(slot); x: [T, in], y: [T, out] (in place)."""
    shrink = x @ stacked.a_t  # [T, R]: every token against every installed adapter
    shrink.mul_(batch.token_slots[:, None] == stacked.col_slots[None, :])  # only the token's own adapter's columns
    return y.addmm_(shrink, stacked.b_t)
