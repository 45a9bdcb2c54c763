"""Paged KV block bookkeeping: free list, reference counts, per-request block tables.

The pool holds `num_blocks` blocks of `block_size` token slots. A request's
block table lists, in order, the blocks holding its tokens 0..n-1; token `p`
lives in slot `block_table[p // block_size] * block_size + p % block_size`
(its slot mapping). A block can be shared (forked sequences, and later cached
prefixes): it returns to the free list only when its reference count reaches 0.

The pairs `can_allocate`/`allocate` keep the invariant visible: every block is
either free (ref count 0, in the free list) or referenced by the block tables
that hold it, and the reference count equals the number of those tables.
"""

from __future__ import annotations

from collections import deque


class BlockManager:
    """Owns the ids of the KV pool's blocks: who holds which, and how many holders each has."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.block_tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def num_blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def num_new_blocks(self, request_id: str, num_tokens: int) -> int:
        """Blocks a request must add so its table covers `num_tokens` tokens."""
        have = len(self.block_tables.get(request_id, ()))
        return max(0, self.num_blocks_for(num_tokens) - have)

    def _shared_block_index(self, request_id: str, num_computed_tokens: int) -> int | None:
        """Index in the table of the block the next token is written to, if other tables share it."""
        table = self.block_tables.get(request_id)
        index = num_computed_tokens // self.block_size
        if table and index < len(table) and self.ref_counts[table[index]] > 1:
            return index
        return None

    def can_allocate(self, request_id: str, num_tokens: int, num_computed_tokens: int | None = None) -> bool:
        """Whether `allocate(request_id, num_tokens)` would succeed, after `copy_on_write(request_id,
        num_computed_tokens)` when that is given."""
        needed = self.num_new_blocks(request_id, num_tokens)
        if num_computed_tokens is not None and self._shared_block_index(request_id, num_computed_tokens) is not None:
            needed += 1
        return needed <= self.num_free_blocks

    def allocate(self, request_id: str, num_tokens: int) -> list[int]:
        """Grow the request's table to cover `num_tokens` tokens; returns the new block ids.

        Raises RuntimeError when the pool is short (call `can_allocate` first).
        """
        needed = self.num_new_blocks(request_id, num_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: need {needed}, have {self.num_free_blocks}")
        new_ids = [self.free_block_ids.popleft() for _ in range(needed)]
        for block_id in new_ids:
            self.ref_counts[block_id] = 1
        self.block_tables.setdefault(request_id, []).extend(new_ids)
        return new_ids

    def copy_on_write(self, request_id: str, num_computed_tokens: int) -> tuple[int, int] | None:
        """Before writing at position `num_computed_tokens`: if the block it falls in is shared
        with forked tables, give this request a private block in its place.

        Returns (source, destination) for the model runner to copy the KV data, or None when
        the block is not shared. Raises RuntimeError when no block is free.
        """
        index = self._shared_block_index(request_id, num_computed_tokens)
        if index is None:
            return None
        if not self.free_block_ids:
            raise RuntimeError("out of KV blocks for a copy-on-write")
        table = self.block_tables[request_id]
        src, dst = table[index], self.free_block_ids.popleft()
        self.ref_counts[src] -= 1
        self.ref_counts[dst] = 1
        table[index] = dst
        return src, dst

    def fork(self, parent_id: str, child_id: str) -> None:
        """Give `child_id` the parent's blocks, shared (reference counts +1)."""
        if child_id in self.block_tables:
            raise RuntimeError(f"{child_id!r} already has blocks")
        table = list(self.block_tables.get(parent_id, ()))
        for block_id in table:
            self.ref_counts[block_id] += 1
        self.block_tables[child_id] = table

    def free(self, request_id: str) -> None:
        """Drop the request's references; blocks nobody holds go back to the free list. Idempotent."""
        for block_id in reversed(self.block_tables.pop(request_id, [])):
            self.ref_counts[block_id] -= 1
            assert self.ref_counts[block_id] >= 0, f"block {block_id} freed more often than referenced"
            if self.ref_counts[block_id] == 0:
                self.free_block_ids.append(block_id)

    def block_table(self, request_id: str) -> list[int]:
        return self.block_tables.get(request_id, [])

    def check_invariants(self) -> None:
        """Asserts the bookkeeping is consistent (tests call this after every step)."""
        counts = [0] * self.num_blocks
        for table in self.block_tables.values():
            for block_id in table:
                counts[block_id] += 1
        assert counts == self.ref_counts, "reference counts disagree with block tables"
        free = set(self.free_block_ids)
        assert len(free) == len(self.free_block_ids), "a block is in the free list twice"
        for block_id in range(self.num_blocks):
            assert (block_id in free) == (self.ref_counts[block_id] == 0), f"block {block_id} free/ref mismatch"
