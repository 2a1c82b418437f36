"""Continuous batching: picks each engine step's prefill or decode batch under a token budget.

Policy (prefill-first, as in vLLM v0, with chunked prefill):
* A step is either a prefill batch or a decode batch, never both.
* Prefill comes first: the step continues requests whose prefill is unfinished, then admits
  waiting requests in FIFO order while the token budget (`max_num_batched_tokens`), the sequence
  limit (`max_num_seqs`) and the free blocks allow. Admission allocates blocks for the whole
  sequence at once (reusing prefix-cached blocks), so prefill never runs out of blocks. A prompt
  longer than the remaining budget is computed in chunks over several steps (a chunk is a
  SeqChunk with start_pos > 0). The head of the queue is never skipped.
* Only when there is no prefill work, every running request decodes one token.
* If a decode step runs out of blocks, the latest-arrived running request is preempted by
  recompute: its blocks are freed, it goes to the front of the waiting queue and later re-prefills
  prompt + generated tokens (its prefix-cached blocks may still be reused). The earliest-arrived
  request is never preempted while others run, so it always makes progress.

Lifecycle (caller: the engine thread only):
1. `add` queues a validated request (ValueError if it could never fit the cache);
2. `schedule` once per engine step allocates, admits and preempts;
3. `on_computed` records the tokens the runner computed (registers full blocks for reuse);
4. `finish` frees the blocks of a finished or aborted request.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pd_serve.config import SchedulerConfig
from pd_serve.engine.block_manager import BlockManager
from pd_serve.engine.outputs import FinishReason
from pd_serve.engine.request import Request, RequestStatus


@dataclass
class ScheduledPrefill:
    """`num_tokens` tokens of `request` computed this step, from its `num_computed_tokens`."""

    request: Request
    num_tokens: int

    @property
    def completes(self) -> bool:
        """True when this chunk ends the prefill, so its logits give the next token."""
        return self.request.num_computed_tokens + self.num_tokens == self.request.prefill_len


@dataclass
class SchedulerOutput:
    prefills: list[ScheduledPrefill] = field(default_factory=list)
    decodes: list[Request] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.prefills and not self.decodes


class Scheduler:
    """Waiting queue, running set and the admission / preemption policy."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 max_model_len: int) -> None:
        if config.max_num_batched_tokens < config.max_num_seqs:
            raise ValueError(
                f"scheduler.max_num_batched_tokens ({config.max_num_batched_tokens}) must be "
                f">= scheduler.max_num_seqs ({config.max_num_seqs}) so a decode step fits")
        self.config = config
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # sorted by arrival
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        """Queues `req`; ValueError if it could never fit the KV cache even when alone."""
        self.check_fits(req)
        self.waiting.append(req)

    def check_fits(self, req: Request) -> None:
        """ValueError if `req` could never fit the KV cache even when alone."""
        total = min(req.num_prompt_tokens + req.params.max_tokens, self.max_model_len)
        # The last sampled token is never written to the cache.
        need = self.block_manager.blocks_for(total - 1)
        if need > self.block_manager.num_blocks:
            bm = self.block_manager
            raise ValueError(
                f"request {req.request_id!r} needs up to {total - 1} tokens of KV cache "
                f"({need} blocks) but the cache holds {bm.num_blocks} blocks of "
                f"{bm.block_size} tokens; shorten the prompt or lower max_tokens")

    def adopt(self, req: Request) -> None:
        """Adds a RUNNING request whose blocks the caller already allocated (a hand-off)."""
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        self.running.sort(key=lambda r: r.arrival_time)

    def park(self, req: Request) -> None:
        """Takes a prefilled request out of the running set, keeping its blocks (hand-off)."""
        self.running.remove(req)
        req.status = RequestStatus.HANDOFF

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        prefills = self._schedule_prefill()
        if prefills:
            return SchedulerOutput(prefills=prefills)
        decodes, preempted = self._schedule_decode()
        return SchedulerOutput(decodes=decodes, preempted=preempted)

    def on_computed(self, req: Request, num_tokens: int) -> None:
        """Records that `num_tokens` more tokens of `req` now have K/V in the cache."""
        req.num_computed_tokens += num_tokens
        self.block_manager.mark_computed(req.request_id, req.all_token_ids,
                                         req.num_computed_tokens)

    def finish(self, req: Request, reason: FinishReason) -> None:
        """Marks `req` finished and frees its blocks (no-op if already finished)."""
        if req.is_finished:
            return
        if req in self.running:
            self.running.remove(req)
            self.block_manager.free(req.request_id)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.block_table = []
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason

    def _schedule_prefill(self) -> list[ScheduledPrefill]:
        budget = self.config.max_num_batched_tokens
        out: list[ScheduledPrefill] = []
        for req in self.running:
            if req.is_prefilling and budget > 0:
                n = min(req.prefill_len - req.num_computed_tokens, budget)
                out.append(ScheduledPrefill(req, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if not self._admit(req):
                break
            self.waiting.popleft()
            n = min(req.prefill_len - req.num_computed_tokens, budget)
            out.append(ScheduledPrefill(req, n))
            budget -= n
        return out

    def _admit(self, req: Request) -> bool:
        """Allocates blocks for all of `req`'s tokens; False if they are not free."""
        bm = self.block_manager
        tokens = req.all_token_ids
        if not bm.can_allocate(bm.blocks_needed(tokens)):
            return False
        table, cached = bm.allocate(req.request_id, tokens)
        req.block_table = table
        req.num_computed_tokens = cached
        req.prefill_len = len(tokens)
        if req.num_preemptions == 0:
            req.num_cached_tokens = cached
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        self.running.sort(key=lambda r: r.arrival_time)  # stable: ties keep admission order
        return True

    def _schedule_decode(self) -> tuple[list[Request], list[Request]]:
        # Earliest arrival first: a victim (the latest arrival) is never one already scheduled.
        scheduled: list[Request] = []
        preempted: list[Request] = []
        for req in list(self.running):
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            assert not req.is_prefilling, "decode scheduled before prefill finished"
            while not self.block_manager.append_slots(req.request_id,
                                                      req.num_computed_tokens + 1):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            else:
                scheduled.append(req)
        return scheduled, preempted

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.block_manager.free(req.request_id)
        req.block_table = []
        req.num_computed_tokens = 0
        req.prefill_len = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
