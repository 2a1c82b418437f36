"""Profiling for the simulator: latency samples measured from a real ModelRunner in this
process (timed as tools/bench_backends.py times the backends: warm-up call per shape first,
compilation excluded), hand-off samples from the hand-off benchmark's results, and the fitted
LatencyProfile with its provenance.

Lifecycle of `profile_runner`: create the runner (pd_serve.backends.create_runner); measure
prefill steps over a grid of (batch, new tokens, cached prefix) plus a few mixed-length
batches, and decode steps over (batch, context) plus mixed contexts; close the runner; fit the
packed and the padded model forms and keep the one with the smaller RMS relative error.
KV contents do not matter for timing, so the cache is never filled: a chunk at `start_pos`
attends over whatever the cache holds there.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from pd_serve.backends.base import DecodeBatch, ModelRunner, PrefillBatch, RunnerConfig, SeqChunk
from pd_serve.sim.latency import (
    Chunk,
    DecodeSample,
    HandoffModel,
    HandoffSample,
    LatencyProfile,
    PrefillSample,
    fit_decode,
    fit_error,
    fit_handoff,
    fit_prefill,
)

Clock = Callable[[], float]


@dataclass(frozen=True)
class ProfileGrid:
    """Shapes measured: prefill batches of equal chunks (batch x new x prior, at most
    `max_tokens` new tokens a step, as the scheduler's budget) plus mixed ones, decode batches
    of equal contexts plus mixed ones; `repeats` timed calls each."""

    prefill_batches: tuple[int, ...] = (1, 2, 4)
    prefill_new: tuple[int, ...] = (16, 64, 256, 512, 1024)
    prefill_prior: tuple[int, ...] = (0, 512)
    prefill_mixed: tuple[tuple[Chunk, ...], ...] = (
        ((0, 1024), (0, 64)), ((0, 256), (0, 16), (0, 16), (0, 16)), ((512, 256), (0, 64)))
    decode_batches: tuple[int, ...] = (1, 2, 4, 8, 16)
    decode_contexts: tuple[int, ...] = (16, 256, 1024, 1900)
    decode_mixed: tuple[tuple[int, ...], ...] = ((16,) * 15 + (1900,), (256, 1024) * 8)
    max_tokens: int = 2048
    repeats: int = 3

    def prefill_shapes(self, max_len: int) -> list[tuple[Chunk, ...]]:
        shapes = [((p, n),) * b for b in self.prefill_batches for n in self.prefill_new
                  for p in self.prefill_prior if p + n <= max_len and b * n <= self.max_tokens]
        return shapes + [m for m in self.prefill_mixed if max(p + n for p, n in m) <= max_len]

    def decode_shapes(self, max_len: int) -> list[tuple[int, ...]]:
        shapes = [(c,) * b for b in self.decode_batches for c in self.decode_contexts
                  if c < max_len]
        return shapes + [m for m in self.decode_mixed if max(m) < max_len]


def _time_calls(calls: Sequence[Callable[[], object]], repeats: int, clock: Clock) -> list[float]:
    """The fastest of `repeats` timed calls of each, after one warm-up round (compilation,
    caches). Calls are interleaved round by round, so a burst of load from other processes
    disturbs one call of many shapes rather than every call of one; the minimum is the
    least-disturbed measurement."""
    for fn in calls:
        fn()
    best = [float("inf")] * len(calls)
    for _ in range(repeats):
        for i, fn in enumerate(calls):
            t0 = clock()
            fn()
            best[i] = min(best[i], clock() - t0)
    return best


def _tables(lengths: Sequence[int], block_size: int) -> list[list[int]]:
    out, nxt = [], 0
    for n in lengths:
        k = -(-n // block_size)
        out.append(list(range(nxt, nxt + k)))
        nxt += k
    return out


def measure_prefill(runner: ModelRunner, shapes: Sequence[tuple[Chunk, ...]], repeats: int,
                    clock: Clock = time.perf_counter, seed: int = 0) -> list[PrefillSample]:
    rng = np.random.default_rng(seed)
    vocab = runner.model_config.vocab_size
    calls = []
    for chunks in shapes:
        tables = _tables([p + n for p, n in chunks], runner.block_size)
        batch = PrefillBatch([SeqChunk(rng.integers(3, vocab, n).tolist(), p, t)
                              for (p, n), t in zip(chunks, tables)])
        calls.append(partial(runner.prefill, batch))
    times = _time_calls(calls, repeats, clock)
    return [PrefillSample(tuple(c), t) for c, t in zip(shapes, times)]


def measure_decode(runner: ModelRunner, shapes: Sequence[tuple[int, ...]], repeats: int,
                   clock: Clock = time.perf_counter, seed: int = 0) -> list[DecodeSample]:
    rng = np.random.default_rng(seed)
    vocab = runner.model_config.vocab_size
    calls = []
    for contexts in shapes:
        # the step writes position ctx - 1 and attends over ctx tokens
        batch = DecodeBatch(rng.integers(3, vocab, len(contexts)).tolist(),
                            [c - 1 for c in contexts], _tables(contexts, runner.block_size))
        calls.append(partial(runner.decode, batch))
    times = _time_calls(calls, repeats, clock)
    return [DecodeSample(tuple(c), t) for c, t in zip(shapes, times)]


def handoff_samples(path: str | Path, mode: str = "bulk") -> list[HandoffSample]:
    """(bytes, total seconds) of `mode` from a tools/bench_handoff.py results file."""
    data = json.loads(Path(path).read_text())
    out = [HandoffSample(int(r["bytes"]), float(r["total_ms"]) / 1000.0)
           for r in data.get("results", []) if r.get("mode") == mode]
    if not out:
        raise ValueError(f"{path}: no {mode!r} hand-off results")
    return out


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "load_1m_at_start": load}


def fit_profile(prefill: Sequence[PrefillSample], decode: Sequence[DecodeSample],
                handoff: HandoffModel | Sequence[HandoffSample], kv_bytes_per_token: int,
                provenance: dict[str, Any]) -> LatencyProfile:
    """Fits both model forms and keeps, per phase, the one with the smaller RMS relative
    error (the mixed-length samples are what tell them apart)."""
    pre = {padded: fit_prefill(prefill, padded) for padded in (False, True)}
    dec = {padded: fit_decode(decode, padded) for padded in (False, True)}
    errors = {"prefill": {p: fit_error(m, prefill) for p, m in pre.items()},
              "decode": {p: fit_error(m, decode) for p, m in dec.items()}}
    best = {k: v[True]["rms_rel_err"] < v[False]["rms_rel_err"]
            for k, v in errors.items()}
    fits = {k: {"padded" if p else "packed": e for p, e in v.items()} | {"chosen": (
        "padded" if best[k] else "packed")} for k, v in errors.items()}
    hmodel = handoff if isinstance(handoff, HandoffModel) else fit_handoff(handoff)
    samples: dict[str, list[Any]] = {"prefill": [asdict(s) for s in prefill],
                                     "decode": [asdict(s) for s in decode]}
    if not isinstance(handoff, HandoffModel):
        samples["handoff"] = [asdict(s) for s in handoff]
    return LatencyProfile(pre[best["prefill"]], dec[best["decode"]], hmodel, kv_bytes_per_token,
                          {**provenance, "fit_errors": fits}, samples)


def profile_runner(cfg: RunnerConfig, grid: ProfileGrid, handoff: HandoffModel |
                   Sequence[HandoffSample], command: str = "",
                   log: Callable[[str], None] = lambda _: None) -> LatencyProfile:
    """Measures a real runner built from `cfg` and fits its profile."""
    from pd_serve.backends import create_runner
    from pd_serve.models.config import ModelConfig

    mc = ModelConfig.from_dir(cfg.model_dir)
    max_len = cfg.max_model_len or mc.max_position_embeddings
    p_shapes, d_shapes = grid.prefill_shapes(max_len), grid.decode_shapes(max_len)
    need = max([sum(-(-(p + n) // cfg.block_size) for p, n in s) for s in p_shapes]
               + [sum(-(-c // cfg.block_size) for c in s) for s in d_shapes])
    cfg = RunnerConfig(**{**asdict(cfg), "num_blocks": max(cfg.num_blocks, need)})
    prov: dict[str, Any] = {
        "machine": machine(), "backend": cfg.backend, "device": cfg.device, "dtype": cfg.dtype,
        "threads": cfg.threads, "model": Path(cfg.model_dir).name,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command, "repeats": grid.repeats}
    t0 = time.perf_counter()
    runner = create_runner(cfg)
    try:
        log(f"measuring {len(p_shapes)} prefill shapes")
        pre = measure_prefill(runner, p_shapes, grid.repeats)
        log(f"measuring {len(d_shapes)} decode shapes")
        dec = measure_decode(runner, d_shapes, grid.repeats)
    finally:
        runner.close()
    prov["profiling_s"] = round(time.perf_counter() - t0, 1)
    dtype_bytes = 4 if cfg.dtype == "float32" else 2
    return fit_profile(pre, dec, handoff, mc.kv_bytes_per_token(dtype_bytes), prov)
