"""Measurements of tools/bench_gpu_engine.py: baselines (copy bandwidth, matmul ceiling), our
runner's decode and prefill, the LLMEngine step loop, and transformers on the same weights."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pd_serve.backends.base import DecodeBatch, PrefillBatch, SeqChunk
from pd_serve.backends.torch.runner import TorchRunner
from pd_serve.models.config import ModelConfig


def time_ms(fn: Callable[[], object], device: torch.device, iters: int,
            warm: int = 3) -> dict[str, float]:
    """Median / p10 / p90 milliseconds of `fn` (CUDA events around each call on CUDA, the host
    clock elsewhere), after `warm` untimed calls."""
    for _ in range(warm):
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = np.percentile(times, [10, 90])
    return {"median_ms": round(statistics.median(times), 4), "p10_ms": round(float(q[0]), 4),
            "p90_ms": round(float(q[1]), 4), "iters": iters}


def copy_bandwidth(device: torch.device, gib: float, iters: int) -> dict[str, float]:
    """Device copy of `gib` GiB: bytes read + written per second (the HBM baseline)."""
    n = int(gib * 2**30)
    src = torch.empty(n, dtype=torch.uint8, device=device)  # [n] bytes
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src), device, iters)
    return {**t, "bytes": n, "gb_per_s": round(2 * n / (t["median_ms"] / 1e3) / 1e9, 1)}


def matmul_ceiling(device: torch.device, n: int, iters: int) -> dict[str, float]:
    """bf16 (float32 on CPU) n x n x n matmul: FLOP/s (the compute baseline for MFU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, dtype=dtype, device=device)  # [n, n]
    b = torch.randn(n, n, dtype=dtype, device=device)  # [n, n]
    t = time_ms(lambda: a @ b, device, iters)
    return {**t, "n": n, "tflop_per_s": round(2 * n**3 / (t["median_ms"] / 1e3) / 1e12, 3)}


def weight_bytes(runner: TorchRunner) -> int:
    """Bytes of the weights one decode step reads (every layer, final norm, lm_head; the
    embedding table is read only at B rows and left out)."""
    m = runner.model
    tensors = [m.final_norm, m.lm_head]
    for layer in m.layers:
        tensors += [layer.input_norm, layer.post_norm, layer.qkv.weight, layer.o.weight,
                    layer.gate_up.weight, layer.down.weight]
    return sum(t.numel() * t.element_size() for t in tensors)


def prefill_flops(mc: ModelConfig, lens: list[int]) -> float:
    """FLOPs of a prefill of fresh prompts of `lens` tokens: projections of every token,
    causal attention (QK^T and PV over t(t+1)/2 pairs), lm_head of each last token."""
    h = mc.hidden_size
    per_token = 2 * mc.num_layers * (h * (mc.q_size + 2 * mc.kv_size) + mc.q_size * h
                                     + 3 * h * mc.intermediate_size)
    attn = sum(mc.num_layers * 4 * mc.num_heads * mc.head_dim * t * (t + 1) / 2 for t in lens)
    return per_token * sum(lens) + attn + 2 * h * mc.vocab_size * len(lens)


def decode_grid(runner: TorchRunner, batches: list[int], contexts: list[int], iters: int,
                floor: Callable[[int, int], float]) -> list[dict[str, Any]]:
    """Step time of `decode_argmax` at each (batch, context): row i owns its own blocks, every
    row at position context - 1 (the cache content does not change the work)."""
    rows = []
    per = -(-max(contexts) // runner.block_size)
    for ctx in contexts:
        for b in batches:
            tables = [list(range(i * per, (i + 1) * per)) for i in range(b)]
            batch = DecodeBatch([1] * b, [ctx - 1] * b, tables)
            t = time_ms(functools.partial(runner.decode_argmax, batch), runner.device, iters)
            fl = floor(b, ctx)
            rows.append({"batch": b, "context": ctx, **t, "floor_ms": round(fl, 4),
                         "x_floor": round(t["median_ms"] / fl, 3)})
    return rows


def prefill_runs(runner: TorchRunner, tokens: int, batches: list[int], iters: int,
                 ceiling_tflops: float) -> list[dict[str, Any]]:
    """`prefill_argmax` of `b` fresh prompts of `tokens` tokens each: time and MFU."""
    rows, per = [], -(-tokens // runner.block_size)
    rng = np.random.default_rng(0)
    vocab = runner.model_config.vocab_size
    for b in batches:
        seqs = [SeqChunk(rng.integers(0, vocab, tokens).tolist(), 0,
                         list(range(i * per, (i + 1) * per))) for i in range(b)]
        t = time_ms(functools.partial(runner.prefill_argmax, PrefillBatch(seqs)),
                    runner.device, iters)
        flops = prefill_flops(runner.model_config, [tokens] * b)
        tflops = flops / (t["median_ms"] / 1e3) / 1e12
        rows.append({"batch": b, "tokens": tokens, **t, "tflop": round(flops / 1e12, 2),
                     "tflop_per_s": round(tflops, 1), "mfu": round(tflops / ceiling_tflops, 3)})
    return rows


def engine_loop(runner: TorchRunner, model_dir: str, batch: int, prompt_len: int,
                steps: int) -> dict[str, Any]:
    """LLMEngine decode steps at `batch` running requests (greedy, so the runner's argmax
    path): host wall time of `engine.step()` once every request has its first token."""
    from pd_serve.config import CacheConfig, SchedulerConfig
    from pd_serve.engine.engine import LLMEngine
    from pd_serve.engine.sampling_params import SamplingParams
    from pd_serve.models.tokenizer import Tokenizer

    engine = LLMEngine(runner, Tokenizer(model_dir),
                       CacheConfig(runner.block_size, runner.num_blocks, False),
                       SchedulerConfig(max_num_seqs=batch, max_num_batched_tokens=8192,
                                       max_model_len=runner.max_model_len))
    params = SamplingParams(max_tokens=steps + 16, temperature=0.0, ignore_eos=True)
    rng = np.random.default_rng(1)
    for i in range(batch):
        engine.add_request(f"bench-{i}", rng.integers(0, 256, prompt_len).tolist(), params)
    started: set[str] = set()
    while len(started) < batch:
        started |= {o.request_id for o in engine.step() if o.new_token_ids}
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        outs = engine.step()
        times.append((time.perf_counter() - t0) * 1e3)
        assert len(outs) == batch, "every running request gets a token per decode step"
    for i in range(batch):
        engine.abort(f"bench-{i}")
    engine.step()
    engine.leak_check()
    step = statistics.median(times)
    return {"batch": batch, "prompt_len": prompt_len, "steps": steps,
            "step_median_ms": round(step, 4), "tokens_per_s": round(batch / step * 1e3, 1)}


def hf_reference(model_dir: str, mc: ModelConfig, device: torch.device, prefill_tokens: int,
                 batches: list[int], context: int, iters: int) -> dict[str, Any]:
    """transformers' LlamaForCausalLM on the same generated weights: prefill (its default
    forward, logits of every token) and one decode step with its KV cache."""
    try:
        from transformers import AutoConfig, LlamaForCausalLM
    except ImportError as exc:
        return {"skipped": f"transformers not importable ({exc})"}
    from pd_serve.models.random_init import RandomInit, RandomWeights

    spec = RandomInit.from_dir(model_dir)
    assert spec is not None, "the bench writes a random-init directory"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(AutoConfig.from_pretrained(model_dir)).eval()
    finally:
        torch.set_default_dtype(before)
    fetch = RandomWeights(mc, spec, device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            tensor = fetch(name)
            assert tensor is not None, f"no generated tensor for {name}"
            param.copy_(tensor)
    return {"prefill": _hf_prefill(model, mc, device, prefill_tokens, iters),
            "decode": [_hf_decode(model, mc, device, b, context, iters) for b in batches]}


def _hf_prefill(model: Any, mc: ModelConfig, device: torch.device, tokens: int,
                iters: int) -> dict[str, Any]:
    ids = torch.randint(0, mc.vocab_size, (1, tokens), device=device)  # [1, tokens]
    with torch.inference_mode():
        t = time_ms(lambda: model(input_ids=ids, use_cache=False), device, iters)
    return {"tokens": tokens, **t}


def _hf_decode(model: Any, mc: ModelConfig, device: torch.device, batch: int, context: int,
               iters: int) -> dict[str, Any]:
    ids = torch.randint(0, mc.vocab_size, (batch, context), device=device)  # [B, context]
    step = torch.randint(0, mc.vocab_size, (batch, 1), device=device)  # [B, 1]
    with torch.inference_mode():
        past = model(input_ids=ids, use_cache=True).past_key_values
        t = time_ms(lambda: model(input_ids=step, past_key_values=past, use_cache=True),
                    device, iters)
    return {"batch": batch, "context": context, **t}
