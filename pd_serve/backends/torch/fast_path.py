"""The fast path of the torch runner (CUDA): packed prefill with flash attention per sequence,
paged decode attention over the block tables, decode through captured CUDA graphs.

Prefill packs every sequence's new tokens into one token stream, so the projections run as one
matmul over N tokens without padding; attention runs per sequence (`attention.py`). Decode
writes the new token's K/V into its slot on the device (index_copy_, no host sync) and reads
the context through the paged kernel; the step runs on static buffers (`cuda_graphs.py`).
With `TorchOptions.fused` (and pd_kernels covering the model) both run the fused layer stack
(`fused_layers.py`), whose rope kernel also writes the cache.

Lifecycle: 1. built by the runner over its decoder and KV cache; 2. `warmup()` runs one prefill
on the scratch block and captures the decode graphs; 3. `prefill` / `decode` any number of
times (inputs already validated by the runner); 4. dropped with the runner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F

from pd_serve.backends.base import DecodeBatch, SeqChunk
from pd_serve.backends.torch.attention import causal_attention, make_decode_attention
from pd_serve.backends.torch.cuda_graphs import DecodeGraphs, DecodeInputs, Layout
from pd_serve.backends.torch.fused_layers import run_layers_fused, supports_fused
from pd_serve.backends.torch.model import TorchDecoder
from pd_serve.backends.torch.options import TorchOptions, context_buckets


def token_slots(table: list[int], start: int, stop: int, block_size: int) -> np.ndarray:
    """Cache slot of positions start .. stop-1 through `table`, [stop - start] int64."""
    pos = np.arange(start, stop)
    return np.asarray(table, dtype=np.int64)[pos // block_size] * block_size + pos % block_size


@dataclass(frozen=True)
class PrefillPlan:
    """Host-side layout of a packed prefill: one int64 array holding tokens, positions and
    slots of all N new tokens, the last token's row of each sequence, then the context slots
    of each sequence that starts past position 0."""

    packed: np.ndarray  # [3N + num_seqs + sum of prefixed contexts] int64
    spans: list[tuple[int, int, int, int]]  # per sequence: (row, length, ctx offset, ctx len)
    num_tokens: int

    @classmethod
    def build(cls, seqs: list[SeqChunk], block_size: int) -> PrefillPlan:
        tokens, positions, slots, ctx = [], [], [], []
        spans, row, ctx_off = [], 0, 0
        for s in seqs:
            q, end = len(s.token_ids), s.start_pos + len(s.token_ids)
            tokens.append(np.asarray(s.token_ids, dtype=np.int64))
            positions.append(np.arange(s.start_pos, end, dtype=np.int64))
            slots.append(token_slots(s.block_table, s.start_pos, end, block_size))
            if s.start_pos > 0:
                ctx.append(token_slots(s.block_table, 0, end, block_size))
                spans.append((row, q, ctx_off, end))
                ctx_off += end
            else:
                spans.append((row, q, 0, 0))
            row += q
        last = np.asarray([r + q - 1 for r, q, _, _ in spans], dtype=np.int64)
        packed = np.concatenate([*tokens, *positions, *slots, last, *ctx])
        return cls(packed, spans, row)


class FastPath:
    """Prefill and decode over the runner's decoder and paged cache, on the device."""

    def __init__(self, model: TorchDecoder, kv_blocks: torch.Tensor, opts: TorchOptions,
                 max_model_len: int, kernels: ModuleType | None) -> None:
        mc = model.cfg
        self.model, self.kv_blocks, self.kernels = model, kv_blocks, kernels
        # [num_layers, 2, (num_blocks + 1) * block_size, num_kv_heads, head_dim], same storage
        self.kv_flat = kv_blocks.view(mc.num_layers, 2, -1, mc.num_kv_heads, mc.head_dim)
        self.block_size = kv_blocks.shape[3]
        self.scratch_block = kv_blocks.shape[2] - 1
        self.scale = mc.head_dim ** -0.5
        self.device = kv_blocks.device
        self.attn = make_decode_attention(opts.decode_attention, self.device, kernels)
        # the fused layer ops need pd_kernels and a model the fused stack covers
        self.ops = kernels if opts.fused and supports_fused(model) else None
        cols = tuple(sorted({-(-c // self.block_size) for c in
                             context_buckets(opts, max_model_len)}))
        lay = Layout(self.block_size, self.scratch_block, max_model_len, mc.vocab_size)
        self.graphs = DecodeGraphs(self._decode_step, lay, opts.graph_batch_sizes, cols,
                                   self.device, model.dtype, opts.cuda_graphs)

    def warmup(self) -> int:
        """One prefill into the scratch block, then decode graph capture; returns the number
        of graphs captured."""
        self.prefill([SeqChunk([0] * self.block_size, 0, [self.scratch_block])], False)
        return self.graphs.capture()

    def decode(self, batch: DecodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Device views: argmax token ids [n] int64 and logits [n, vocab] (model dtype)."""
        return self.graphs.run(batch)

    def prefill(self, seqs: list[SeqChunk], all_rows: bool,
                layer_hook: Callable[[int], None] | None = None) -> torch.Tensor:
        """Logits [num_seqs, vocab] of each sequence's last token, or [N, vocab] of every new
        token (sequences in order) with `all_rows`; model dtype, on the device. `layer_hook(i)`
        runs once layer i's K/V are in the cache (its copies queue behind them on the stream)."""
        plan = PrefillPlan.build(seqs, self.block_size)
        n = plan.num_tokens
        dev = torch.from_numpy(plan.packed).to(self.device)  # [packed] int64
        slots, last = dev[2 * n:3 * n], dev[3 * n:3 * n + len(seqs)]

        def attention(i: int, q: torch.Tensor, k: torch.Tensor | None,
                      v: torch.Tensor) -> torch.Tensor:
            if layer_hook is not None:  # both stacks wrote this layer's K/V before attending
                layer_hook(i)
            return self._prefill_attention(plan, dev, i, q, k, v)

        if self.ops is not None:
            x = run_layers_fused(self.model, self.ops, dev[:n], dev[n:2 * n], slots,
                                 self.kv_flat, attention, want_k=True)  # [N, hidden]
            return F.linear(x if all_rows else x[last], self.model.lm_head)

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self.kv_flat[i, 0].index_copy_(0, slots, k)
            self.kv_flat[i, 1].index_copy_(0, slots, v)
            return attention(i, q, k, v)

        h = self.model.run_layers(dev[:n], dev[n:2 * n], attend)  # [N, hidden]
        return self.model.logits(h if all_rows else h[last])

    def _prefill_attention(self, plan: PrefillPlan, dev: torch.Tensor, i: int, q: torch.Tensor,
                           k: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of the packed new tokens q [N, H, D] over their own k, v [N, KVH, D]
        or, for a sequence that starts past position 0, over its cached context."""
        assert k is not None, "prefill always hands over the new tokens' k"
        if len(plan.spans) == 1 and plan.spans[0][3] == 0:
            return causal_attention(q, k, v)
        ctx_base = 3 * plan.num_tokens + len(plan.spans)
        k_cache, v_cache = self.kv_flat[i, 0], self.kv_flat[i, 1]
        outs = []
        for row, length, off, ctx in plan.spans:
            rows = slice(row, row + length)
            if ctx == 0:
                outs.append(causal_attention(q[rows], k[rows], v[rows]))
            else:
                idx = dev[ctx_base + off:ctx_base + off + ctx]  # [ctx] slots
                outs.append(causal_attention(q[rows], k_cache[idx], v_cache[idx]))
        return torch.cat(outs)  # [N, H, D]

    def _decode_step(self, inp: DecodeInputs) -> torch.Tensor:
        """One decode step on static inputs -> logits [B, vocab]; graph-safe (no host sync)."""
        slots = inp.slot_mapping.long()
        kv = self.kv_blocks

        def attention(i: int, q: torch.Tensor, k: torch.Tensor | None,
                      v: torch.Tensor) -> torch.Tensor:
            return self.attn(q, kv[i, 0], kv[i, 1], inp.block_tables, inp.context_lens,
                             self.scale)

        tokens, positions = inp.token_ids.long(), inp.positions.long()
        if self.ops is not None:
            x = run_layers_fused(self.model, self.ops, tokens, positions, slots, self.kv_flat,
                                 attention, want_k=False)  # [B, hidden]
            return F.linear(x, self.model.lm_head)  # [B, vocab]

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self.kv_flat[i, 0].index_copy_(0, slots, k)
            self.kv_flat[i, 1].index_copy_(0, slots, v)
            return attention(i, q, k, v)

        h = self.model.run_layers(tokens, positions, attend)
        return self.model.logits(h)  # [B, vocab]
