"""The engine loop: schedule a batch, run the model, sample, append tokens, apply stop rules.

Thread model: the engine is single-threaded and not thread-safe. Exactly one thread owns it and
calls every method; the async wrapper (`pd_serve/engine/async_engine.py`) runs that loop on its
own thread and hands requests, aborts and outputs across through queues.

Lifecycle:
1. constructed over a ModelRunner whose cache has at least `cache.num_blocks` blocks;
2. `add_request` validates and queues requests (ValueError on bad input, nothing allocated);
3. `step` runs one prefill or decode batch and returns the outputs of that step; a finished or
   aborted request's blocks are freed before its final output is returned;
4. `leak_check` (tests) confirms that only running requests (and, for the disaggregated
   roles, parked requests and hand-off reservations; see `handoff.py`) hold blocks.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, replace

import numpy as np

from pd_serve.backends.base import DecodeBatch, ModelRunner, PrefillBatch, SeqChunk
from pd_serve.config import CacheConfig, SchedulerConfig
from pd_serve.engine.block_manager import BlockManager
from pd_serve.engine.handoff import HandoffMixin, Reservation
from pd_serve.engine.importance import check_importance, score_prompts
from pd_serve.engine.layer_stage import check_layer_stage, layer_hooks
from pd_serve.engine.output_text import OutputText
from pd_serve.engine.outputs import FinishReason, RequestOutput
from pd_serve.engine.request import LayerStage, Request
from pd_serve.engine.sampler import Sampler
from pd_serve.engine.sampling_params import SamplingParams
from pd_serve.engine.scheduler import ScheduledPrefill, Scheduler
from pd_serve.models.tokenizer import Tokenizer


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_cached_blocks: int
    cache_usage: float  # fraction of blocks held by requests
    prefix_hit_rate: float  # cached prompt tokens / prompt tokens looked up
    num_preemptions: int
    num_handoff: int = 0  # prefill role: parked requests holding blocks for their hand-off
    num_reserved: int = 0  # decode role: hand-off reservations holding blocks
    num_blocks: int = 0  # KV blocks of the cache (free, cached or held)
    prefix_query_tokens: int = 0  # prompt tokens looked up in the prefix cache since start
    prefix_hit_tokens: int = 0  # of those, tokens found cached


class LLMEngine(HandoffMixin):
    """Continuous-batching generation over one ModelRunner."""

    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, cache: CacheConfig,
                 scheduler: SchedulerConfig, seed: int | None = None) -> None:
        mc = runner.model_config
        if runner.block_size != cache.block_size:
            raise ValueError(f"cache.block_size {cache.block_size} differs from the runner's "
                             f"block_size {runner.block_size}")
        if cache.num_blocks > runner.num_blocks:
            raise ValueError(f"cache.num_blocks {cache.num_blocks} exceeds the runner's "
                             f"{runner.num_blocks} blocks")
        # A runner may be built for fewer positions than the model supports.
        model_max = min(mc.max_position_embeddings, runner.max_model_len)
        self.max_model_len = min(scheduler.max_model_len or model_max, model_max)
        self.block_manager = BlockManager(cache.num_blocks, cache.block_size,
                                          cache.enable_prefix_caching)
        self.scheduler = Scheduler(scheduler, self.block_manager, self.max_model_len)
        self._runner = runner
        self._tokenizer = tokenizer
        self._vocab_size = mc.vocab_size
        self._sampler = Sampler(seed)
        eos = set(mc.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self._eos = frozenset(eos)
        self._requests: dict[str, Request] = {}  # unfinished requests by id
        self._aborted: list[Request] = []  # reported as finished by the next step
        self._parked: dict[str, Request] = {}  # prefill role: waiting for their hand-off
        self._reserved: dict[str, Reservation] = {}  # decode role: incoming hand-offs
        self._generate_ids = itertools.count()
        # with `record_batches` (set by a step trace), what the last `step` ran:
        # ("prefill", [[prior, new], ...]), ("decode", [context per sequence, ...]) or None
        self.record_batches = False
        self.last_batch: tuple[str, list] | None = None

    # ----- requests --------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams, prefill_only: bool = False,
                    importance_q: int = 0, on_layer: LayerStage | None = None) -> None:
        """Queues a request; ValueError (naming the problem) if it can never be served.
        `prefill_only` (prefill role): park it after its first token for a KV hand-off.
        `importance_q` > 0 (P/D-Device refinement, see pd_serve.engine.importance): its first
        output carries the prompt's importance scores, observed from its last q positions.
        `on_layer` (layer-wise hand-off, with prefill_only): called during the step that
        completes its prefill, once per layer, when that layer's K/V are in the cache."""
        if self._id_in_use(request_id):
            raise ValueError(f"request_id {request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        check_importance(self._runner, importance_q)
        if on_layer is not None:
            check_layer_stage(self._runner)
        prompt = self._validate_prompt(prompt_token_ids)
        req = Request(
            request_id=request_id, prompt_token_ids=prompt, params=params,
            arrival_time=time.monotonic(),
            text=OutputText(self._tokenizer, params.stop, params.include_stop_str_in_output),
            generator=np.random.default_rng(params.seed) if params.seed is not None else None,
            prefill_only=prefill_only, importance_q=importance_q, on_layer=on_layer)
        self.scheduler.add(req)
        self._requests[request_id] = req

    def _validate_prompt(self, prompt_token_ids: list[int]) -> list[int]:
        prompt = list(prompt_token_ids)
        if not prompt:
            raise ValueError("prompt is empty")
        if len(prompt) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt)} tokens but max_model_len is "
                             f"{self.max_model_len} (prompt plus at least one generated token)")
        bad = [t for t in prompt if not isinstance(t, (int, np.integer))
               or not 0 <= t < self._vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {self._vocab_size}), "
                             f"got {bad[:5]}")
        return [int(t) for t in prompt]

    def abort(self, request_id: str) -> None:
        """Frees the request's blocks now; the next `step` reports it finished with ABORT.
        Unknown or already finished ids are ignored (the request may have just finished).
        A hand-off reservation is freed without any output."""
        if self._abort_handoff(request_id):
            return
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        self.scheduler.finish(req, FinishReason.ABORT)
        self._aborted.append(req)

    def has_unfinished(self) -> bool:
        return bool(self._requests or self._aborted)

    # ----- the loop --------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Runs one batch; returns one output per request that got a token, finished or was
        aborted since the last step."""
        outputs = [self._output(req, [], "") for req in self._aborted]
        self._aborted.clear()
        sched = self.scheduler.schedule()
        if self.record_batches:
            self.last_batch = (
                ("prefill", [[sp.request.num_computed_tokens, sp.num_tokens]
                             for sp in sched.prefills]) if sched.prefills else
                ("decode", [r.num_computed_tokens + 1 for r in sched.decodes])
                if sched.decodes else None)
        if sched.prefills:
            sampled = self._run_prefill(sched.prefills)
        elif sched.decodes:
            sampled = self._run_decode(sched.decodes)
        else:
            sampled = []
        outputs.extend(self._append(req, token) for req, token in sampled)
        return outputs

    def _run_prefill(self, prefills: list[ScheduledPrefill]) -> list[tuple[Request, int]]:
        seqs = []
        for sp in prefills:
            req, start = sp.request, sp.request.num_computed_tokens
            end = start + sp.num_tokens
            seqs.append(SeqChunk(req.all_token_ids[start:end], start,
                                 req.block_table[:self.block_manager.blocks_for(end)]))
        rows = [i for i, sp in enumerate(prefills) if sp.completes]
        done = [prefills[i].request for i in rows]
        with layer_hooks(self._runner, self.block_manager, done):
            if _all_greedy(done):  # the runner picks on its device; only token ids come back
                tokens = self._runner.prefill_argmax(PrefillBatch(seqs))[rows]
            else:
                logits = np.asarray(self._runner.prefill(PrefillBatch(seqs)))  # [seqs, vocab]
        for sp in prefills:
            self.scheduler.on_computed(sp.request, sp.num_tokens)
        score_prompts(self._runner, self.block_manager, done)
        if _all_greedy(done):
            return list(zip(done, (int(t) for t in tokens)))
        return self._sample(logits[rows], done)

    def _run_decode(self, reqs: list[Request]) -> list[tuple[Request, int]]:
        positions = [r.num_computed_tokens for r in reqs]
        tables = [r.block_table[:self.block_manager.blocks_for(p + 1)]
                  for r, p in zip(reqs, positions)]
        batch = DecodeBatch([r.last_token_id for r in reqs], positions, tables)
        if _all_greedy(reqs):
            tokens = self._runner.decode_argmax(batch)  # [num_seqs]
            for r in reqs:
                self.scheduler.on_computed(r, 1)
            return list(zip(reqs, (int(t) for t in tokens)))
        logits = self._runner.decode(batch)  # [num_seqs, vocab]
        for r in reqs:
            self.scheduler.on_computed(r, 1)
        return self._sample(logits, reqs)

    def _sample(self, logits: np.ndarray, reqs: list[Request]) -> list[tuple[Request, int]]:
        if not reqs:
            return []
        tokens = self._sampler.sample(logits, [r.params for r in reqs],
                                      [r.generator for r in reqs])
        return list(zip(reqs, tokens))

    def _append(self, req: Request, token: int) -> RequestOutput:
        """Appends a sampled token, applies the stop rules and builds the step's output."""
        req.output_token_ids.append(token)
        p = req.params
        reason = None
        if token in p.stop_token_ids or (not p.ignore_eos and token in self._eos):
            reason = FinishReason.STOP  # stop tokens never show as text
        elif req.text.push([token]):
            reason = FinishReason.STOP
        elif len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
            reason = FinishReason.LENGTH
        if reason is None and req.prefill_only:
            return self._park(req, token)
        if reason is not None:
            req.text.flush()
            self.scheduler.finish(req, reason)
            del self._requests[req.request_id]
        return self._output(req, [token], req.text.take_delta(req.is_finished))

    def _output(self, req: Request, new_ids: list[int], delta: str) -> RequestOutput:
        importance, req.prompt_importance = req.prompt_importance, None  # reported once
        return RequestOutput(
            request_id=req.request_id, new_token_ids=new_ids, text_delta=delta,
            text=req.text.text, finished=req.is_finished, finish_reason=req.finish_reason,
            prompt_tokens=req.num_prompt_tokens, completion_tokens=len(req.output_token_ids),
            cached_tokens=req.num_cached_tokens, prompt_importance=importance)

    # ----- helpers ---------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]],
                 params: SamplingParams | list[SamplingParams]) -> list[RequestOutput]:
        """Runs `prompts` to completion on an idle engine; returns one cumulative output per
        prompt, in order (`new_token_ids` holds every generated token)."""
        if self.has_unfinished():
            raise RuntimeError("generate() needs an idle engine; use add_request/step instead")
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        run = next(self._generate_ids)
        ids = [f"generate-{run}-{i}" for i in range(len(prompts))]
        try:
            for rid, prompt, p in zip(ids, prompts, plist):
                self.add_request(rid, prompt, p)
        except ValueError:
            for rid in ids:
                self.abort(rid)
            self._aborted.clear()
            raise
        tokens: dict[str, list[int]] = {rid: [] for rid in ids}
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                tokens[out.request_id].extend(out.new_token_ids)
                if out.finished:
                    final[out.request_id] = out
        return [replace(final[r], new_token_ids=tokens[r], text_delta=final[r].text) for r in ids]

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_free_blocks=bm.num_free_blocks, num_cached_blocks=bm.num_cached_blocks,
            cache_usage=bm.usage, prefix_hit_rate=bm.prefix_hit_rate,
            num_preemptions=self.scheduler.num_preemptions, num_handoff=len(self._parked),
            num_reserved=len(self._reserved), num_blocks=bm.num_blocks,
            prefix_query_tokens=bm.prefix_query_tokens, prefix_hit_tokens=bm.prefix_hit_tokens)

    def leak_check(self) -> None:
        """AssertionError unless exactly the running requests, parked requests and hand-off
        reservations hold blocks and, when all are gone, no block is referenced."""
        bm = self.block_manager
        bm.check_invariants()
        holders = {r.request_id for r in self.scheduler.running} | self._handoff_holders()
        if set(bm.seq_ids()) != holders:
            raise AssertionError(f"block tables {sorted(bm.seq_ids())} differ from running, "
                                 f"parked and reserved requests {sorted(holders)}")
        if not self.scheduler.has_unfinished() and not self._handoff_holders():
            bm.leak_check()


def _all_greedy(reqs: list[Request]) -> bool:
    """Greedy rows need no logits on the host (the sampler's greedy pick is np.argmax too)."""
    return bool(reqs) and all(r.params.greedy for r in reqs)
