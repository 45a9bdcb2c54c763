"""Paged causal self-attention over a flat batch of prefill chunks and decode tokens.

K/V live in a block pool, per layer `[num_kv_heads, num_blocks, block_size, head_dim]`
(vLLM's PagedAttention, Kwon et al. 2023). Heads come first so that gathering a
request's blocks yields `[num_kv_heads, context_len, head_dim]` contiguously:
the matmuls then read it as is, with no transposed copy (2.5x faster decode
attention than a block-major layout on this CPU). Each step first writes the new tokens'
K/V at their slot mapping, then attends:
- decode tokens (query length 1) all at once, by the step's decode backend
  (`decode_attention.py`); KV heads are never expanded (`repeat_kv` cost 10x here, DESIGN.md);
- prefill spans one by one with SDPA; a span with no cached context uses its own
  fresh K/V (no gather), one that continues a cached context gathers its blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loomlm.layers.decode_attention import DECODE_BACKENDS
from loomlm.layers.forward_context import current_forward_batch


class PagedAttention(nn.Module):
    """Attention of one layer over the paged KV cache; forward(q, k, v) -> [num_tokens, num_heads, head_dim]."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = 1.0 / math.sqrt(head_dim)
        # Bound by the model runner once the pool is allocated: [num_kv_heads, num_blocks, block_size, head_dim]
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        batch = current_forward_batch()
        k_cache, v_cache = self.k_cache, self.v_cache
        if k_cache is None or v_cache is None:
            raise RuntimeError("KV cache not bound to the attention layer")
        num_slots = k_cache.shape[1] * k_cache.shape[2]
        k_cache.view(self.num_kv_heads, num_slots, self.head_dim).index_copy_(1, batch.slot_mapping, k.transpose(0, 1))
        v_cache.view(self.num_kv_heads, num_slots, self.head_dim).index_copy_(1, batch.slot_mapping, v.transpose(0, 1))

        out = torch.empty_like(q)
        num_decode = batch.num_decode_tokens
        if num_decode:
            decode = DECODE_BACKENDS[batch.decode.backend]
            out[:num_decode] = decode(q[:num_decode], k_cache, v_cache, batch.decode, self.scale)
        for span in batch.prefill_spans:
            s, e = span.token_start, span.token_end
            out[s:e] = self._prefill(q[s:e], k[s:e], v[s:e], span)
        return out  # [num_tokens, num_heads, head_dim]

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, span) -> torch.Tensor:
        num_query = q.shape[0]
        if span.context_len == num_query:
            # nothing cached before this chunk: its own K/V, [num_kv_heads, num_query, head_dim]
            keys, values, mask, causal = k.transpose(0, 1), v.transpose(0, 1), None, True
        else:
            block_size = self.k_cache.shape[2]
            num_blocks = (span.context_len + block_size - 1) // block_size
            table = span.block_table[:num_blocks]
            keys = self.k_cache[:, table].flatten(1, 2)[:, : span.context_len]  # [KVH, context_len, D]
            values = self.v_cache[:, table].flatten(1, 2)[:, : span.context_len]
            # Query i sits at context position context_len - num_query + i and sees keys up to it.
            offset = span.context_len - num_query
            mask = (torch.arange(span.context_len, device=q.device)[None, :]
                    <= (torch.arange(num_query, device=q.device)[:, None] + offset))
            causal = False
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), keys, values, attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=True,
        )  # [num_heads, num_query, head_dim]
        return out.transpose(0, 1)
