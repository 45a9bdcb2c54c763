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
    # [num_decode_tokens, 1, 1, padded context] bool: True where a decode token attends (key
    # position < its context length, the new token included); padding of the gather is False.
    decode_attn_mask: torch.Tensor | None
    decode_max_context_len: int  # longest decode context in tokens (host int, sizes the gather)
    # Rows of the pool viewed as [num_kv_heads * num_blocks, block_size * head_dim] that hold the
    # decode tokens' context, head-major: [num_kv_heads * num_decode_tokens * ceil(max_context/block)].
    # Built once per step for all layers; a dim-0 gather of whole rows runs at copy speed.
    decode_gather_index: torch.Tensor | None
    prefill_spans: list[PrefillSpan]
    # Reused scratch (flat, >= 2 * num_kv_heads * num_decode_tokens * padded context * head_dim
    # elements) that decode attention gathers K/V blocks into: writing into a reused buffer
    # ran ~2x faster than a fresh allocation per layer on this CPU. None: allocate.
    decode_gather_buffer: torch.Tensor | None = None


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
