"""Paged KV block allocation with reference counts and a hash-chained prefix cache.

Every block is in exactly one of three states: *free* (no content worth keeping), *evictable*
(refcount 0 but holding a full, hashed block that a later prompt may reuse; kept in LRU order)
or *referenced* (held by one or more sequences' block tables; refcount = number of tables).
A full block's hash is blake2b(parent hash, its token ids), so equal hashes mean equal prefixes.
A block is hashed only once its K/V are computed (`mark_computed`), so a cache hit never reads
K/V that are still being written.

Lifecycle of one sequence (caller: the scheduler on the engine thread; never blocks):
1. `allocate(seq_id, token_ids)` reuses the longest cached prefix (never the whole sequence, so
   at least one token is computed and logits exist) and takes fresh blocks for the rest;
2. `mark_computed(seq_id, token_ids, n)` after each step registers newly full blocks;
3. `append_slots(seq_id, n)` before each decode step grows the table to hold `n` tokens;
4. `free(seq_id)` on finish, abort or preemption: hashed blocks become evictable, others free.
The block manager is the only owner of block tables; the runner just reads and writes slots.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence

import numpy as np


def hash_block(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """Hash of a full block given its parent's hash (b'' for the first block)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


class BlockManager:
    """Free list, refcounts, prefix-cache hash map and LRU of evictable blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got "
                             f"{num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._refs = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest first
        self._block_of: dict[bytes, int] = {}  # hash -> cached block
        self._hash_of: dict[int, bytes] = {}  # cached block -> hash
        self._tables: dict[str, list[int]] = {}
        self._chains: dict[str, list[bytes]] = {}  # hashes of each sequence's computed blocks
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    # ----- queries -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free plus evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._block_of)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        if not self.prefix_query_tokens:
            return 0.0
        return self.prefix_hit_tokens / self.prefix_query_tokens

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def table(self, seq_id: str) -> list[int]:
        return self._tables[seq_id]

    def seq_ids(self) -> list[str]:
        return list(self._tables)

    def lookup(self, token_ids: Sequence[int]) -> tuple[list[int], list[bytes]]:
        """Cached blocks (and their hashes) of the longest prefix of `token_ids`, leaving at
        least the last token uncached."""
        blocks: list[int] = []
        hashes: list[bytes] = []
        if not self.enable_prefix_caching:
            return blocks, hashes
        parent = b""
        bs = self.block_size
        for i in range((len(token_ids) - 1) // bs):
            parent = hash_block(parent, token_ids[i * bs:(i + 1) * bs])
            block = self._block_of.get(parent)
            if block is None:
                break
            blocks.append(block)
            hashes.append(parent)
        return blocks, hashes

    def blocks_needed(self, token_ids: Sequence[int]) -> int:
        """Free blocks `allocate(token_ids)` would consume, counting cache hits that must
        leave the evictable list."""
        hits, _ = self.lookup(token_ids)
        from_evictable = sum(1 for b in hits if self._refs[b] == 0)
        return self.blocks_for(len(token_ids)) - len(hits) + from_evictable

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    # ----- state changes -------------------------------------------------------------------

    def allocate(self, seq_id: str, token_ids: Sequence[int]) -> tuple[list[int], int]:
        """Builds the table for all of `token_ids`; returns (table, number of cached tokens).
        Raises RuntimeError if the blocks are not available (check `blocks_needed` first)."""
        if seq_id in self._tables:
            raise RuntimeError(f"sequence {seq_id!r} already holds blocks")
        if not self.can_allocate(self.blocks_needed(token_ids)):
            raise RuntimeError(f"not enough free blocks for sequence {seq_id!r}")
        hits, hashes = self.lookup(token_ids)
        for block in hits:  # take the hits first so that fresh allocation cannot evict them
            self._acquire(block)
        table = hits + [self._take_fresh() for _ in
                        range(self.blocks_for(len(token_ids)) - len(hits))]
        self._tables[seq_id] = table
        self._chains[seq_id] = hashes
        cached = len(hits) * self.block_size
        if self.enable_prefix_caching:
            self.prefix_query_tokens += len(token_ids)
            self.prefix_hit_tokens += cached
        return table, cached

    def append_slots(self, seq_id: str, num_tokens: int) -> bool:
        """Grows the table to hold `num_tokens` tokens; False (and no change) if blocks run out."""
        table = self._tables[seq_id]
        missing = self.blocks_for(num_tokens) - len(table)
        if missing > self.num_free_blocks:
            return False
        table.extend(self._take_fresh() for _ in range(missing))
        return True

    def mark_computed(self, seq_id: str, token_ids: Sequence[int], num_computed: int) -> None:
        """Registers the hashes of blocks that are now full and computed."""
        if not self.enable_prefix_caching:
            return
        chain, table, bs = self._chains[seq_id], self._tables[seq_id], self.block_size
        for i in range(len(chain), num_computed // bs):
            h = hash_block(chain[-1] if chain else b"", token_ids[i * bs:(i + 1) * bs])
            chain.append(h)
            block = table[i]
            # An identical block computed concurrently by another sequence keeps the entry.
            if h not in self._block_of and block not in self._hash_of:
                self._block_of[h] = block
                self._hash_of[block] = h

    def free(self, seq_id: str) -> None:
        """Releases a sequence's blocks; tail blocks first so they are evicted first."""
        table = self._tables.pop(seq_id)
        del self._chains[seq_id]
        for block in reversed(table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def _acquire(self, block: int) -> None:
        if self._refs[block] == 0:
            del self._evictable[block]
        self._refs[block] += 1

    def _take_fresh(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:  # evict the least recently used cached block
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
        self._refs[block] = 1
        return block

    # ----- checks ----------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raises AssertionError if the block states, refcounts or hash maps disagree."""
        free, evictable = set(self._free), set(self._evictable)
        referenced = {b for b in range(self.num_blocks) if self._refs[b] > 0}
        _check(len(free) == len(self._free), "duplicate block in the free list")
        _check(not (free & evictable) and not (free & referenced)
               and not (evictable & referenced), "a block is in two states")
        _check(len(free) + len(evictable) + len(referenced) == self.num_blocks,
               "a block is in no state")
        counts = [0] * self.num_blocks
        for seq_id, table in self._tables.items():
            _check(len(set(table)) == len(table), f"{seq_id!r} holds a block twice")
            for block in table:
                counts[block] += 1
        _check(counts == self._refs, "refcounts differ from the block tables")
        _check(all(self._block_of.get(h) == b for b, h in self._hash_of.items())
               and len(self._block_of) == len(self._hash_of), "hash maps disagree")
        _check(evictable <= set(self._hash_of), "an evictable block has no hash")
        _check(not (free & set(self._hash_of)), "a free block still has a hash")

    def leak_check(self) -> None:
        """Raises AssertionError if any block is still referenced (call when idle)."""
        self.check_invariants()
        _check(not self._tables, f"blocks still held: {self._tables}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(message)
