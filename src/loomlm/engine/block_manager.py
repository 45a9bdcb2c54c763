"""Paged KV block bookkeeping: free list, reference counts, per-request block tables, and the
prefix cache.

The pool holds `num_blocks` blocks of `block_size` token slots. A request's
block table lists, in order, the blocks holding its tokens 0..n-1; token `p`
lives in slot `block_table[p // block_size] * block_size + p % block_size`
(its slot mapping). A block can be shared (forked sequences, cached prefixes):
it returns to the free list only when its reference count reaches 0.

Prefix caching (vLLM v1's `KVCacheManager` / `BlockPool`): once a block is full of computed
tokens it is registered under a key chained over every token before it,
`(hash(previous block's key), its block_size token ids, extra)` (`extra`: the adapter, whose
KV differs). A new request looks up its prompt's keys block by block and shares the longest
run of hits instead of computing them. A freed block keeps its key while it sits in the free
list, so it can still be hit; it is evicted (forgets its key) only when the free list hands it
out again, least recently freed first. Keys are compared in full (the dict holds the token
tuples), so a hit is never a hash collision within a block.

The pairs `can_allocate`/`allocate` keep the invariant visible: every block is either free
(ref count 0, in the free list, possibly still cached) or referenced by the block tables that
hold it, and the reference count equals the number of those tables.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

# (hash of the previous block's key or None, the block's token ids, extra key)
BlockKey = tuple[int | None, tuple[int, ...], Hashable]


class BlockManager:
    """Owns the ids of the KV pool's blocks: who holds which, how many holders each has, and
    which full blocks are cached under which prefix key.

    Counters: `num_query_tokens` prompt tokens looked up in the prefix cache, `num_hit_tokens`
    those found (the hit rate is their ratio).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        # Free blocks, the next one to hand out first (least recently freed); O(1) removal on a hit.
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.block_tables: dict[str, list[int]] = {}
        self.block_keys: list[BlockKey | None] = [None] * num_blocks  # the key a cached block is under
        self.cached_blocks: dict[BlockKey, int] = {}
        # Per request: the keys' hashes of its leading blocks already registered (a chain).
        self.request_key_hashes: dict[str, list[int]] = {}
        self.num_query_tokens = 0
        self.num_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def num_blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def num_new_blocks(self, request_id: str, num_tokens: int) -> int:
        """Blocks a request must add so its table covers `num_tokens` tokens."""
        have = len(self.block_tables.get(request_id, ()))
        return max(0, self.num_blocks_for(num_tokens) - have)

    # ------------------------------------------------------------------ prefix cache
    def _key(self, parent_hash: int | None, token_ids: Sequence[int], index: int, extra: Hashable) -> BlockKey:
        start = index * self.block_size
        return parent_hash, tuple(token_ids[start:start + self.block_size]), extra

    def find_cached_prefix(self, token_ids: Sequence[int], extra: Hashable = None) -> list[int]:
        """The cached blocks holding the longest run of `token_ids`' leading full blocks.

        At most `len(token_ids) - 1` tokens are matched: the last token must be computed to
        give the logits of the next. (The hit-rate counters count at `take_cached_prefix`.)
        """
        if not self.enable_caching:
            return []
        blocks: list[int] = []
        parent: int | None = None
        for index in range((len(token_ids) - 1) // self.block_size):
            key = self._key(parent, token_ids, index, extra)
            block_id = self.cached_blocks.get(key)
            if block_id is None:
                break
            blocks.append(block_id)
            parent = hash(key)
        return blocks

    def can_allocate_with_prefix(self, cached: list[int], num_tokens: int) -> bool:
        """Whether a request with no blocks yet can take `cached` and grow to `num_tokens` tokens."""
        revived = sum(1 for block_id in cached if self.ref_counts[block_id] == 0)  # leave the free list
        needed = max(0, self.num_blocks_for(num_tokens) - len(cached))
        return needed + revived <= self.num_free_blocks

    def take_cached_prefix(self, request_id: str, cached: list[int], num_query_tokens: int) -> None:
        """Start the request's table with the shared blocks `cached` (from `find_cached_prefix` over
        `num_query_tokens` tokens, counted in the hit rate)."""
        self.num_query_tokens += num_query_tokens
        self.num_hit_tokens += len(cached) * self.block_size
        if request_id in self.block_tables:
            raise RuntimeError(f"{request_id!r} already has blocks")
        for block_id in cached:
            if self.ref_counts[block_id] == 0:
                del self.free_block_ids[block_id]
            self.ref_counts[block_id] += 1
        self.block_tables[request_id] = list(cached)
        self.request_key_hashes[request_id] = [hash(self.block_keys[b]) for b in cached]

    def cache_full_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int,
                          extra: Hashable = None) -> None:
        """Register the request's blocks that are now full of computed tokens (call after a step)."""
        if not self.enable_caching:
            return
        table = self.block_tables.get(request_id)
        if not table:
            return
        chain = self.request_key_hashes.setdefault(request_id, [])
        num_full = min(num_computed_tokens // self.block_size, len(table))
        for index in range(len(chain), num_full):
            key = self._key(chain[-1] if chain else None, token_ids, index, extra)
            block_id = table[index]
            if key not in self.cached_blocks and self.block_keys[block_id] is None:
                self.cached_blocks[key] = block_id
                self.block_keys[block_id] = key
            chain.append(hash(key))

    def _pop_free_block(self) -> int:
        """The next free block, evicted from the prefix cache if it was cached."""
        block_id, _ = self.free_block_ids.popitem(last=False)
        key = self.block_keys[block_id]
        if key is not None:
            del self.cached_blocks[key]
            self.block_keys[block_id] = None
        return block_id

    # ------------------------------------------------------------------ allocation
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
        new_ids = [self._pop_free_block() for _ in range(needed)]
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
        src, dst = table[index], self._pop_free_block()
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
        self.request_key_hashes[child_id] = list(self.request_key_hashes.get(parent_id, ()))

    def free(self, request_id: str) -> None:
        """Drop the request's references; blocks nobody holds go back to the free list (cached
        ones stay hittable until handed out again). Idempotent."""
        self.request_key_hashes.pop(request_id, None)
        # Last block first: the tail of a sequence is evicted before its (more shared) head.
        for block_id in reversed(self.block_tables.pop(request_id, [])):
            self.ref_counts[block_id] -= 1
            assert self.ref_counts[block_id] >= 0, f"block {block_id} freed more often than referenced"
            if self.ref_counts[block_id] == 0:
                self.free_block_ids[block_id] = None

    def block_table(self, request_id: str) -> list[int]:
        return self.block_tables.get(request_id, [])

    def check_invariants(self) -> None:
        """Asserts the bookkeeping is consistent (tests call this after every step)."""
        counts = [0] * self.num_blocks
        for table in self.block_tables.values():
            for block_id in table:
                counts[block_id] += 1
        assert counts == self.ref_counts, "reference counts disagree with block tables"
        for block_id in range(self.num_blocks):
            assert (block_id in self.free_block_ids) == (self.ref_counts[block_id] == 0), \
                f"block {block_id} free/ref mismatch"
        for key, block_id in self.cached_blocks.items():
            assert self.block_keys[block_id] == key, f"block {block_id} is cached under another key"
        assert sum(k is not None for k in self.block_keys) == len(self.cached_blocks), "stale block keys"
