"""Paged causal self-attention over a flat batch of prefill chunks and decode tokens.

K/V live in a block pool, per layer `[num_blocks, block_size, num_kv_heads, head_dim]`
(vLLM's PagedAttention, Kwon et al. 2023). Each step first writes the new tokens'
K/V at their slot mapping, then attends:
- decode tokens (query length 1) in one batched grouped-query matmul over their
  gathered blocks; KV heads are never expanded (`repeat_kv` cost 10x here, DESIGN.md);
- prefill spans one by one with SDPA; a span with no cached context uses its own
  fresh K/V (no gather), one that continues a cached context gathers its blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loomlm.layers.forward_context import current_forward_batch


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = 1.0 / math.sqrt(head_dim)
        # Bound by the model runner once the pool is allocated: [num_blocks, block_size, num_kv_heads, head_dim]
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        batch = current_forward_batch()
        k_cache, v_cache = self.k_cache, self.v_cache
        if k_cache is None or v_cache is None:
            raise RuntimeError("KV cache not bound to the attention layer")
        num_blocks, block_size = k_cache.shape[:2]
        k_cache.view(num_blocks * block_size, self.num_kv_heads, self.head_dim).index_copy_(0, batch.slot_mapping, k)
        v_cache.view(num_blocks * block_size, self.num_kv_heads, self.head_dim).index_copy_(0, batch.slot_mapping, v)

        out = torch.empty_like(q)
        num_decode = batch.num_decode_tokens
        if num_decode:
            out[:num_decode] = self._decode(q[:num_decode], batch.decode_block_tables, batch.decode_context_lens,
                                            batch.decode_max_context_len)
        for span in batch.prefill_spans:
            s, e = span.token_start, span.token_end
            out[s:e] = self._prefill(q[s:e], k[s:e], v[s:e], span)
        return out  # [num_tokens, num_heads, head_dim]

    def _decode(self, q: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                max_context_len: int) -> torch.Tensor:
        num_seqs = q.shape[0]
        block_size = self.k_cache.shape[1]
        num_blocks = (max_context_len + block_size - 1) // block_size
        tables = block_tables[:, :num_blocks]
        group = self.num_heads // self.num_kv_heads
        # Gathered K/V: [num_seqs, num_blocks * block_size, num_kv_heads, head_dim]
        keys = self.k_cache[tables].flatten(1, 2)
        values = self.v_cache[tables].flatten(1, 2)
        qg = q.view(num_seqs, self.num_kv_heads, group, self.head_dim)  # [S, KVH, G, D]
        scores = torch.matmul(qg, keys.permute(0, 2, 3, 1)) * self.scale  # [S, KVH, G, L]
        span = torch.arange(keys.shape[1], device=q.device)
        pad = span[None, :] >= context_lens[:, None]  # [S, L]
        scores.masked_fill_(pad[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs, values.permute(0, 2, 1, 3))  # [S, KVH, G, D]
        return out.reshape(num_seqs, self.num_heads, self.head_dim)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, span) -> torch.Tensor:
        num_query = q.shape[0]
        if span.context_len == num_query:
            keys, values, mask, causal = k, v, None, True  # nothing cached before this chunk
        else:
            block_size = self.k_cache.shape[1]
            num_blocks = (span.context_len + block_size - 1) // block_size
            table = span.block_table[:num_blocks]
            keys = self.k_cache[table].flatten(0, 1)[: span.context_len]  # [context_len, KVH, D]
            values = self.v_cache[table].flatten(0, 1)[: span.context_len]
            # Query i sits at context position context_len - num_query + i and sees keys up to it.
            offset = span.context_len - num_query
            mask = (torch.arange(span.context_len, device=q.device)[None, :]
                    <= (torch.arange(num_query, device=q.device)[:, None] + offset))
            causal = False
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
            attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=True,
        )  # [num_heads, num_query, head_dim]
        return out.transpose(0, 1)
