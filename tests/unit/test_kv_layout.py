"""KVLayout: plane offsets, per-layer and block-fixed ranges, the array view, JSON form."""

from __future__ import annotations

import numpy as np
import pytest

from pd_serve.kv.layout import K, KVLayout, V
from pd_serve.kv.messages import HandoffDone, HandoffSource

LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=4, dtype="float32", itemsize=4,
                  num_tokens=10)


def test_sizes_and_offsets() -> None:
    assert LAYOUT.token_bytes == 2 * 4 * 4
    assert LAYOUT.plane_bytes == 10 * 32 and LAYOUT.layer_bytes == 2 * 320
    assert LAYOUT.total_bytes == 3 * 640
    assert [LAYOUT.offset(layer, kv) for layer in range(3) for kv in (K, V)] == [
        0, 320, 640, 960, 1280, 1600]
    assert LAYOUT.layer_ranges() == [(0, 640), (640, 640), (1280, 640)]
    with pytest.raises(IndexError):
        LAYOUT.offset(3, K)


def test_block_fixed_ranges_cover_the_buffer_once() -> None:
    ranges = LAYOUT.block_fixed_ranges(4)  # 3 blocks (4, 4, 2 tokens) per plane
    assert len(ranges) == 3 * 2 * 3
    assert ranges[:3] == [(0, 128), (128, 128), (256, 64)]
    assert ranges[3] == (320, 128)  # layer 0's V plane
    covered = np.zeros(LAYOUT.total_bytes, np.int64)
    for off, n in ranges:
        covered[off:off + n] += 1
    assert (covered == 1).all()
    assert LAYOUT.block_fixed_ranges(16) == [(o, 320) for o in range(0, 1920, 320)]


def test_to_array_is_a_view_in_layer_kv_order() -> None:
    buf = np.zeros(LAYOUT.total_bytes + 100, np.uint8)  # a slot buffer bigger than needed
    arr = LAYOUT.to_array(buf)
    assert arr.shape == (3, 2, 10, 2, 4) and arr.dtype == np.float32
    arr[1, V, 2, 1, 3] = 7.5
    flat = buf[:LAYOUT.total_bytes].view(np.float32)
    index = (LAYOUT.offset(1, V) + 2 * LAYOUT.token_bytes + (1 * 4 + 3) * 4) // 4
    assert flat[index] == 7.5 and np.count_nonzero(flat) == 1
    with pytest.raises(ValueError, match="bytes"):
        LAYOUT.to_array(buf[:100])
    assert LAYOUT.to_array(bytes(LAYOUT.total_bytes)).shape == arr.shape


def test_validation_and_float16() -> None:
    with pytest.raises(ValueError, match="num_tokens"):
        LAYOUT.with_tokens(0)
    with pytest.raises(ValueError, match="itemsize"):
        KVLayout(1, 1, 1, "float16", 4, 1)
    with pytest.raises(ValueError, match="dtype"):
        KVLayout(1, 1, 1, "int8", 1, 1)
    half = KVLayout(2, 1, 8, "float16", 2, 5)
    assert half.to_array(np.zeros(half.total_bytes, np.uint8)).dtype == np.float16


def test_messages_round_trip_and_strict_parsing() -> None:
    src = HandoffSource("r1", b"\x00conn", b"region", 0, LAYOUT, (1, 2, 3))
    assert HandoffSource.from_json(src.to_json()) == src
    bad = src.to_dict() | {"extra": 1}
    with pytest.raises(ValueError, match="fields"):
        HandoffSource.from_dict(bad)
    with pytest.raises(ValueError, match="offset"):
        HandoffSource.from_dict(src.to_dict() | {"offset": "0"})
    with pytest.raises(ValueError, match="checksums"):
        HandoffSource("r1", b"c", b"r", 0, LAYOUT, (1, 2))
    with pytest.raises(ValueError, match="JSON"):
        HandoffSource.from_json("{")
    with pytest.raises(ValueError, match="base64"):
        HandoffSource.from_dict(src.to_dict() | {"region": "***"})
    done = HandoffDone("r1", False, "checksum mismatch")
    assert HandoffDone.from_dict(done.to_dict()) == done
