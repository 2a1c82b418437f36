"""cann_ext through its ctypes bridge: block gather/scatter against numpy, argument checks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pd_serve.kv import cann_ext
from pd_serve.kv.cann_ext import CannExtError, Endpoint, gather_blocks, scatter_blocks


def make_cache(
    layers: int = 3,
    blocks: int = 8,
    block_shape: tuple[int, ...] = (4, 2, 5),
    dtype: type = np.float32,
    seed: int = 0,
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (layers, 2, blocks, *block_shape)  # [num_layers, 2, num_blocks, *block_shape]
    return rng.standard_normal(shape).astype(dtype)


def reference_gather(cache: np.ndarray, ids: list[int]) -> np.ndarray:
    return np.ascontiguousarray(cache[:, :, ids])


def test_version_and_abi() -> None:
    assert cann_ext.version() == "0.1.0"


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8, np.uint8, np.float64])
def test_gather_matches_numpy_and_scatter_restores(dtype: type) -> None:
    cache = make_cache(dtype=dtype)
    ids = [5, 0, 7, 2]
    got = gather_blocks(cache, ids)
    assert got.shape == (3, 2, 4, 4, 2, 5)
    np.testing.assert_array_equal(got, reference_gather(cache, ids))

    target = np.zeros_like(cache)
    scatter_blocks(target, ids, got)
    np.testing.assert_array_equal(target[:, :, ids], cache[:, :, ids])
    untouched = [b for b in range(cache.shape[2]) if b not in ids]
    assert not target[:, :, untouched].any()


def test_contiguous_layout_is_layer_k_v_major() -> None:
    # [num_layers, 2, num_blocks, block_bytes] bytes -> [layer0.K | layer0.V | layer1.K | ...]
    cache = np.arange(2 * 2 * 4 * 3, dtype=np.uint8).reshape(2, 2, 4, 3)
    flat = gather_blocks(cache, [3, 1]).reshape(-1)
    expected = np.concatenate(
        [cache[layer, kv, [3, 1]].reshape(-1) for layer in range(2) for kv in range(2)]
    )
    np.testing.assert_array_equal(flat, expected)


def test_gather_into_out_and_scatter_from_flat_bytes() -> None:
    cache = make_cache(layers=2, blocks=6)
    out = np.empty(2 * 2 * 3 * 40, dtype=np.float32)  # a reserved per-slot buffer, 1-D
    assert gather_blocks(cache, np.array([1, 4, 2], dtype=np.int32), out=out) is out
    wire = out.tobytes()
    target = np.zeros_like(cache)
    scatter_blocks(target, [1, 4, 2], np.frombuffer(wire, dtype=np.float32))
    np.testing.assert_array_equal(target[:, :, [1, 4, 2]], cache[:, :, [1, 4, 2]])


def test_empty_block_list() -> None:
    cache = make_cache()
    assert gather_blocks(cache, []).shape == (3, 2, 0, 4, 2, 5)
    scatter_blocks(cache, [], np.empty(0, dtype=np.float32))


@pytest.mark.parametrize("ids", [[0, 8], [-1], [100, 1]])
def test_out_of_range_block_ids_rejected(ids: list[int]) -> None:
    cache = make_cache()
    with pytest.raises(ValueError, match=r"outside \[0, 8\)"):
        gather_blocks(cache, ids)
    before = cache.copy()
    with pytest.raises(ValueError, match="outside"):
        scatter_blocks(cache, ids, np.zeros((3, 2, len(ids), 4, 2, 5), dtype=np.float32))
    np.testing.assert_array_equal(cache, before)


@pytest.mark.parametrize("ids", [[1.0, 2.0], [[1, 2]], [True, False]])
def test_non_integer_block_ids_rejected(ids: object) -> None:
    with pytest.raises(ValueError, match="block_ids"):
        gather_blocks(make_cache(), ids)  # type: ignore[arg-type]


def test_repeated_block_ids_rejected_by_scatter_only() -> None:
    cache = make_cache()
    data = gather_blocks(cache, [2, 2])
    np.testing.assert_array_equal(data[:, :, 0], data[:, :, 1])
    with pytest.raises(ValueError, match="repeat block 2"):
        scatter_blocks(cache, [2, 2], data)


def test_bad_cache_rejected() -> None:
    cache = make_cache()
    with pytest.raises(ValueError, match="C-contiguous"):
        gather_blocks(cache[:, :, ::2], [0])
    with pytest.raises(ValueError, match="num_layers, 2, num_blocks"):
        gather_blocks(np.zeros((3, 3, 8, 4), dtype=np.float32), [0])
    with pytest.raises(ValueError, match="num_layers, 2, num_blocks"):
        gather_blocks(np.zeros((3, 2, 8), dtype=np.float32), [0])
    with pytest.raises(ValueError, match="objects"):
        gather_blocks(np.empty((1, 2, 2, 1), dtype=object), [0])
    with pytest.raises(TypeError, match="numpy array"):
        gather_blocks([[1, 2]], [0])  # type: ignore[arg-type]
    cache.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        scatter_blocks(cache, [0], gather_blocks(cache, [0]))


def test_bad_data_rejected() -> None:
    cache = make_cache()
    good = gather_blocks(cache, [1, 3])
    with pytest.raises(ValueError, match="dtype"):
        scatter_blocks(cache, [1, 3], good.astype(np.float64))
    with pytest.raises(ValueError, match="elements"):
        scatter_blocks(cache, [1, 3], good.reshape(-1)[:-1].copy())
    with pytest.raises(ValueError, match="C-contiguous"):
        scatter_blocks(cache, [1, 3], np.asfortranarray(good))
    with pytest.raises(ValueError, match="share memory"):
        scatter_blocks(cache, [0], cache[0, 0, 1:7].reshape(-1))  # a view, 240 elements
    with pytest.raises(ValueError, match="elements"):
        gather_blocks(cache, [1, 3], out=np.empty(5, dtype=np.float32))
    with pytest.raises(ValueError, match="dtype"):
        gather_blocks(cache, [1, 3], out=np.empty_like(good, dtype=np.float16))


def test_c_layer_checks_bounds_itself() -> None:
    # Bypass the Python checks: the C side must refuse on its own and name the problem.
    lib = cann_ext._lib()
    cache = make_cache(layers=1, blocks=4, block_shape=(2,))
    layout = cann_ext._layout(cache)
    ids = np.array([0, 4], dtype=np.int64)
    out = np.empty(1 * 2 * 2 * 2, dtype=np.float32)
    status = lib.cx_gather_blocks(
        cache.ctypes.data,
        cache.nbytes,
        layout,
        ids.ctypes.data_as(cann_ext._I64P),
        2,
        out.ctypes.data,
        out.nbytes,
    )
    assert status == 2  # CX_ERR_OUT_OF_RANGE
    assert b"block_ids[1] = 4 is outside [0, 4)" in lib.cx_last_error()
    status = lib.cx_gather_blocks(
        cache.ctypes.data,
        cache.nbytes - 1,
        layout,
        ids.ctypes.data_as(cann_ext._I64P),
        1,
        out.ctypes.data,
        out.nbytes // 2,
    )
    assert status == 2 and b"past the paged buffer" in lib.cx_last_error()
    status = lib.cx_gather_blocks(
        cache.ctypes.data,
        cache.nbytes,
        layout,
        ids.ctypes.data_as(cann_ext._I64P),
        1,
        cache.ctypes.data + 8,
        out.nbytes // 2,
    )
    assert status == 1 and b"overlap" in lib.cx_last_error()  # CX_ERR_INVALID_ARG


def test_endpoint_registration_bookkeeping() -> None:
    a, b = np.zeros(64, dtype=np.uint8), np.zeros(16, dtype=np.float32)
    with Endpoint() as ep:
        ha, hb = ep.register(a), ep.register(b)
        assert ha != hb and ep.num_registered == 2
        with pytest.raises(CannExtError, match="overlaps") as err:
            ep.register(a[8:16])
        assert err.value.status == 6  # CX_ERR_EXISTS
        ep.deregister(ha)
        with pytest.raises(CannExtError, match="no registration"):
            ep.deregister(ha)
        assert ep.num_registered == 1
        assert ep.conn_id().startswith(b"cx-tcp/1 127.0.0.1 ")  # transfers: test_cann_transport
    # close() deregistered b; the endpoint is gone.
    assert ep._arrays == {}
    with pytest.raises(RuntimeError, match="closed"):
        ep.register(a)


@settings(max_examples=60, deadline=None)
@given(
    layers=st.integers(1, 3),
    blocks=st.integers(1, 12),
    block_elems=st.integers(1, 16),
    data=st.data(),
)
def test_scatter_then_gather_is_identity(
    layers: int, blocks: int, block_elems: int, data: st.DataObject
) -> None:
    ids = data.draw(st.lists(st.integers(0, blocks - 1), unique=True, max_size=blocks))
    cache = make_cache(layers, blocks, (block_elems,), dtype=np.float32, seed=len(ids))
    payload = (
        np.random.default_rng(blocks)
        .standard_normal((layers, 2, len(ids), block_elems))
        .astype(np.float32)
    )
    scatter_blocks(cache, ids, payload)
    np.testing.assert_array_equal(gather_blocks(cache, ids), payload)
    # and gather -> scatter into a fresh cache reproduces exactly those blocks
    fresh = np.zeros_like(cache)
    scatter_blocks(fresh, ids, gather_blocks(cache, ids))
    np.testing.assert_array_equal(fresh[:, :, ids], cache[:, :, ids])
