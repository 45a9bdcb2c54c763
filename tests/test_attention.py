"""Decode attention backends agree with a plain per-sequence softmax attention."""

from __future__ import annotations

import math

import pytest
import torch

from loomlm.layers.decode_attention import DECODE_BACKENDS, DecodeMetadata
from loomlm.layers.kernels import cpu_kernels


def reference_decode(q, k_cache, v_cache, tables, lens, scale):
    # q: [S, H, D]; pools [KVH, NB, BS, D]; plain gather + softmax per sequence, KV heads repeated
    kvh, _, bs, d = k_cache.shape
    group = q.shape[1] // kvh
    out = []
    for s in range(q.shape[0]):
        pos = torch.arange(int(lens[s]))
        blocks = tables[s][pos // bs]
        k = k_cache[:, blocks, pos % bs].repeat_interleave(group, 0)  # [H, L, D]
        v = v_cache[:, blocks, pos % bs].repeat_interleave(group, 0)
        p = torch.softmax((q[s][:, None, :] * k).sum(-1) * scale, dim=-1)  # [H, L]
        out.append((p[:, :, None] * v).sum(1))
    return torch.stack(out)


def make_meta(backend, tables, lens, kvh, num_pool_blocks, bs, d):
    num_blocks = tables.shape[1]
    meta = DecodeMetadata(backend=backend, block_tables=tables, context_lens=lens, max_context_len=int(lens.max()))
    if backend == "torch":
        meta.gather_index = (torch.arange(kvh)[:, None] * num_pool_blocks + tables.reshape(1, -1)).reshape(-1)
        meta.attn_mask = (torch.arange(num_blocks * bs)[None, :] < lens[:, None])[:, None, None, :]
    return meta


@pytest.mark.parametrize("backend", sorted(DECODE_BACKENDS))
@pytest.mark.parametrize("kvh,group,d", [(3, 3, 64), (2, 1, 16), (1, 4, 128), (2, 2, 24)])
@pytest.mark.parametrize("bs,q_scale", [(4, 1.0), (16, 1.0), (2, 1.0), (8, 30.0)])
def test_decode_backends_match_reference(backend, kvh, group, d, bs, q_scale):
    # bs 4/16/8: the native kernel's vector path for d 64/128 (4 rows at a time); bs 2: its generic path.
    # q_scale 30: peaked softmaxes whose small weights underflow, as the kernel's exp clamps them.
    if backend == "cpu_native" and cpu_kernels() is None:
        pytest.skip("no C++ toolchain to build the native kernel")
    g = torch.Generator().manual_seed(kvh * 10 + group)
    num_pool_blocks, seqs = 64, 6
    k_cache = torch.randn(kvh, num_pool_blocks, bs, d, generator=g)
    v_cache = torch.randn(kvh, num_pool_blocks, bs, d, generator=g)
    lens = torch.tensor([1, 3, 4, 5, 17, 9])  # partial blocks, a single token, block boundaries
    num_blocks = (int(lens.max()) + bs - 1) // bs
    perm = torch.randperm(num_pool_blocks, generator=g)[: seqs * num_blocks].view(seqs, num_blocks)
    # rows past a sequence's context point at block 0 (padding), which holds someone else's data
    tables = torch.where(torch.arange(num_blocks)[None, :] * bs < lens[:, None], perm, torch.zeros_like(perm))
    q = torch.randn(seqs, kvh * group, d, generator=g) * q_scale
    scale = 1 / math.sqrt(d)
    meta = make_meta(backend, tables.contiguous(), lens, kvh, num_pool_blocks, bs, d)
    ours = DECODE_BACKENDS[backend](q, k_cache, v_cache, meta, scale)
    ref = reference_decode(q, k_cache, v_cache, tables, lens, scale)
    assert ours.shape == ref.shape
    # float32 rounding: on AVX2 hosts SDPA's fused softmax differs from the loop by up to 1.2e-5
    # when the softmax is peaked (q_scale 30); a wrong block or mask is off by far more.
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=2e-5)
