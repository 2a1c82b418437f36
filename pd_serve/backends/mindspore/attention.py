"""The one place the MindSpore backend chooses its attention formulation: the generic one built
from basic ops (CPU here, and any target) or Ascend's fused kernels (`ascend_ops.py`).

`select_attention` decides from the device, dtype and head size; `build_kernel` makes the chosen
cell. Both kernels own one layer's K/V cache and take the same inputs, so the model code above
them does not change with the device. Nothing Ascend-specific is imported unless it is chosen.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore import dtype as mstype

GENERIC = "generic"
ASCEND_FUSED = "ascend_fused"
FUSED_DTYPES = ("float16", "bfloat16")  # FlashAttentionScore and PagedAttention take no float32
OVERRIDE_ENV = "PD_SERVE_MS_ATTENTION"  # "generic" forces the basic-op formulation on Ascend
CANN_HOME_ENVS = ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME")
CANN_DEFAULT_HOMES = ("/usr/local/Ascend/ascend-toolkit/latest", "/usr/local/Ascend/cann")
MS_ASCEND_PLUGIN = "lib/plugin/ascend/libmindspore_internal_kernels.so"


@dataclass(frozen=True)
class AttentionChoice:
    kind: str  # GENERIC | ASCEND_FUSED
    reason: str


def missing_ascend_parts(dev: Path = Path("/dev"), env: dict[str, str] | None = None,
                         cann_homes: Iterable[str] = CANN_DEFAULT_HOMES) -> list[str]:
    """What this machine lacks to run MindSpore on Ascend NPUs (empty: nothing found missing)."""
    env = dict(os.environ) if env is None else env
    missing = []
    if not any(dev.glob("davinci[0-9]*")):
        missing.append(f"NPU device files ({dev}/davinci<N>: no Ascend driver, or no NPU visible "
                       f"to this process)")
    homes = [env[k] for k in CANN_HOME_ENVS if env.get(k)] + list(cann_homes)
    if not any((Path(h) / "lib64" / "libascendcl.so").is_file() for h in homes):
        missing.append("the CANN toolkit (libascendcl.so not under $ASCEND_HOME_PATH/lib64 or "
                       f"{', '.join(cann_homes)}; install it and source its set_env.sh)")
    spec = importlib.util.find_spec("mindspore")
    roots = list(spec.submodule_search_locations or []) if spec else []
    if not any((Path(r) / MS_ASCEND_PLUGIN).is_file() for r in roots):
        missing.append(f"MindSpore's Ascend plugin (mindspore/{MS_ASCEND_PLUGIN})")
    return missing


def select_attention(device: str, dtype: str, head_dim: int,
                     missing: Callable[[], list[str]] = missing_ascend_parts,
                     override: str | None = None) -> AttentionChoice:
    """The formulation for `device`; RuntimeError naming what is missing when `ascend` is asked
    for on a machine without it. `override` (default: $PD_SERVE_MS_ATTENTION) may say generic."""
    if device == "cpu":
        return AttentionChoice(GENERIC, "device cpu: fused attention kernels exist only on Ascend")
    if device != "ascend":
        raise ValueError(f"device must be cpu or ascend for mindspore, got {device!r}")
    lacking = missing()
    if lacking:
        raise RuntimeError("model.device is ascend but this machine lacks " + "; ".join(lacking))
    override = os.environ.get(OVERRIDE_ENV, "auto") if override is None else override
    if override not in ("auto", GENERIC):
        raise ValueError(f"{OVERRIDE_ENV} must be auto or generic, got {override!r}")
    if override == GENERIC:
        return AttentionChoice(GENERIC, f"{OVERRIDE_ENV}=generic")
    if dtype not in FUSED_DTYPES:
        return AttentionChoice(GENERIC, f"dtype {dtype}: the fused kernels take float16/bfloat16")
    if head_dim % 16:
        return AttentionChoice(GENERIC, f"head_dim {head_dim}: FlashAttentionScore needs a "
                                        f"multiple of 16")
    return AttentionChoice(ASCEND_FUSED, "device ascend: ReshapeAndCache, FlashAttentionScore "
                                         "(prefill), PagedAttention (decode)")


def build_kernel(kind: str, num_heads: int, num_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int, name: str, dtype: mstype.Type) -> nn.Cell:
    """The attention cell of one layer with its zeroed cache of `num_blocks` blocks (scratch
    included); `name` prefixes the cache Parameters."""
    if kind == ASCEND_FUSED:
        from pd_serve.backends.mindspore.ascend_ops import AscendAttention

        return AscendAttention(num_heads, num_kv_heads, head_dim, num_blocks, block_size, name,
                               dtype)
    if kind != GENERIC:
        raise ValueError(f"attention kind must be {GENERIC} or {ASCEND_FUSED}, got {kind!r}")
    return GenericAttention(num_heads, num_kv_heads, head_dim, num_blocks * block_size, name,
                            dtype)


def cache_param(shape: tuple[int, ...], name: str, dtype: mstype.Type) -> Parameter:
    return Parameter(Tensor(np.zeros(shape, np.float32), dtype), name=name, requires_grad=False)


class GenericAttention(nn.Cell):
    """Paged attention from basic ops: scatter new K/V into their slots, gather each sequence's
    context by slot, attend with a causal-by-position mask (`pd_serve.backends.inputs`)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, num_slots: int,
                 name: str, dtype: mstype.Type) -> None:
        super().__init__()
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.group = num_heads // num_kv_heads
        self.scale = head_dim ** -0.5
        # [(num_blocks + 1) * block_size, num_kv_heads, head_dim]; the last block is scratch.
        self.k_cache = cache_param((num_slots, num_kv_heads, head_dim), name + "k_cache", dtype)
        self.v_cache = cache_param((num_slots, num_kv_heads, head_dim), name + "v_cache", dtype)
        self.bmm_t = ops.BatchMatMul(transpose_b=True)
        self.bmm = ops.BatchMatMul()

    def construct(self, q: Tensor, k: Tensor, v: Tensor, slots: Tensor, ctx_slots: Tensor,
                  masked: Tensor, block_tables: Tensor | None = None,
                  context_lens: Tensor | None = None) -> Tensor:
        """q [N, heads, D]; k, v [N, kv_heads, D]; slots [N]; ctx_slots [B, C]; masked
        [B, 1, 1, T, C] (True: hidden). Returns [N, heads * D]. The last two are unused here."""
        b, c = ctx_slots.shape
        n = q.shape[0]
        t = n // b
        k_all = ops.scatter_update(self.k_cache, slots, k)
        v_all = ops.scatter_update(self.v_cache, slots, v)
        flat_ctx = ctx_slots.reshape(-1)
        ctx_shape = (b, c, self.num_kv_heads, self.head_dim)
        # k_ctx, v_ctx: [B, kv_heads, C, D]
        k_ctx = ops.gather(k_all, flat_ctx, 0).reshape(ctx_shape).transpose(0, 2, 1, 3)
        v_ctx = ops.gather(v_all, flat_ctx, 0).reshape(ctx_shape).transpose(0, 2, 1, 3)
        # q: [B, kv_heads, group * T, D]; query head h uses kv head h // group
        q = q.reshape(b, t, self.num_kv_heads, self.group, self.head_dim).transpose(0, 2, 3, 1, 4)
        q = q.reshape(b, self.num_kv_heads, self.group * t, self.head_dim)
        scores = self.bmm_t(q, k_ctx) * self.scale  # [B, kv_heads, group * T, C]
        scores = ops.cast(scores.reshape(b, self.num_kv_heads, self.group, t, c), mstype.float32)
        # a finite fill keeps all-padding rows NaN-free (uniform weights over scratch)
        scores = ops.masked_fill(scores, masked, float(np.finfo(np.float32).min))
        probs = ops.softmax(scores, -1).astype(q.dtype)
        out = self.bmm(probs.reshape(b, self.num_kv_heads, self.group * t, c), v_ctx)
        out = out.reshape(b, self.num_kv_heads, self.group, t, self.head_dim)
        out = out.transpose(0, 3, 1, 2, 4)  # [B, T, kv_heads, group, D]
        return out.reshape(n, -1)

    def read(self, slots: Tensor) -> tuple[Tensor, Tensor]:
        """K and V of `slots` [S], each [S, kv_heads, D] (eager, outside the graph)."""
        return ops.gather(self.k_cache, slots, 0), ops.gather(self.v_cache, slots, 0)

    def write(self, slots: Tensor, k: np.ndarray, v: np.ndarray) -> None:
        """Stores k, v [S, kv_heads, D] into `slots` [S] (eager, outside the graph)."""
        for cache, values in ((self.k_cache, k), (self.v_cache, v)):
            ops.scatter_update(cache, slots, Tensor(values, cache.dtype))


def main() -> int:
    """`python -m pd_serve.backends.mindspore.attention`: a node's pre-flight check for Ascend
    (exit status 1, naming what is missing, on a machine that cannot run the fused path)."""
    lacking = missing_ascend_parts()
    print("ascend: ready" if not lacking else "ascend: missing " + "; ".join(lacking))
    return 1 if lacking else 0


if __name__ == "__main__":
    raise SystemExit(main())
