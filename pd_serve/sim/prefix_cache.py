"""A prefill instance's prefix cache in the simulator: an LRU set of trace hash blocks (ids that
are prefix-chained, as in the Mooncake traces: an equal id at position k means an equal prompt
up to that block) with a capacity in blocks.

Lifecycle: `match(hash_ids)` at batch admission counts the leading blocks present (and marks
them used); `insert(hash_ids, full_blocks)` once the prefill has computed them; beyond the
capacity the least recently used blocks are evicted. Like the engine's block manager, a chain is
touched tail first so its shared head is the last to go.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class PrefixCache:
    __slots__ = ("capacity", "_lru", "hit_blocks", "query_blocks")

    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks <= 0:
            raise ValueError(f"prefix cache capacity must be positive, got {capacity_blocks}")
        self.capacity = capacity_blocks
        self._lru: OrderedDict[int, None] = OrderedDict()  # oldest first
        self.hit_blocks = 0
        self.query_blocks = 0

    def __len__(self) -> int:
        return len(self._lru)

    def match(self, hash_ids: Sequence[int]) -> int:
        """Leading blocks of `hash_ids` in the cache (marked as just used)."""
        lru = self._lru
        n = 0
        for h in hash_ids:
            if h not in lru:
                break
            n += 1
        for h in reversed(hash_ids[:n]):
            lru.move_to_end(h)
        self.hit_blocks += n
        self.query_blocks += len(hash_ids)
        return n

    def insert(self, hash_ids: Sequence[int], full_blocks: int) -> None:
        """Caches the first `full_blocks` blocks of a computed prompt."""
        lru = self._lru
        for h in reversed(hash_ids[:full_blocks]):
            lru[h] = None
            lru.move_to_end(h)
        while len(lru) > self.capacity:
            lru.popitem(last=False)
