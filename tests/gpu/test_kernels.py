"""pd_kernels' Triton kernels on CUDA against the torch references (pd_kernels.reference).

Decode attention tolerances (max abs difference; outputs are convex combinations of N(0, 1)
values, so |out| <= ~4 and mostly < 1): the reference does the same arithmetic in float32
from the same inputs, so the differences come from (a) rounding the output to the dtype,
at most half an ulp: 2^-9 |out| in bf16, 2^-12 |out| in fp16; (b) the probabilities rounded to
the dtype before P @ V (FlashAttention practice), relative 2^-9 / 2^-12 per weight, which
averages out over many keys; (c) float32 summation order (splits, tiles), ~1e-6. Hence
bf16 atol = rtol = 2e-2, fp16 4e-3, fp32 1e-4 (fp32 runs tl.dot in IEEE mode, not TF32).
Gather and scatter copy bits, so they must match exactly. Every test ends with a leak check:
CUDA memory allocated returns to its value before the test (the kernels keep nothing).
"""

from __future__ import annotations

import gc
import math
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from pd_serve.backends.torch.kernels import load_pd_kernels as find_pd_kernels

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available"),
]
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def load_pd_kernels() -> ModuleType:
    """pd_kernels as installed, else the source tree's kernels/ under that name."""
    module = find_pd_kernels()
    assert module is not None, "kernels/ is missing from the source tree"
    return module


pk = load_pd_kernels()


@pytest.fixture(scope="module", autouse=True)
def blas_workspace() -> None:
    """The references' first matmul on a stream allocates cuBLAS's workspace (32 MiB on
    Hopper) through the caching allocator and keeps it: make it exist before any leak check."""
    if torch.cuda.is_available():
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            a = torch.ones(64, 64, device="cuda", dtype=dtype)
            a = a @ a
            torch.nn.functional.scaled_dot_product_attention(a[None, None], a[None, None],
                                                             a[None, None])
            del a
        torch.cuda.synchronize()


@pytest.fixture(autouse=True)
def no_leak(blas_workspace: None) -> Iterator[None]:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    yield
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


def decode_inputs(dtype: torch.dtype, lens: list[int], heads: int, kv_heads: int, dim: int,
                  block_size: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q, k_cache, v_cache, block_tables, context_lens on CUDA: shuffled blocks, NaN in the
    blocks no row uses and junk ids past each row's last block (neither may be read)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    batch, max_blocks = len(lens), max(1, math.ceil(max(lens) / block_size))
    num_blocks = batch * max_blocks + 3
    q = torch.randn(batch, heads, dim, device="cuda", generator=gen).to(dtype)
    shape = (num_blocks, block_size, kv_heads, dim)  # [num_blocks, block_size, KVH, D]
    k_cache = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    v_cache = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, device="cuda", generator=gen)
    tables = perm[:batch * max_blocks].view(batch, max_blocks).int()  # [B, max_blocks]
    used = torch.zeros(num_blocks, dtype=torch.bool, device="cuda")
    for b, n in enumerate(lens):
        need = math.ceil(n / block_size)
        used[tables[b, :need].long()] = True
        tables[b, need:] = -1 if b % 2 else 10**7
    k_cache[~used] = float("nan")
    v_cache[~used] = float("nan")
    context_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")  # [B]
    return q, k_cache, v_cache, tables, context_lens


def check_decode(inputs: tuple[torch.Tensor, ...], scale: float, dtype: torch.dtype,
                 num_splits: int | None = None) -> None:
    from pd_kernels.decode_attention import paged_decode_attention_triton

    if num_splits is None:
        got = pk.paged_decode_attention(*inputs, scale)
    else:
        got = paged_decode_attention_triton(*inputs, scale, num_splits=num_splits)
    want = pk.reference.ref_paged_decode_attention(*inputs, scale)
    assert got.dtype == dtype and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])
    empty = inputs[4] == 0
    assert (got[empty] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [8, 16, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_decode_matches_reference(dtype: torch.dtype, block_size: int, group: int) -> None:
    lens = [0, 1, 63, 64, 65, 1000, 2049, 130]
    inputs = decode_inputs(dtype, lens, 2 * group, 2, 128, block_size)
    check_decode(inputs, 128 ** -0.5, dtype)


@pytest.mark.parametrize("num_splits", [1, 2, 5, 64, None])
@pytest.mark.parametrize("block_size", [16, 128])
def test_decode_llama_shape_any_split_count(num_splits: int | None, block_size: int) -> None:
    inputs = decode_inputs(torch.bfloat16, [4096, 0, 3001], 32, 8, 128, block_size, seed=1)
    check_decode(inputs, 128 ** -0.5, torch.bfloat16, num_splits)


@pytest.mark.parametrize("dim", [64, 80, 96])
@pytest.mark.parametrize("block_size", [32, 256])
def test_decode_other_head_dims(dim: int, block_size: int) -> None:
    inputs = decode_inputs(torch.float16, [700, 5, 0], 12, 4, dim, block_size, seed=2)
    check_decode(inputs, dim ** -0.5, torch.float16)


def test_decode_out_param_and_large_scores() -> None:
    q, *rest = decode_inputs(torch.bfloat16, [300, 1200], 8, 2, 128, 16, seed=3)
    q = q * 30  # scores in the hundreds: the online softmax must rescale without overflow
    out = torch.full_like(q, 7.0)
    got = pk.paged_decode_attention(q, *rest, 0.2, out=out)
    assert got is out
    want = pk.reference.ref_paged_decode_attention(q, *rest, 0.2)
    torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_decode_cuda_graph_capture_and_replay() -> None:
    q, k_cache, v_cache, tables, lens = decode_inputs(torch.bfloat16, [1500, 0, 77, 2048],
                                                      32, 8, 128, 16, seed=4)
    first_tables = tables.clone()
    out = torch.empty_like(q)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton compiles) off the capture
        pk.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.1, out=out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pk.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.1, out=out)
    for step in range(3):
        if step:  # new values in the same tensors (rows 0 and 3 swap tables on odd steps)
            q.copy_(torch.randn(q.shape, device="cuda").to(q.dtype))
            lens.copy_(torch.tensor([1500 - 300 * step, 0, 77 - step, 1500 - 200 * step],
                                    dtype=torch.int32))
            tables.copy_(first_tables[[3, 1, 2, 0]] if step % 2 else first_tables)
        graph.replay()
        eager = pk.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.1)
        want = pk.reference.ref_paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.1)
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
        torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=2e-2)
    del graph


def kv_inputs(dtype: torch.dtype, block_size: int, num_tokens: int, layers: int = 4,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_blocks [layers, 2, NB, BS, 8, 128] random, a shuffled table covering num_tokens."""
    need = max(1, math.ceil(num_tokens / block_size))
    num_blocks = need + 5
    kv_blocks = torch.randn(layers, 2, num_blocks, block_size, 8, 128,
                            device="cuda").to(dtype)
    table = torch.randperm(num_blocks, device="cuda")[:need].int()
    return kv_blocks, table


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [8, 16, 128])
@pytest.mark.parametrize("num_tokens", [1, 15, 16, 133, 2000])
def test_gather_scatter_match_reference(dtype: torch.dtype, block_size: int,
                                        num_tokens: int) -> None:
    kv_blocks, table = kv_inputs(dtype, block_size, num_tokens)
    n = kv_blocks.shape[0] * 2 * num_tokens * 8 * 128
    buf = torch.full((n + 100,), 3.0, dtype=dtype, device="cuda")  # flat, tail must survive
    want = torch.empty(n, dtype=dtype, device="cuda")
    pk.gather_kv(kv_blocks, table, num_tokens, buf)
    pk.reference.ref_gather_kv(kv_blocks, table, num_tokens, want)
    assert torch.equal(buf[:n], want) and (buf[n:] == 3.0).all()
    fresh = torch.full_like(kv_blocks, -2.0)
    pk.scatter_kv(buf, fresh, table, num_tokens)
    expect = torch.full_like(kv_blocks, -2.0)
    pk.reference.ref_scatter_kv(want, expect, table, num_tokens)
    assert torch.equal(fresh, expect)  # round trip, and nothing else in the cache written


def test_gather_into_uint8_buffer_and_shaped_out() -> None:
    kv_blocks, table = kv_inputs(torch.bfloat16, 16, 300)
    shape = (kv_blocks.shape[0], 2, 300, 8, 128)  # the KVLayout order
    raw = torch.zeros(math.prod(shape) * 2, dtype=torch.uint8, device="cuda")  # bytes
    pk.gather_kv(kv_blocks, table, 300, raw)
    shaped = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    pk.gather_kv(kv_blocks, table, 300, shaped)
    assert torch.equal(raw.view(torch.bfloat16).view(shape), shaped)
    assert torch.equal(shaped[1, 0, 17], kv_blocks[1, 0, int(table[1]), 1])


def test_gather_scatter_beyond_2g_elements() -> None:
    """A cache of more than 2^31 elements (4.3 GB in bf16): offsets must not wrap in int32."""
    num_blocks = 33_000  # [2, 2, 33000, 16, 8, 128] = 2.16e9 elements
    kv_blocks = torch.zeros(2, 2, num_blocks, 16, 8, 128, dtype=torch.bfloat16, device="cuda")
    table = torch.tensor([num_blocks - 1, 5, num_blocks - 2], dtype=torch.int32, device="cuda")
    src = torch.randn(2 * 2 * 40 * 1024, device="cuda").to(torch.bfloat16)
    pk.scatter_kv(src, kv_blocks, table, 40)
    assert torch.equal(kv_blocks[1, 1, num_blocks - 2, :8].reshape(-1),
                       src.view(2, 2, 40, 1024)[1, 1, 32:].reshape(-1))
    back = torch.empty_like(src)
    pk.gather_kv(kv_blocks, table, 40, back)
    assert torch.equal(back, src)
    del kv_blocks
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 300])
def test_fused_layer_ops_match_reference(dtype: torch.dtype, n: int) -> None:
    """Llama-3-8B shapes: rope within one rounding of the torch formulation (on the GPU the
    compiled kernel fuses the multiply-adds, so about a quarter of q/k elements differ by one
    ulp in every dtype; exact under the interpreter), the cache holding exactly the kernel's
    roped k and the untouched v; residual + RMSNorm and SiLU * up within one ulp of the model
    dtype."""
    gen = torch.Generator(device="cuda").manual_seed(n)
    heads, kv_heads, dim, hidden, inter, slots_total = 32, 8, 128, 4096, 14336, 1024

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", generator=gen).to(dtype)

    qkv, positions = randn(n, (heads + 2 * kv_heads) * dim), torch.randint(
        0, 8192, (n,), device="cuda", generator=gen)
    angles = torch.rand(8192, dim // 2, device="cuda", generator=gen) * 100
    cos, sin = (torch.cat([f(angles)] * 2, dim=1).to(dtype) for f in (torch.cos, torch.sin))
    slots = torch.randperm(slots_total, device="cuda", generator=gen)[:n]
    caches = [torch.zeros(4, slots_total, kv_heads, dim, device="cuda", dtype=dtype)
              for _ in range(2)]
    q, k = pk.rope_qk_cache(qkv, positions, cos, sin, slots, caches[0][0], caches[0][1],
                            heads, True)
    rq, rk = torch.empty_like(q), torch.empty_like(k)
    pk.reference.ref_rope_cache(qkv, positions, cos, sin, slots, caches[1][0], caches[1][1],
                                rq, rk)
    one_ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(q, rq, rtol=one_ulp, atol=one_ulp)
    torch.testing.assert_close(k, rk, rtol=one_ulp, atol=one_ulp)
    assert torch.equal(caches[0][1], caches[1][1])  # v: copied, not computed
    assert torch.equal(caches[0][0][slots], k.view(n, kv_heads, dim))  # the kernel's own k
    h, delta, weight = randn(n, hidden), randn(n, hidden), 1 + randn(hidden) / 4
    h_ref, x_ref = h.clone(), torch.empty_like(h)
    pk.reference.ref_add_rms_norm(h_ref, delta, weight, 1e-5, x_ref)
    x = pk.add_rms_norm(h, delta, weight, 1e-5)
    assert torch.equal(h, h_ref)
    torch.testing.assert_close(x, x_ref, rtol=TOL[dtype], atol=TOL[dtype])
    gu = randn(n, 2 * inter)
    ref = torch.empty(n, inter, device="cuda", dtype=dtype)
    pk.reference.ref_silu_mul(gu, ref)
    torch.testing.assert_close(pk.silu_mul(gu), ref, rtol=TOL[dtype], atol=TOL[dtype])
