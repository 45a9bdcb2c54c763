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
A layer may attend a sliding window (Mistral, Qwen2, Gemma 2/3 local layers) and
soft-cap its logits (Gemma 2); SDPA has no soft cap, so such a layer runs plain
matmuls (`softcapped_attention`). With neither, the work is that of full attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loomlm.layers.decode_attention import softcapped_attention
from loomlm.layers.forward_context import PrefillSpan, current_forward_batch
from loomlm.layers.linear import Linear


class PagedAttention(nn.Module):
    """Attention of one layer over the paged KV cache; forward(q, k, v) -> [num_tokens, num_heads, head_dim].

    scale: multiplies q k^T; default 1 / sqrt(head_dim) (Gemma 2/3 pass query_pre_attn_scalar ** -0.5,
    Granite its attention_multiplier).
    sliding_window: W tokens; the query at position p attends the keys at positions p - W < k <= p,
    i.e. its last W positions, itself included: transformers' `sliding_window_causal_mask_function`
    (masking_utils.py: `sliding_window_overlay` keeps `kv_idx > q_idx - sliding_window`, and'ed with
    `causal_mask_function`'s `kv_idx <= q_idx`). None: full causal attention.
    logits_soft_cap: c, scores = c * tanh(scores / c) after scaling, before masking and softmax
    (Gemma 2's attn_logit_softcapping; transformers' `eager_attention_forward`, models/gemma2/modeling_gemma2.py).
    Raises ValueError for a head count that is not a multiple of the KV heads, a window < 1, or a cap <= 0.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, *, scale: float | None = None,
                 sliding_window: int | None = None, logits_soft_cap: float | None = None) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 token, got {sliding_window}")
        if logits_soft_cap is not None and not logits_soft_cap > 0:
            raise ValueError(f"logits_soft_cap must be > 0, got {logits_soft_cap}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap
        # Bound by the model runner once the pool is allocated: [num_kv_heads, num_blocks, block_size, head_dim]
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        batch = current_forward_batch()
        k_cache, v_cache = self.k_cache, self.v_cache
        if k_cache is None or v_cache is None:
            raise RuntimeError("KV cache not bound to the attention layer")
        batch.ops.reshape_and_cache(k, v, k_cache, v_cache, batch.slot_mapping)

        num_decode = batch.num_decode_tokens
        decoded = None
        if num_decode:
            decoded = batch.decode.backend.forward(q[:num_decode], k_cache, v_cache, batch.decode, self.scale,
                                                   sliding_window=self.sliding_window, soft_cap=self.logits_soft_cap)
            if num_decode == q.shape[0]:  # a decode-only step: the backend's output is the whole result
                return decoded
        out = torch.empty_like(q)
        if decoded is not None:
            out[:num_decode] = decoded
        for span in batch.prefill_spans:
            s, e = span.token_start, span.token_end
            out[s:e] = self._prefill(q[s:e], k[s:e], v[s:e], span)
        return out  # [num_tokens, num_heads, head_dim]

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, span: PrefillSpan) -> torch.Tensor:
        # q: [num_query, num_heads, head_dim]; k, v: this span's own [num_query, num_kv_heads, head_dim]
        num_query, context_len = q.shape[0], span.context_len
        first_query = context_len - num_query  # position of the span's first query token
        window = self.sliding_window
        if window is not None and window >= context_len:
            window = None  # no query has a key older than the window: full causal attention
        # Keys before the first query's window are attended by no query: neither gathered nor masked.
        first_key = 0 if window is None else max(0, first_query - window + 1)
        if first_query == 0:
            # nothing cached before this chunk: its own K/V, [num_kv_heads, num_query, head_dim]
            keys, values = k.transpose(0, 1), v.transpose(0, 1)
        else:
            block_size = self.k_cache.shape[2]
            first_block = first_key // block_size
            table = span.block_table[first_block:(context_len + block_size - 1) // block_size]
            skip = first_key - first_block * block_size
            keys = self.k_cache[:, table].flatten(1, 2)[:, skip:context_len - first_block * block_size]
            values = self.v_cache[:, table].flatten(1, 2)[:, skip:context_len - first_block * block_size]
            # keys, values: [KVH, context_len - first_key, D], positions first_key .. context_len - 1
        if first_query == 0 and window is None and self.logits_soft_cap is None:
            mask, causal = None, True  # SDPA's own causal mask, the fast path
        else:
            # [num_query, num_keys] True where attended: transformers' causal and sliding-window mask functions
            query_pos = torch.arange(first_query, context_len, device=q.device)[:, None]
            key_pos = torch.arange(first_key, context_len, device=q.device)[None, :]
            mask, causal = key_pos <= query_pos, False
            if window is not None:
                mask &= key_pos > query_pos - window
        if self.logits_soft_cap is None:
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1), keys, values, attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=True,
            )  # [num_heads, num_query, head_dim]
        else:
            group = self.num_heads // self.num_kv_heads
            qg = q.transpose(0, 1).reshape(self.num_kv_heads, group, num_query, self.head_dim)  # [KVH, G, Q, D]
            out = softcapped_attention(qg, keys, values, mask, self.scale, self.logits_soft_cap)
            out = out.view(self.num_heads, num_query, self.head_dim)
        return out.transpose(0, 1)  # [num_query, num_heads, head_dim]


class MultiHeadAttention(nn.Module):
    """Multi-head attention (no GQA) with q/k/v fused in `qkv_proj`, as OPT and GPT-2 run it:
    forward(x [num_tokens, hidden_size]) -> [num_tokens, hidden_size]."""

    def __init__(self, hidden_size: int, num_heads: int, *, bias: bool, scale: float) -> None:
        super().__init__()
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, hidden_size // num_heads
        self.qkv_proj = Linear(hidden_size, {"q": hidden_size, "k": hidden_size, "v": hidden_size}, bias=bias)
        self.o_proj = Linear(hidden_size, {"o": hidden_size}, bias=bias)
        self.attn = PagedAttention(num_heads, num_heads, self.head_dim, scale=scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.hidden_size, dim=-1)  # each [T, hidden]
        heads = (self.num_heads, self.head_dim)
        out = self.attn(q.unflatten(1, heads), k.unflatten(1, heads), v.unflatten(1, heads))  # [T, H, D]
        return self.o_proj(out.reshape(-1, self.hidden_size))
