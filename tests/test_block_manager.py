"""Block manager invariants: allocation, sharing by fork, freeing, no leaks."""

from __future__ import annotations

import random

import pytest

from loomlm.engine.block_manager import BlockManager


def test_allocate_grows_table_by_block_and_frees_everything():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.allocate("a", 1) and len(bm.block_table("a")) == 1
    assert bm.allocate("a", 4) == []  # still fits in the first block
    assert len(bm.allocate("a", 5)) == 1
    assert len(bm.block_table("a")) == 2
    bm.allocate("b", 16)
    assert bm.num_free_blocks == 2
    assert not bm.can_allocate("c", 9) and bm.can_allocate("c", 8)
    with pytest.raises(RuntimeError):
        bm.allocate("c", 9)
    bm.check_invariants()
    bm.free("a")
    bm.free("b")
    bm.free("b")  # idempotent
    assert bm.num_free_blocks == 8
    bm.check_invariants()


def test_fork_shares_blocks_until_last_reference_is_dropped():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("parent", 4)
    bm.fork("parent", "child")
    shared = bm.block_table("parent")
    assert bm.block_table("child") == shared
    assert all(bm.ref_counts[b] == 2 for b in shared)
    bm.free("parent")
    assert bm.num_free_blocks == 2  # the child still holds the shared blocks
    bm.check_invariants()
    bm.free("child")
    assert bm.num_free_blocks == 4
    bm.check_invariants()


def test_random_mix_of_allocations_forks_and_frees_never_leaks():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=32, block_size=4)
    lengths: dict[str, int] = {}
    for step in range(2000):
        op = rng.random()
        if op < 0.5 and lengths:
            rid = rng.choice(list(lengths))
            target = lengths[rid] + rng.randint(1, 9)
            if bm.can_allocate(rid, target):
                bm.allocate(rid, target)
                lengths[rid] = target
        elif op < 0.7:
            rid = f"r{step}"
            n = rng.randint(1, 20)
            if bm.can_allocate(rid, n):
                bm.allocate(rid, n)
                lengths[rid] = n
        elif op < 0.8 and lengths:
            parent = rng.choice(list(lengths))
            bm.fork(parent, f"f{step}")
            lengths[f"f{step}"] = len(bm.block_table(parent)) * bm.block_size
        elif lengths:
            rid = rng.choice(list(lengths))
            bm.free(rid)
            del lengths[rid]
        bm.check_invariants()
    for rid in list(lengths):
        bm.free(rid)
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_invariants()


def test_prefix_cache_hits_full_blocks_and_never_the_last_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(10))  # blocks [0-3] [4-7] + 2 tokens
    bm.allocate("a", 10)
    bm.cache_full_blocks("a", tokens, 10)  # two full blocks registered
    a_table = bm.block_table("a")
    assert bm.find_cached_prefix(tokens) == a_table[:2]
    assert bm.find_cached_prefix(tokens[:8]) == a_table[:1]  # 8 tokens: the last must be computed
    assert bm.find_cached_prefix(tokens, extra="adapter") == []  # another adapter's KV differs
    assert bm.find_cached_prefix([99] + tokens[1:]) == []  # the key chains over every earlier token
    bm.free("a")
    assert bm.num_free_blocks == 8  # freed blocks stay cached while free
    hit = bm.find_cached_prefix(tokens + [10, 11])
    assert hit == a_table[:2] and bm.can_allocate_with_prefix(hit, 12)
    bm.take_cached_prefix("b", hit, 12)
    bm.allocate("b", 12)
    assert bm.block_table("b")[:2] == a_table[:2] and bm.num_free_blocks == 5
    assert bm.num_hit_tokens == 8 and bm.num_query_tokens == 12
    bm.take_cached_prefix("c", hit[:1], 5)  # shared while both hold it
    assert bm.ref_counts[hit[0]] == 2
    bm.check_invariants()
    for rid in ("b", "c"):
        bm.free(rid)
    bm.check_invariants()


def test_prefix_cache_evicts_least_recently_freed_blocks_when_reallocating():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 4)
    bm.cache_full_blocks("a", [1, 2, 3, 4], 4)
    bm.free("a")
    assert len(bm.cached_blocks) == 2
    bm.allocate("x", 6)  # three blocks: two free uncached ones first, then the least recently freed
    assert len(bm.cached_blocks) == 1
    # The tail block was freed first (a sequence's head is shared more often), so it went first.
    assert bm.find_cached_prefix([1, 2, 3, 4, 5]) == [bm.block_keys.index(next(iter(bm.cached_blocks)))]
    bm.allocate("y", 2)
    assert bm.cached_blocks == {} and bm.find_cached_prefix([1, 2, 3, 4, 5]) == []
    bm.check_invariants()


def test_random_prefix_sharing_never_frees_a_block_in_use():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=24, block_size=4)
    prefixes = [[rng.randrange(50) for _ in range(rng.randint(4, 20))] for _ in range(4)]
    live: dict[str, list[int]] = {}
    for step in range(400):
        if live and (rng.random() < 0.4 or bm.num_free_blocks < 6):
            rid = rng.choice(sorted(live))
            bm.free(rid)
            del live[rid]
        else:
            rid = f"r{step}"
            tokens = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randint(1, 8))]
            hit = bm.find_cached_prefix(tokens)
            if not bm.can_allocate_with_prefix(hit, len(tokens)):
                continue
            bm.take_cached_prefix(rid, hit, len(tokens))
            bm.allocate(rid, len(tokens))
            bm.cache_full_blocks(rid, tokens, len(tokens))
            live[rid] = tokens
        bm.check_invariants()
        # Every live request's cached blocks still hold exactly its tokens.
        for rid, tokens in live.items():
            for index, block_id in enumerate(bm.block_table(rid)[: len(tokens) // 4]):
                key = bm.block_keys[block_id]
                assert key is None or list(key[1]) == tokens[index * 4:(index + 1) * 4]
    assert bm.num_hit_tokens > 0
