"""Options of the PyTorch backend beyond RunnerConfig: fast path, CUDA graphs, decode attention.

Defaults suit serving (the fast path with CUDA graphs on CUDA, the plain formulation on CPU);
tests and benchmarks pass a TorchOptions to compare, and the environment variables below
override the defaults for a served instance (debugging without editing configs):
PD_SERVE_TORCH_FAST=0|1, PD_SERVE_TORCH_GRAPHS=0|1, PD_SERVE_TORCH_ATTENTION=auto|triton|flex|torch,
PD_SERVE_TORCH_GRAPH_BATCH=64 (largest captured decode batch), PD_SERVE_TORCH_FUSED=0|1 (the
fused layer ops of pd_kernels).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pd_serve.backends.torch.attention import DECODE_BACKENDS

DEFAULT_GRAPH_BATCHES = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)


@dataclass(frozen=True)
class TorchOptions:
    """How the torch runner executes; `fast=None` picks the fast path exactly on CUDA."""

    fast: bool | None = None
    cuda_graphs: bool = True  # decode replays captured graphs (fast path on CUDA only)
    decode_attention: str = "auto"  # auto | triton | flex | torch (see attention.py)
    graph_batch_sizes: tuple[int, ...] = DEFAULT_GRAPH_BATCHES
    # Context buckets in tokens, each captured with block tables of ceil(c / block_size)
    # columns; None: powers of two from 256 up to max_model_len (which is always the last).
    graph_contexts: tuple[int, ...] | None = None
    # Fused residual+norm, SiLU*up and rope+cache-write kernels (pd_kernels) where they cover
    # the model. Off by default until their Triton versions have run on a GPU: so far they are
    # checked under the Triton interpreter and against the references only.
    fused: bool = False

    def __post_init__(self) -> None:
        if self.decode_attention not in ("auto", *DECODE_BACKENDS):
            raise ValueError(f"decode_attention must be auto or one of {DECODE_BACKENDS}, "
                             f"got {self.decode_attention!r}")
        sizes = self.graph_batch_sizes
        if not sizes or any(b <= 0 for b in sizes) or list(sizes) != sorted(set(sizes)):
            raise ValueError(f"graph_batch_sizes must be increasing positive sizes, got {sizes}")
        if self.graph_contexts is not None and (
                not self.graph_contexts or any(c <= 0 for c in self.graph_contexts)):
            raise ValueError(f"graph_contexts must be positive, got {self.graph_contexts}")

    @classmethod
    def from_env(cls) -> TorchOptions:
        """Defaults, overridden by the PD_SERVE_TORCH_* variables that are set."""
        env = os.environ
        fast = _flag(env.get("PD_SERVE_TORCH_FAST"), "PD_SERVE_TORCH_FAST")
        graphs = _flag(env.get("PD_SERVE_TORCH_GRAPHS"), "PD_SERVE_TORCH_GRAPHS")
        fused = _flag(env.get("PD_SERVE_TORCH_FUSED"), "PD_SERVE_TORCH_FUSED")
        max_batch = env.get("PD_SERVE_TORCH_GRAPH_BATCH")
        sizes: tuple[int, ...] = DEFAULT_GRAPH_BATCHES
        if max_batch:
            if not max_batch.isdigit() or int(max_batch) <= 0:
                raise ValueError(f"PD_SERVE_TORCH_GRAPH_BATCH must be a positive integer, "
                                 f"got {max_batch!r}")
            top = int(max_batch)
            sizes = tuple(b for b in DEFAULT_GRAPH_BATCHES if b < top) + (top,)
        return cls(fast=fast, cuda_graphs=True if graphs is None else graphs,
                   decode_attention=env.get("PD_SERVE_TORCH_ATTENTION", "auto"),
                   graph_batch_sizes=sizes, fused=bool(fused))


def _flag(value: str | None, name: str) -> bool | None:
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def context_buckets(opts: TorchOptions, max_model_len: int) -> tuple[int, ...]:
    """Increasing context buckets in tokens, the last covering max_model_len."""
    if opts.graph_contexts is not None:
        buckets = sorted({min(c, max_model_len) for c in opts.graph_contexts})
    else:
        buckets, c = [], 256
        while c < max_model_len:
            buckets.append(c)
            c *= 2
    if not buckets or buckets[-1] < max_model_len:
        buckets.append(max_model_len)
    return tuple(buckets)
