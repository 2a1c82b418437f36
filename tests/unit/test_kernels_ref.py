"""pd_kernels on CPU: the references against naive per-token loops, the public functions'
CPU fallback and argument checks, and (where triton is installed) the Triton kernels under the
Triton interpreter on tiny shapes, in a subprocess so TRITON_INTERPRET cannot leak."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from pd_serve.backends.torch.kernels import load_pd_kernels as find_pd_kernels
from tests.triton_interp import run_under_interpreter, script_main

ROOT = Path(__file__).resolve().parents[2]


def load_pd_kernels() -> ModuleType:
    """pd_kernels as installed, else the source tree's kernels/ under that name."""
    module = find_pd_kernels()
    assert module is not None, "kernels/ is missing from the source tree"
    return module


pk = load_pd_kernels()


def naive_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    tables: torch.Tensor, lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Token by token, head by head, in float64: [B, H, D]."""
    batch, heads, dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(batch, heads, dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            kvh = h // (heads // kv_heads)
            keys, values = [], []
            for pos in range(int(lens[b])):
                blk = int(tables[b, pos // block_size])
                keys.append(k_cache[blk, pos % block_size, kvh].double())
                values.append(v_cache[blk, pos % block_size, kvh].double())
            if not keys:
                continue
            scores = [float(q[b, h].double() @ k) * scale for k in keys]
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            out[b, h] = sum(w * v for w, v in zip(weights, values)) / sum(weights)
    return out


def naive_gather(kv_blocks: torch.Tensor, table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[L, 2, num_tokens, KVH, D], one token row at a time."""
    layers, _, _, block_size, kv_heads, dim = kv_blocks.shape
    out = torch.empty(layers, 2, num_tokens, kv_heads, dim, dtype=kv_blocks.dtype)
    for layer in range(layers):
        for kv in range(2):
            for t in range(num_tokens):
                out[layer, kv, t] = kv_blocks[layer, kv, int(table[t // block_size]),
                                              t % block_size]
    return out


def decode_case(dtype: torch.dtype, block_size: int, group: int, seed: int = 0,
                max_blocks: int = 4) -> tuple[torch.Tensor, ...]:
    """q, k_cache, v_cache, tables, lens: ragged rows (one empty), shuffled blocks, and NaN in
    every block no row uses, junk ids in the table past each row's last block."""
    gen = torch.Generator().manual_seed(seed)
    kv_heads, dim, num_blocks = 2, 8, 6 * max_blocks
    q = torch.randn(4, kv_heads * group, dim, generator=gen).to(dtype)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks - 1, generator=gen)
    tables = perm[:4 * max_blocks].view(4, max_blocks).int()  # [B, max_blocks]
    lens = torch.tensor([block_size * max_blocks, 0, 1, block_size + 3], dtype=torch.int32)
    tables[2, 1:] = -7
    tables[3, 2:] = 10**6
    unused = torch.ones(num_blocks, dtype=torch.bool)
    for b in range(4):
        unused[tables[b, :math.ceil(int(lens[b]) / block_size)].long()] = False
    k_cache[unused] = float("nan")
    v_cache[unused] = float("nan")
    return q, k_cache, v_cache, tables, lens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [4, 8, 16])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_ref_attention_matches_naive(dtype: torch.dtype, block_size: int, group: int) -> None:
    q, k_cache, v_cache, tables, lens = decode_case(dtype, block_size, group)
    got = pk.reference.ref_paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.35)
    want = naive_attention(q, k_cache, v_cache, tables, lens, 0.35)
    assert got.dtype == dtype and got.shape == q.shape
    assert torch.isfinite(got).all() and (got[1] == 0).all()
    # float32 math either way; the bf16 output rounding is at most 2^-9 relative
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_public_attention_on_cpu_is_the_reference() -> None:
    q, k_cache, v_cache, tables, lens = decode_case(torch.float32, 8, 4, seed=1)
    want = pk.ref_paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.5)
    out = torch.full_like(q, 9.0)
    got = pk.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.5, out=out)
    assert got is out
    assert torch.equal(out, want)
    assert torch.equal(pk.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.5), want)


def copy_case(dtype: torch.dtype, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_blocks [3, 2, 12, BS, 2, 4] and a shuffled table of 5 blocks."""
    gen = torch.Generator().manual_seed(block_size)
    kv_blocks = torch.randn(3, 2, 12, block_size, 2, 4, generator=gen).to(dtype)
    return kv_blocks, torch.randperm(12, generator=gen)[:5].int()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [4, 8])
@pytest.mark.parametrize("num_tokens", [0, 1, 4, 17])
@pytest.mark.parametrize("public", [False, True])
def test_gather_scatter_match_naive(dtype: torch.dtype, block_size: int, num_tokens: int,
                                    public: bool) -> None:
    kv_blocks, table = copy_case(dtype, block_size)
    num_tokens = min(num_tokens, 5 * block_size)
    gather = pk.gather_kv if public else pk.reference.ref_gather_kv
    scatter = pk.scatter_kv if public else pk.reference.ref_scatter_kv
    n = 3 * 2 * num_tokens * 2 * 4
    buf = torch.full((n + 7,), -3.0, dtype=dtype)  # flat, with a tail that must stay intact
    gather(kv_blocks, table, num_tokens, buf)
    assert torch.equal(buf[:n].view(3, 2, num_tokens, 2, 4), naive_gather(kv_blocks, table,
                                                                          num_tokens))
    fresh = torch.full_like(kv_blocks, 5.0)
    scatter(buf, fresh, table, num_tokens)
    assert torch.equal(naive_gather(fresh, table, num_tokens), buf[:n].view(3, 2, num_tokens,
                                                                            2, 4))
    # leak check: nothing outside the request's tokens was written, on either side
    assert (buf[n:] == -3.0).all()
    written = torch.zeros(12, block_size, dtype=torch.bool)
    for t in range(num_tokens):
        written[int(table[t // block_size]), t % block_size] = True
    assert (fresh[:, :, ~written] == 5.0).all()


def test_gather_into_uint8_buffer() -> None:
    kv_blocks, table = copy_case(torch.bfloat16, 8)
    raw = torch.zeros(3 * 2 * 10 * 2 * 4 * 2 + 16, dtype=torch.uint8)  # bytes
    pk.gather_kv(kv_blocks, table, 10, raw)
    got = raw[:3 * 2 * 10 * 2 * 4 * 2].view(torch.bfloat16).view(3, 2, 10, 2, 4)
    assert torch.equal(got, naive_gather(kv_blocks, table, 10))
    assert (raw[-16:] == 0).all()


def test_bad_arguments_raise() -> None:
    kv_blocks, table = copy_case(torch.float32, 4)
    buf = torch.zeros(1000)
    with pytest.raises(ValueError, match="block_table has 5"):
        pk.gather_kv(kv_blocks, table, 21, buf)
    with pytest.raises(ValueError, match="needs"):
        pk.gather_kv(kv_blocks, table, 20, torch.zeros(10))
    with pytest.raises(TypeError, match="dtype"):
        pk.gather_kv(kv_blocks, table, 4, torch.zeros(1000, dtype=torch.float16))
    with pytest.raises(TypeError, match="block_table"):
        pk.scatter_kv(buf, kv_blocks, table.float(), 4)
    with pytest.raises(ValueError, match="kv_blocks"):
        pk.gather_kv(kv_blocks[0], table, 4, buf)
    q, k_cache, v_cache, tables, lens = decode_case(torch.float32, 8, 2)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        pk.paged_decode_attention(q[:, :3], k_cache, v_cache, tables, lens, 1.0)
    with pytest.raises(TypeError, match="dtypes"):
        pk.paged_decode_attention(q.half(), k_cache, v_cache, tables, lens, 1.0)
    with pytest.raises(ValueError, match="context_lens"):
        pk.paged_decode_attention(q, k_cache, v_cache, tables, lens[:2], 1.0)
    with pytest.raises(ValueError, match="out"):
        pk.paged_decode_attention(q, k_cache, v_cache, tables, lens, 1.0, out=q[:1])


def test_imports_and_falls_back_without_triton() -> None:
    code = ("import sys; sys.modules['triton'] = None\n"
            f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            "import test_kernels_ref as t, torch\n"
            "assert not t.pk.triton_available()\n"
            "kv, table = t.copy_case(torch.float32, 4)\n"
            "buf = torch.empty(3 * 2 * 6 * 2 * 4)\n"
            "t.pk.gather_kv(kv, table, 6, buf)\n"
            "assert torch.equal(buf.view(3, 2, 6, 2, 4), t.naive_gather(kv, table, 6))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def interpreter_checks() -> list[str]:
    """Runs the Triton kernels (TRITON_INTERPRET=1, CPU tensors) against the references;
    returns the failures. bf16 attention is left to the GPU tests: the interpreter's tl.dot
    multiplies bf16 as raw uint16 bits (triton 3.6)."""
    from pd_kernels.decode_attention import paged_decode_attention_triton
    from pd_kernels.kv_copy import copy_kv_triton

    failures = []
    # (block size, group, splits, max blocks): some splits span several 64-key tiles; 70
    # splits (half of them empty) take the combine kernel's multi-chunk path (float32 only:
    # 560 programs take seconds in the interpreter)
    cases = [(4, 4, None, 4), (8, 1, 3, 4), (16, 2, 1, 4), (128, 8, 2, 4), (8, 1, 1, 24),
             (16, 4, 2, 16)]
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 4e-3)):
        for case in cases + [(128, 2, 70, 36)] * (dtype == torch.float32):
            block_size, group, splits, max_blocks = case
            q, k_cache, v_cache, tables, lens = decode_case(dtype, block_size, group, 2,
                                                            max_blocks)
            got = paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, 0.4,
                                                num_splits=splits)
            want = pk.reference.ref_paged_decode_attention(q, k_cache, v_cache, tables, lens,
                                                           0.4)
            err = (got.double() - want.double()).abs().max().item()
            if not err <= tol or not (got[1] == 0).all():
                failures.append(f"attention {dtype} {case}: err {err}")
    for dtype in (torch.float32, torch.bfloat16):
        kv_blocks, table = copy_case(dtype, 8)
        buf = torch.full((3 * 2 * 37 * 8 + 5,), 2.0, dtype=dtype)
        copy_kv_triton(kv_blocks, table, 37, buf, to_cache=False)
        fresh = torch.zeros_like(kv_blocks)
        copy_kv_triton(fresh, table, 37, buf, to_cache=True)
        if not (torch.equal(buf[:-5].view(3, 2, 37, 2, 4), naive_gather(kv_blocks, table, 37))
                and (buf[-5:] == 2.0).all()
                and torch.equal(naive_gather(fresh, table, 37), buf[:-5].view(3, 2, 37, 2, 4))):
            failures.append(f"gather/scatter {dtype}")
    return failures


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernels_under_interpreter() -> None:
    run_under_interpreter(__file__)


if __name__ == "__main__":
    script_main(interpreter_checks)
