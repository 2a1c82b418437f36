"""Batch packing and shape buckets shared by the backends."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pd_serve.backends.base import DecodeBatch, PrefillBatch, SeqChunk
from pd_serve.backends.inputs import attention_mask, pack_decode, pack_prefill, shape_bucket


@given(n=st.integers(1, 4096), minimum=st.sampled_from([1, 16, 32]))
def test_shape_bucket_covers_and_bounds_waste(n: int, minimum: int) -> None:
    size = shape_bucket(n, minimum)
    assert size >= max(n, minimum)
    if n > 256:
        assert (size - n) / size < 0.2
    assert shape_bucket(size, minimum) == size  # a bucket is its own bucket


def test_shape_bucket_count_stays_small() -> None:
    buckets = {shape_bucket(n, 16) for n in range(1, 2049)}
    assert len(buckets) == 5 + 3 * 4  # 16..256 powers of two, then four per octave to 2048


def test_pack_prefill_slots_and_padding() -> None:
    batch = PrefillBatch([SeqChunk([5, 6, 7], 2, [3, 0]), SeqChunk([9], 0, [1])])
    packed = pack_prefill(batch, block_size=4, scratch_slot=40, pad_to=(4, 4, 8))
    assert packed.slot_mapping[0].tolist() == [14, 15, 0, 40]
    assert packed.context_slots[0].tolist() == [12, 13, 14, 15, 0, 40, 40, 40]
    assert packed.positions[0, :3].tolist() == [2, 3, 4]
    assert packed.context_lens.tolist() == [5, 1, 0, 0]
    assert packed.slot_mapping[2:].min() == 40  # padding rows write the scratch slot
    mask = attention_mask(packed)
    assert mask[0, 0, :3].tolist() == [True, True, True] and not mask[0, 0, 3]
    assert mask[2].any(axis=-1).all()  # no fully masked row (NaN softmax)


def test_block_table_too_short_is_an_error() -> None:
    with pytest.raises(ValueError, match="cannot hold"):
        pack_prefill(PrefillBatch([SeqChunk(list(range(5)), 0, [0])]), 4, 40)


def test_decode_lengths_must_agree() -> None:
    with pytest.raises(ValueError, match="lengths differ"):
        pack_decode(DecodeBatch([1, 2], [3], [[0], [1]]), 4, 40)
    packed = pack_decode(DecodeBatch([1], [4], [[0, 2]]), 4, 40)
    assert packed.slot_mapping.tolist() == [[2 * 4 + 0]]
    assert np.array_equal(packed.context_slots[0, :5], [0, 1, 2, 3, 8])
