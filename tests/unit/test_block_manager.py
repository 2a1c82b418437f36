"""BlockManager: refcounts, prefix-cache hash chain, LRU eviction, invariants and leak check."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pd_serve.engine.block_manager import BlockManager


def computed(bm: BlockManager, seq: str, tokens: list[int]) -> tuple[list[int], int]:
    """Allocates `tokens` and marks them all computed (what a finished prefill does)."""
    table, cached = bm.allocate(seq, tokens)
    bm.mark_computed(seq, tokens, len(tokens))
    return table, cached


def test_allocate_and_free_counts() -> None:
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    table, cached = bm.allocate("a", list(range(1, 10)))
    assert (len(table), cached, bm.num_free_blocks) == (3, 0, 5)
    assert bm.usage == pytest.approx(3 / 8)
    bm.free("a")
    assert bm.num_free_blocks == 8 and bm.num_cached_blocks == 0
    bm.leak_check()


def test_shared_prefix_is_refcounted() -> None:
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    ta, _ = computed(bm, "a", list(range(1, 10)))
    tb, cached = bm.allocate("b", list(range(1, 9)) + [50, 51])
    assert cached == 8 and tb[:2] == ta[:2] and tb[2] != ta[2]
    assert bm.num_free_blocks == 8 - 4
    bm.check_invariants()
    bm.free("a")
    assert bm.num_free_blocks == 8 - 3  # a's tail block is free, its prefix still held by b
    bm.free("b")
    bm.leak_check()
    assert bm.prefix_hit_tokens == 8 and bm.prefix_query_tokens == 19


def test_hits_only_on_full_computed_blocks_and_never_whole_prompt() -> None:
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    tokens = list(range(1, 9))  # exactly two full blocks
    bm.allocate("a", tokens)
    bm.mark_computed("a", tokens, 5)  # only block 0 is full and computed
    assert bm.num_cached_blocks == 1
    assert len(bm.lookup(tokens + [9])[0]) == 1
    bm.mark_computed("a", tokens, 8)
    assert len(bm.lookup(tokens)[0]) == 1  # the last token must be computed
    assert len(bm.lookup(tokens + [9])[0]) == 2
    assert len(bm.lookup(tokens[:7])[0]) == 1  # a partial block never hits
    assert bm.lookup([2] + tokens[1:] + [9])[0] == []  # the chain starts at the first block
    bm.free("a")
    bm.leak_check()


def test_decode_filled_block_is_registered() -> None:
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    tokens = [1, 2, 3, 4, 5, 6]
    computed(bm, "a", tokens)
    for tok in (7, 8, 9):  # decode fills block 1 and starts block 2
        assert bm.append_slots("a", len(tokens) + 1)
        tokens.append(tok)
        bm.mark_computed("a", tokens, len(tokens))
    assert len(bm.table("a")) == 3 and bm.num_cached_blocks == 2
    bm.free("a")
    assert len(bm.lookup(tokens + [10])[0]) == 2
    bm.leak_check()


def test_lru_eviction_takes_a_freed_sequence_tail_first() -> None:
    bm = BlockManager(4, 2, enable_prefix_caching=True)
    computed(bm, "a", [1, 2, 3, 4, 5])  # [1,2] and [3,4] hashed, [5] not
    bm.free("a")
    assert bm.num_cached_blocks == 2 and bm.num_free_blocks == 4
    computed(bm, "x", [9, 9, 8, 8, 7])  # 3 blocks: 2 free, then evicts [3,4] (a's tail)
    assert len(bm.lookup([1, 2, 3, 4, 5])[0]) == 1
    bm.free("x")
    bm.leak_check()


def test_lru_eviction_order_follows_last_use() -> None:
    bm = BlockManager(4, 2, enable_prefix_caching=True)
    computed(bm, "a", [1, 2, 0])
    bm.free("a")
    computed(bm, "b", [3, 4, 0])
    bm.free("b")  # evictable, oldest first: [1,2], [3,4]
    _, cached = bm.allocate("d", [1, 2, 5])  # a hit takes [1,2] off the LRU list ...
    assert cached == 2
    bm.free("d")  # ... and freeing puts it back as the most recently used
    computed(bm, "e", [9, 9, 8, 8, 7])  # 2 free blocks, then evicts [3,4]
    assert bm.lookup([3, 4, 0])[0] == []
    assert len(bm.lookup([1, 2, 0])[0]) == 1
    bm.free("e")
    bm.leak_check()


def test_concurrent_identical_blocks_keep_one_entry() -> None:
    bm = BlockManager(8, 2, enable_prefix_caching=True)
    tokens = [1, 2, 3]
    bm.allocate("a", tokens)
    bm.allocate("b", tokens)  # a's blocks are not computed yet: no hit
    bm.mark_computed("a", tokens, 3)
    bm.mark_computed("b", tokens, 3)
    assert bm.num_cached_blocks == 1
    bm.free("a")
    bm.free("b")
    bm.check_invariants()
    assert bm.num_free_blocks == 8
    bm.leak_check()


def test_exhaustion() -> None:
    bm = BlockManager(3, 2, enable_prefix_caching=False)
    bm.allocate("a", [1, 2, 3, 4])
    assert not bm.can_allocate(bm.blocks_needed([5, 6, 7]))
    with pytest.raises(RuntimeError, match="not enough free blocks"):
        bm.allocate("b", [5, 6, 7])
    assert bm.append_slots("a", 5) and not bm.append_slots("a", 7)
    assert len(bm.table("a")) == 3
    with pytest.raises(RuntimeError, match="already holds"):
        bm.allocate("a", [1])
    bm.free("a")
    bm.leak_check()


def test_checks_detect_corruption() -> None:
    bm = BlockManager(4, 2, enable_prefix_caching=True)
    bm.allocate("a", [1, 2, 3])
    with pytest.raises(AssertionError, match="still held"):
        bm.leak_check()
    bm._refs[bm.table("a")[0]] += 1
    with pytest.raises(AssertionError, match="refcounts"):
        bm.check_invariants()


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / decode / free over shared prefixes, against a slot-content model: a
    cache hit must return blocks whose slots hold exactly the prompt's tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.bs = 2
        self.bm = BlockManager(12, self.bs, enable_prefix_caching=True)
        self.slots = np.full(12 * self.bs, -1)
        self.seqs: dict[str, list[int]] = {}
        self.next_id = 0

    def _slot(self, seq: str, pos: int) -> int:
        return self.bm.table(seq)[pos // self.bs] * self.bs + pos % self.bs

    @rule(prefix=st.sampled_from([[1, 2, 3, 4, 5, 6], [1, 2, 7, 8], [9, 9, 9, 9, 9]]),
          cut=st.integers(1, 6), tail=st.lists(st.integers(1, 3), max_size=3))
    def allocate(self, prefix: list[int], cut: int, tail: list[int]) -> None:
        tokens = prefix[:cut] + tail
        if not self.bm.can_allocate(self.bm.blocks_needed(tokens)):
            return
        seq = f"s{self.next_id}"
        self.next_id += 1
        _, cached = self.bm.allocate(seq, tokens)
        assert cached % self.bs == 0 and cached < len(tokens)
        for pos in range(len(tokens)):
            if pos < cached:
                assert self.slots[self._slot(seq, pos)] == tokens[pos], "stale cache hit"
            else:
                self.slots[self._slot(seq, pos)] = tokens[pos]
        self.bm.mark_computed(seq, tokens, len(tokens))
        self.seqs[seq] = tokens

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), token=st.integers(1, 3))
    def decode(self, data: st.DataObject, token: int) -> None:
        seq = data.draw(st.sampled_from(sorted(self.seqs)))
        tokens = self.seqs[seq]
        if not self.bm.append_slots(seq, len(tokens) + 1):
            return
        self.slots[self._slot(seq, len(tokens))] = token
        tokens.append(token)
        self.bm.mark_computed(seq, tokens, len(tokens))

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(sorted(self.seqs)))
        self.bm.free(seq)
        del self.seqs[seq]

    @invariant()
    def consistent(self) -> None:
        self.bm.check_invariants()
        held = {b for seq in self.seqs for b in self.bm.table(seq)}
        assert self.bm.num_free_blocks == self.bm.num_blocks - len(held)

    def teardown(self) -> None:
        for seq in list(self.seqs):
            self.bm.free(seq)
        self.bm.leak_check()


BlockManagerMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40,
                                                 deadline=None)
TestBlockManagerMachine = BlockManagerMachine.TestCase
