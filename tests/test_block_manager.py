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
