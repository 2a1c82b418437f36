"""Byte layout of one request's contiguous KV hand-off buffer: [layer0.K | layer0.V | layer1.K ...].

Each part (a *plane*) is the request's tokens in order, `[num_tokens, num_kv_heads, head_dim]`,
so a plane's offset follows from the layer index, K or V, the token count, the KV heads, the
head dim and the dtype alone. A slot buffer reserved for `max_model_len` tokens holds any
shorter request's layout in its first `total_bytes` bytes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pd_serve.models.config import ModelConfig

K, V = 0, 1
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class KVLayout:
    """Shape and dtype of one contiguous KV buffer; validated at construction."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # float32 | float16 | bfloat16
    itemsize: int
    num_tokens: int

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "num_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"layout.{name} must be a positive integer, got {value!r}")
        if self.dtype not in _ITEMSIZE:
            raise ValueError(f"layout.dtype must be one of {sorted(_ITEMSIZE)}, "
                             f"got {self.dtype!r}")
        if self.itemsize != _ITEMSIZE[self.dtype]:
            raise ValueError(f"layout.itemsize {self.itemsize!r} does not match dtype "
                             f"{self.dtype} ({_ITEMSIZE[self.dtype]})")

    @classmethod
    def for_model(cls, mc: ModelConfig, num_tokens: int, dtype: str = "float32") -> KVLayout:
        """The layout of `num_tokens` tokens of `mc`'s KV in `dtype` (the host hand-off moves
        float32, what `ModelRunner.read_kv` returns)."""
        return cls(mc.num_layers, mc.num_kv_heads, mc.head_dim, dtype,
                   _ITEMSIZE.get(dtype, 0), num_tokens)

    def with_tokens(self, num_tokens: int) -> KVLayout:
        return KVLayout(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype,
                        self.itemsize, num_tokens)

    @property
    def token_bytes(self) -> int:
        """Bytes of one token in one plane."""
        return self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def plane_bytes(self) -> int:
        return self.num_tokens * self.token_bytes

    @property
    def layer_bytes(self) -> int:
        return 2 * self.plane_bytes

    @property
    def total_bytes(self) -> int:
        return self.num_layers * self.layer_bytes

    def offset(self, layer: int, k_or_v: int) -> int:
        """Byte offset of `layer`'s K (0) or V (1) plane."""
        if not 0 <= layer < self.num_layers or k_or_v not in (K, V):
            raise IndexError(f"no plane ({layer}, {k_or_v}) in {self.num_layers} layers")
        return layer * self.layer_bytes + k_or_v * self.plane_bytes

    def layer_ranges(self) -> list[tuple[int, int]]:
        """(offset, length) of each layer's K and V planes together."""
        return [(self.offset(i, K), self.layer_bytes) for i in range(self.num_layers)]

    def block_fixed_ranges(self, block_size: int) -> list[tuple[int, int]]:
        """(offset, length) of every block of every plane, layer by layer, K before V: the
        one-transfer-per-block-per-layer-per-K/V baseline. The last block may be partial."""
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        out = []
        for layer in range(self.num_layers):
            for kv in (K, V):
                base = self.offset(layer, kv)
                for start in range(0, self.num_tokens, block_size):
                    n = min(block_size, self.num_tokens - start)
                    out.append((base + start * self.token_bytes, n * self.token_bytes))
        return out

    def numpy_dtype(self) -> np.dtype:
        if self.dtype == "bfloat16":
            try:
                import ml_dtypes
            except ImportError as exc:
                raise ValueError("a bfloat16 layout needs the ml_dtypes package") from exc
            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(self.dtype)

    def to_array(self, buffer: np.ndarray | bytes | bytearray | memoryview) -> np.ndarray:
        """A view [num_layers, 2, num_tokens, num_kv_heads, head_dim] of the first
        `total_bytes` bytes of `buffer` (no copy; read-only if `buffer` is)."""
        raw = np.frombuffer(buffer, dtype=np.uint8) if not isinstance(buffer, np.ndarray) \
            else buffer.reshape(-1).view(np.uint8)
        if raw.size < self.total_bytes:
            raise ValueError(f"buffer holds {raw.size} bytes, the layout needs "
                             f"{self.total_bytes}")
        shape = (self.num_layers, 2, self.num_tokens, self.num_kv_heads, self.head_dim)
        return raw[:self.total_bytes].view(self.numpy_dtype()).reshape(shape)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> KVLayout:
        """Parses network input; ValueError naming the problem."""
        if not isinstance(data, dict) or set(data) != set(cls.__dataclass_fields__):
            raise ValueError(f"layout must be an object with keys "
                             f"{sorted(cls.__dataclass_fields__)}, got {data!r}")
        return cls(**data)
