"""Paged attention agrees with plain dense attention: decode backends, and every path of PagedAttention
(fresh prefill, chunked prefill over cached blocks, decode) with sliding windows and logit soft caps,
whose semantics are checked against transformers' own mask functions and Gemma 2 attention."""

from __future__ import annotations

import math
import types

import pytest
import torch
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

from loomlm.layers.attention import PagedAttention
from loomlm.layers.fused_ops import TORCH_FUSED_OPS, select_fused_ops
from loomlm.layers.decode_attention import DECODE_BACKENDS
from loomlm.layers.forward_context import ForwardBatch, PrefillSpan, forward_context
from loomlm.layers.kernels import cpu_kernels


def capped(scores, soft_cap):
    return scores if soft_cap is None else soft_cap * torch.tanh(scores / soft_cap)


def reference_decode(q, k_cache, v_cache, tables, lens, scale, window=None, soft_cap=None):
    # q: [S, H, D]; pools [KVH, NB, BS, D]; plain gather + softmax per sequence, KV heads repeated
    kvh, _, bs, d = k_cache.shape
    group = q.shape[1] // kvh
    out = []
    for s in range(q.shape[0]):
        length = int(lens[s])
        pos = torch.arange(0 if window is None else max(0, length - window), length)  # the last W with a window
        blocks = tables[s][pos // bs]
        k = k_cache[:, blocks, pos % bs].repeat_interleave(group, 0)  # [H, L, D]
        v = v_cache[:, blocks, pos % bs].repeat_interleave(group, 0)
        p = torch.softmax(capped((q[s][:, None, :] * k).sum(-1) * scale, soft_cap), dim=-1)  # [H, L]
        out.append((p[:, :, None] * v).sum(1))
    return torch.stack(out)


def dense_mask(num_tokens, window):
    """[T, T] bool, True where query q attends key k: causal, and k > q - W with a window."""
    pos = torch.arange(num_tokens)
    mask = pos[None, :] <= pos[:, None]
    if window is not None:
        mask &= pos[None, :] > pos[:, None] - window
    return mask


def dense_reference(q, k, v, scale, window=None, soft_cap=None):
    """One sequence's whole attention in float64 from the full [H, T, T] score matrix.

    q: [T, H, D]; k, v: [T, KVH, D] -> [T, H, D] float32. Order as Gemma 2: scale, cap, mask, softmax.
    """
    group = q.shape[1] // k.shape[1]
    q, k, v = (x.double().transpose(0, 1) for x in (q, k, v))  # [heads, T, D]
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    scores = capped(q @ k.transpose(1, 2) * scale, soft_cap)  # [H, T, T]
    scores = scores.masked_fill(~dense_mask(q.shape[1], window), float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).transpose(0, 1).float()


def make_meta(backend, tables, lens, kvh, num_pool_blocks, bs, d):
    """The backend's own step metadata (`prepare_metadata`), as the model runner builds it."""
    decode_backend = DECODE_BACKENDS[backend](torch.device("cpu"), torch.float32, kvh, num_pool_blocks, bs, d)
    return decode_backend.prepare_metadata(tables.tolist(), lens.tolist())


@pytest.mark.parametrize("backend", sorted(DECODE_BACKENDS))
@pytest.mark.parametrize("kvh,group,d", [(3, 3, 64), (2, 1, 16), (1, 4, 128), (2, 2, 24), (1, 2, 256)])
@pytest.mark.parametrize("bs,q_scale", [(4, 1.0), (16, 1.0), (2, 1.0), (8, 30.0)])
@pytest.mark.parametrize("window,soft_cap", [(None, None), (5, 2.0), (8, None)])
def test_decode_backends_match_reference(backend, kvh, group, d, bs, q_scale, window, soft_cap):
    # bs 4/16/8: the native kernel's vector path for d 64/128 (4 rows at a time); bs 2: its generic path.
    # q_scale 30: peaked softmaxes whose small weights underflow, as the kernel's exp clamps them.
    # window 5: starts mid-block and off the 4-row grid; 8: on a block boundary for bs 4 and 8.
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
    ours = meta.backend.forward(q, k_cache, v_cache, meta, scale, sliding_window=window, soft_cap=soft_cap)
    ref = reference_decode(q, k_cache, v_cache, tables, lens, scale, window, soft_cap)
    assert ours.shape == ref.shape
    # float32 rounding: on AVX2 hosts SDPA's fused softmax differs from the loop by up to 1.2e-5
    # when the softmax is peaked (q_scale 30); a wrong block or mask is off by far more.
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=2e-5)


# --- PagedAttention, every path, against dense attention -------------------------------------------

BLOCK_SIZE = 16
NUM_POOL_BLOCKS = 24
WINDOWS = [None, 5, BLOCK_SIZE]  # shorter than the prompts, off the block grid; one block
SOFT_CAPS = [None, 50.0, 2.0]  # 2.0 bites: the scaled scores below have a standard deviation of about 3
HEADS = [(4, 2), (4, 4)]  # (num_heads, num_kv_heads): GQA and MHA
HEAD_DIM = 64  # the native kernel's vector path (and its generic one in the backend test above)


class Sequence:
    """One sequence's random q/k/v for all its tokens, and the pool blocks that hold its K/V."""

    def __init__(self, length, num_heads, num_kv_heads, table, gen):
        self.q = torch.randn(length, num_heads, HEAD_DIM, generator=gen) * 3  # [T, H, D]
        self.k = torch.randn(length, num_kv_heads, HEAD_DIM, generator=gen)  # [T, KVH, D]
        self.v = torch.randn(length, num_kv_heads, HEAD_DIM, generator=gen)
        self.table = table  # [ceil(T / BLOCK_SIZE)] int64
        self.out = torch.full_like(self.q, float("nan"))  # filled as its tokens are computed

    def slots(self, start, end):
        pos = torch.arange(start, end)
        return self.table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE


def make_case(lengths, num_heads, num_kv_heads, window, soft_cap, seed=0):
    gen = torch.Generator().manual_seed(seed)
    attn = PagedAttention(num_heads, num_kv_heads, HEAD_DIM, sliding_window=window, logits_soft_cap=soft_cap)
    # garbage in every slot not yet written: reading one changes the result
    attn.k_cache = torch.randn(num_kv_heads, NUM_POOL_BLOCKS, BLOCK_SIZE, HEAD_DIM, generator=gen)
    attn.v_cache = torch.randn(num_kv_heads, NUM_POOL_BLOCKS, BLOCK_SIZE, HEAD_DIM, generator=gen)
    blocks = iter(torch.randperm(NUM_POOL_BLOCKS, generator=gen).tolist())
    seqs = []
    for length in lengths:
        table = torch.tensor([next(blocks) for _ in range(-(-length // BLOCK_SIZE))])
        seqs.append(Sequence(length, num_heads, num_kv_heads, table, gen))
    return attn, seqs


def run_step(attn, seqs, decodes=(), spans=(), backend="torch"):
    """One forward pass: decodes [(seq, position)] first, then prefill spans [(seq, start, end)]."""
    ranges = [(i, p, p + 1) for i, p in decodes] + list(spans)
    meta = None
    if decodes:
        lens = torch.tensor([p + 1 for _, p in decodes])
        num_blocks = -(-int(lens.max()) // BLOCK_SIZE)
        tables = torch.stack([torch.cat([seqs[i].table, torch.zeros(num_blocks, dtype=torch.int64)])[:num_blocks]
                              for i, _ in decodes])
        meta = make_meta(backend, tables, lens, attn.num_kv_heads, NUM_POOL_BLOCKS, BLOCK_SIZE, HEAD_DIM)
    prefill_spans, token = [], len(decodes)
    for i, start, end in spans:
        prefill_spans.append(PrefillSpan(token, token + end - start, end, seqs[i].table))
        token += end - start
    batch = ForwardBatch(
        positions=torch.cat([torch.arange(s, e) for _, s, e in ranges]),
        slot_mapping=torch.cat([seqs[i].slots(s, e) for i, s, e in ranges]),
        num_decode_tokens=len(decodes), decode=meta, prefill_spans=prefill_spans,
        # the native backend runs with the native KV write, as the model runner pairs them
        ops=select_fused_ops(torch.device("cpu"), torch.float32) if backend == "cpu_native" else TORCH_FUSED_OPS,
    )
    q, k, v = (torch.cat([getattr(seqs[i], name)[s:e] for i, s, e in ranges]) for name in ("q", "k", "v"))
    with forward_context(batch):
        out = attn(q, k, v)
    token = 0
    for i, s, e in ranges:
        seqs[i].out[s:e] = out[token:token + e - s]
        token += e - s


def assert_dense(attn, seqs):
    for seq in seqs:
        ref = dense_reference(seq.q, seq.k, seq.v, attn.scale, attn.sliding_window, attn.logits_soft_cap)
        torch.testing.assert_close(seq.out, ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS)
@pytest.mark.parametrize("soft_cap", SOFT_CAPS)
@pytest.mark.parametrize("window", WINDOWS)
def test_fresh_prefill_matches_dense(window, soft_cap, num_heads, num_kv_heads):
    # one batch, two spans with nothing cached: each attends its own fresh K/V
    attn, seqs = make_case([40, 11], num_heads, num_kv_heads, window, soft_cap)
    run_step(attn, seqs, spans=[(0, 0, 40), (1, 0, 11)])
    assert_dense(attn, seqs)


@pytest.mark.parametrize("chunk", [1, 3, 7])
@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS)
@pytest.mark.parametrize("soft_cap", SOFT_CAPS)
@pytest.mark.parametrize("window", WINDOWS)
def test_chunked_prefill_matches_dense(window, soft_cap, num_heads, num_kv_heads, chunk):
    # chunks after the first continue a cached context: gathered blocks and an explicit mask
    attn, seqs = make_case([40], num_heads, num_kv_heads, window, soft_cap)
    for start in range(0, 40, chunk):
        run_step(attn, seqs, spans=[(0, start, min(start + chunk, 40))])
    assert_dense(attn, seqs)


@pytest.mark.parametrize("backend", sorted(DECODE_BACKENDS))
@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS)
@pytest.mark.parametrize("soft_cap", SOFT_CAPS)
@pytest.mark.parametrize("window", WINDOWS)
def test_decode_matches_dense(window, soft_cap, num_heads, num_kv_heads, backend):
    # prompts prefilled, then every later token decoded in batches of sequences of different lengths
    # (a window starts at every offset of a block); the last prefill chunk shares a step with decodes
    if backend == "cpu_native" and cpu_kernels() is None:
        pytest.skip("no C++ toolchain to build the native kernel")
    attn, seqs = make_case([40, 29, 7], num_heads, num_kv_heads, window, soft_cap)
    run_step(attn, seqs, spans=[(0, 0, 3), (1, 0, 9)], backend=backend)
    run_step(attn, seqs, decodes=[(0, 3), (1, 9)], spans=[(2, 0, 1)], backend=backend)
    next_pos = [4, 10, 1]
    while decodes := [(i, p) for i, p in enumerate(next_pos) if p < len(seqs[i].q)]:
        run_step(attn, seqs, decodes=decodes, backend=backend)
        next_pos = [p + 1 for p in next_pos]
    assert_dense(attn, seqs)


@pytest.mark.parametrize("window,soft_cap", [(None, None), (5, None), (None, 2.0), (5, 2.0)])
def test_semantics_match_transformers(window, soft_cap):
    # The dense reference above encodes our reading of transformers; here transformers decides:
    # its mask function (masking_utils.py, used by Mistral, Qwen2, Gemma 2/3) and Gemma 2's
    # eager_attention_forward (scale, soft cap, mask, softmax), against chunked prefill + decode.
    num_heads, num_kv_heads, length = 4, 2, 21
    attn, seqs = make_case([length], num_heads, num_kv_heads, window, soft_cap, seed=1)
    run_step(attn, seqs, spans=[(0, 0, 7)])
    run_step(attn, seqs, spans=[(0, 7, 14)])
    for pos in range(14, length):
        run_step(attn, seqs, decodes=[(0, pos)])
    mask_fn = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    idx = torch.arange(length)
    allowed = mask_fn(0, 0, idx[:, None], idx[None, :]).expand(length, length)  # [T, T] bool
    assert torch.equal(allowed, dense_mask(length, window))
    seq = seqs[0]
    module = types.SimpleNamespace(num_key_value_groups=num_heads // num_kv_heads, training=False)
    additive = torch.zeros(length, length).masked_fill(~allowed, float("-inf"))[None, None]  # [1, 1, T, T]
    ref, _ = eager_attention_forward(module, seq.q.transpose(0, 1)[None], seq.k.transpose(0, 1)[None],
                                     seq.v.transpose(0, 1)[None], additive, scaling=attn.scale, softcap=soft_cap)
    torch.testing.assert_close(seq.out, ref[0], rtol=1e-5, atol=2e-5)  # ref: [1, T, H, D]


def test_rejects_bad_window_and_cap():
    with pytest.raises(ValueError, match="sliding_window"):
        PagedAttention(4, 2, 16, sliding_window=0)
    with pytest.raises(ValueError, match="logits_soft_cap"):
        PagedAttention(4, 2, 16, logits_soft_cap=0.0)


@pytest.mark.skipif(cpu_kernels() is None, reason="native CPU kernels not built")
def test_reshape_and_cache_native_equals_index_copy():
    """The native KV write (strided key/value rows, as sliced from a fused QKV output) puts every
    token's heads where the index_copy_ path does, touches no other slot, and refuses a slot
    outside the pool."""
    gen = torch.Generator().manual_seed(3)
    kvh, blocks, bs, d, t = 3, 6, 4, 64, 5
    qkv = torch.randn(t, (4 + 2 * kvh) * d, generator=gen)  # q (4 heads), k, v side by side
    k = qkv[:, 4 * d:(4 + kvh) * d].unflatten(1, (kvh, d))
    v = qkv[:, (4 + kvh) * d:].unflatten(1, (kvh, d))
    slots = torch.tensor([0, 23, 7, 8, 15])
    ops = select_fused_ops(torch.device("cpu"), torch.float32)
    assert ops.name == "cpu_native"
    native = [torch.zeros(kvh, blocks, bs, d) for _ in range(2)]
    ops.reshape_and_cache(k, v, *native, slots)
    reference = [torch.zeros(kvh, blocks, bs, d) for _ in range(2)]
    TORCH_FUSED_OPS.reshape_and_cache(k, v, *reference, slots)
    for cache, x in zip(reference, (k, v)):  # the reference itself is where vLLM puts each token
        assert torch.equal(cache.view(kvh, blocks * bs, d)[:, slots], x.transpose(0, 1))
    assert torch.equal(native[0], reference[0]) and torch.equal(native[1], reference[1])
    assert int((native[0].abs().sum(-1) != 0).sum()) == t * kvh  # nothing else written
    with pytest.raises(RuntimeError, match="outside the pool"):
        ops.reshape_and_cache(k, v, *native, torch.tensor([0, 1, 2, 3, blocks * bs]))
