"""Engine side of the disaggregated roles: park prefilled requests, adopt handed-off ones.

`HandoffMixin` adds the hand-off methods to `LLMEngine` (same thread rules: one engine thread
calls everything; nothing here blocks). The bytes themselves move in `pd_serve/kv/`.

Prefill role, per request:
1. `add_request(..., prefill_only=True)`; the request is prefilled and its first token sampled
   and reported by `step()` as usual;
2. if it finishes there (EOS, stop token or string, `max_tokens == 1`, context full) it finishes
   normally; otherwise its output carries `handoff_ready=True` (finished False) and it is
   parked in HANDOFF: its blocks are kept and it is never scheduled again;
3. the caller copies its K/V out (`handoff_blocks` gives the block table and token count);
4. `release_handoff` (hand-off done or failed) frees its blocks with no further output;
   `abort` frees them too and reports one ABORT output on the next step.

Decode role, per request:
1. `reserve_handoff(request_id, num_tokens)` allocates fresh blocks for the prompt's K/V (None
   when blocks or batch room are short; nothing is held then);
2. the caller writes the K/V into those blocks (RecvScatter);
3. `add_prefilled(...)` turns the reservation into a RUNNING request whose first token is
   already generated; its next `step` decodes that token at position `len(prompt)`. Or
   `cancel_reservation` (also `abort`) frees the blocks when the hand-off failed.

Who frees what: the engine frees parked requests' blocks in `release_handoff` / `abort`, and
reservations' blocks in `cancel_reservation` / `abort`; once adopted, a handed-off request is
freed like any other (finish, abort, preemption). `leak_check` counts parked requests and
reservations as legitimate holders.

Prefix caching on decode: `add_prefilled` registers the hashes of the received full prompt
blocks (their K/V are in the cache by contract), so later requests on this instance can hit
them. Reservations never reuse cached blocks: the prompt's K/V always travels whole.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from pd_serve.engine.block_manager import BlockManager
from pd_serve.engine.output_text import OutputText
from pd_serve.engine.outputs import FinishReason, RequestOutput
from pd_serve.engine.request import Request, RequestStatus
from pd_serve.engine.sampling_params import SamplingParams
from pd_serve.engine.scheduler import Scheduler
from pd_serve.models.tokenizer import Tokenizer


@dataclass
class Reservation:
    """Blocks a decode engine holds for one incoming hand-off."""

    request_id: str
    num_tokens: int
    block_table: list[int]  # the block manager's own list (grows in place once adopted)


class HandoffMixin:
    """Hand-off methods of LLMEngine; the attributes below are set by LLMEngine.__init__."""

    block_manager: BlockManager
    scheduler: Scheduler
    max_model_len: int
    _tokenizer: Tokenizer
    _vocab_size: int
    _requests: dict[str, Request]
    _aborted: list[Request]
    _parked: dict[str, Request]
    _reserved: dict[str, Reservation]

    def _output(self, req: Request, new_ids: list[int], delta: str) -> RequestOutput:
        raise NotImplementedError

    def _validate_prompt(self, prompt_token_ids: list[int]) -> list[int]:
        raise NotImplementedError

    def _id_in_use(self, request_id: str) -> bool:
        return (request_id in self._requests or request_id in self._parked
                or request_id in self._reserved)

    # ----- prefill role ----------------------------------------------------------------------

    def _park(self, req: Request, token: int) -> RequestOutput:
        """Called by `_append` for a prefill-only request that needs more tokens."""
        self.scheduler.park(req)
        del self._requests[req.request_id]
        self._parked[req.request_id] = req
        out = self._output(req, [token], req.text.take_delta(False))
        out.handoff_ready = True
        return out

    def handoff_blocks(self, request_id: str) -> tuple[list[int], int]:
        """(block table, number of tokens whose K/V to hand off) of a parked request: the
        prompt's tokens (the first generated token has no K/V yet). KeyError if not parked."""
        req = self._parked.get(request_id)
        if req is None:
            raise KeyError(f"request {request_id!r} is not parked for a hand-off")
        n = req.num_prompt_tokens
        return list(req.block_table[:self.block_manager.blocks_for(n)]), n

    def release_handoff(self, request_id: str) -> None:
        """Frees a parked request's blocks (hand-off done or failed); no output follows.
        Unknown ids are ignored (it may have been aborted)."""
        req = self._parked.pop(request_id, None)
        if req is not None:
            self._free_parked(req, None)

    def _free_parked(self, req: Request, reason: FinishReason | None) -> None:
        self.block_manager.free(req.request_id)
        req.block_table = []
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason

    def _abort_handoff(self, request_id: str) -> bool:
        """`abort` for parked requests (ABORT output next step) and reservations (freed
        silently); False if `request_id` is neither."""
        req = self._parked.pop(request_id, None)
        if req is not None:
            self._free_parked(req, FinishReason.ABORT)
            self._aborted.append(req)
            return True
        if request_id in self._reserved:
            self.cancel_reservation(request_id)
            return True
        return False

    # ----- decode role -----------------------------------------------------------------------

    def reserve_handoff(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Allocates blocks for `num_tokens` tokens of incoming K/V; returns a copy of the block
        table, or None (nothing held) when free blocks or batch room (`max_num_seqs` counting
        running, waiting and reserved requests) are short. ValueError for a used id or a
        token count outside [1, max_model_len)."""
        if self._id_in_use(request_id):
            raise ValueError(f"request_id {request_id!r} is already in use")
        if not isinstance(num_tokens, int) or not 1 <= num_tokens < self.max_model_len:
            raise ValueError(f"num_tokens must be an integer in [1, {self.max_model_len}), "
                             f"got {num_tokens!r}")
        sched, bm = self.scheduler, self.block_manager
        seqs = len(sched.running) + len(sched.waiting) + len(self._reserved)
        if seqs >= sched.config.max_num_seqs or not bm.can_allocate(bm.blocks_for(num_tokens)):
            return None
        bm.allocate(request_id, [])  # an empty table: no prefix lookup, no tokens yet
        ok = bm.append_slots(request_id, num_tokens)
        assert ok, "free blocks were checked above"
        table = bm.table(request_id)
        self._reserved[request_id] = Reservation(request_id, num_tokens, table)
        return list(table)

    def cancel_reservation(self, request_id: str) -> None:
        """Frees a reservation's blocks (hand-off failed); unknown ids are ignored."""
        if self._reserved.pop(request_id, None) is not None:
            self.block_manager.free(request_id)

    def add_prefilled(self, request_id: str, prompt_token_ids: list[int], first_token_id: int,
                      params: SamplingParams, reservation: list[int]) -> None:
        """Adopts a handed-off request whose prompt K/V are now in `reservation`'s blocks.

        `reservation` is the table `reserve_handoff` returned. The request continues exactly as
        in aggregated mode: `first_token_id` counts as generated (stop rules, `max_tokens`,
        text), its text was already streamed by the prefill instance, and the next `step`
        decodes it. ValueError (the reservation stays; cancel it) on a mismatch.
        """
        res = self._reserved.get(request_id)
        if res is None:
            raise ValueError(f"request {request_id!r} has no hand-off reservation")
        if list(reservation) != res.block_table:
            raise ValueError(f"reservation of {request_id!r} is not the reserved block table")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        prompt = self._validate_prompt(prompt_token_ids)
        if len(prompt) != res.num_tokens:
            raise ValueError(f"prompt has {len(prompt)} tokens, the reservation "
                             f"{res.num_tokens}")
        if not isinstance(first_token_id, (int, np.integer)) or not (
                0 <= first_token_id < self._vocab_size):
            raise ValueError(f"first_token_id must be an integer in [0, {self._vocab_size})")
        if params.max_tokens <= 1 or len(prompt) + 1 >= self.max_model_len:
            raise ValueError(f"request {request_id!r} has nothing left to decode "
                             f"(max_tokens {params.max_tokens}, max_model_len "
                             f"{self.max_model_len})")
        req = self._prefilled_request(request_id, prompt, int(first_token_id), params)
        self.scheduler.check_fits(req)
        del self._reserved[request_id]
        req.block_table = res.block_table
        req.num_computed_tokens = req.prefill_len = len(prompt)
        # The received K/V are in the cache: register the full blocks for prefix reuse.
        self.block_manager.mark_computed(request_id, req.all_token_ids, len(prompt))
        self.scheduler.adopt(req)
        self._requests[request_id] = req

    def _prefilled_request(self, request_id: str, prompt: list[int], first: int,
                           params: SamplingParams) -> Request:
        text = OutputText(self._tokenizer, params.stop, params.include_stop_str_in_output)
        text.push([first])
        text.take_delta(False)  # what the prefill instance already streamed
        generator = np.random.default_rng(params.seed) if params.seed is not None else None
        if generator is not None and not params.greedy:
            generator.random()  # the prefill instance drew the first token's number
        req = Request(request_id=request_id, prompt_token_ids=prompt, params=params,
                      arrival_time=time.monotonic(), text=text, generator=generator)
        req.output_token_ids.append(first)
        return req

    def _handoff_holders(self) -> set[str]:
        return set(self._parked) | set(self._reserved)
