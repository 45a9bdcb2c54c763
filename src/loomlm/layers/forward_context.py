"""Batch metadata for one forward pass, reached by layers through a scoped context.

The model runner opens `with forward_context(batch):` around the model call;
layers read `current_forward_batch()`. A contextvar (not a module global) keeps
concurrent engines in one process apart.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from loomlm.layers.decode_attention import DecodeMetadata
from loomlm.layers.fused_ops import TORCH_FUSED_OPS, TorchFusedOps
from loomlm.layers.lora import LoRABatch


@dataclass
class PrefillSpan:
    """One request's run of query tokens (a prefill chunk, or several tokens) in the flat batch."""

    token_start: int  # index of its first query token in the flat batch
    token_end: int  # one past its last query token
    context_len: int  # tokens attended by its last query token (cached + new)
    block_table: torch.Tensor  # [num_blocks] int64: KV blocks holding its context, in order


@dataclass
class ForwardBatch:
    """Where each token of a flat batch reads and writes the paged KV cache.

    The flat batch holds all decode tokens first (one per request), then the
    prefill spans. Built by the model runner from the scheduler's output.
    """

    positions: torch.Tensor  # [num_tokens] int64: position of each token in its sequence
    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset where its K/V go
    num_decode_tokens: int  # the first num_decode_tokens tokens are decodes (query length 1)
    decode: DecodeMetadata | None  # how those read their context; None when there are none
    prefill_spans: list[PrefillSpan]
    lora: LoRABatch | None = None  # adapter slots of the tokens; None when no token runs an adapter
    ops: TorchFusedOps = TORCH_FUSED_OPS  # the fused ops the runner chose at load (`select_fused_ops`)


_current: contextvars.ContextVar[ForwardBatch | None] = contextvars.ContextVar("loomlm_forward_batch", default=None)


@contextlib.contextmanager
def forward_context(batch: ForwardBatch) -> Iterator[None]:
    token = _current.set(batch)
    try:
        yield
    finally:
        _current.reset(token)


def current_forward_batch() -> ForwardBatch:
    batch = _current.get()
    if batch is None:
        raise RuntimeError("no forward batch: call the model inside `with forward_context(batch):`")
    return batch


def current_fused_ops() -> TorchFusedOps:
    """The fused ops of the current forward pass; the PyTorch reference outside one."""
    batch = _current.get()
    return TORCH_FUSED_OPS if batch is None else batch.ops


def current_lora_batch() -> LoRABatch | None:
    """The adapter segments of the current forward pass (None outside one or without adapters)."""
    batch = _current.get()
    return None if batch is None else batch.lora
