"""Continuous batching with a token budget, chunked prefill and preemption by recompute.

Every step the scheduler hands each chosen request a number of new tokens to run, starting at
its `num_computed_tokens`. Prefill and decode are the same thing seen this way: a decode is a
request with one uncomputed token. So one step can mix decodes, prompt chunks and whole prompts,
bounded by `max_num_batched_tokens` and `max_num_seqs`.

Order of work in a step:
1. running requests, oldest first (decodes and unfinished prompt chunks). When the block pool
   cannot hold a request's new tokens, the newest running request is preempted: its blocks are
   freed and it goes to the front of the waiting queue to be recomputed later (its already
   generated tokens are kept and re-fed as prompt). Preempted requests resume before new ones.
2. waiting requests, first come first served, if nothing was preempted this step. Their cached
   prefix (prefix caching) is counted as computed at admission. Admission stops at a request
   whose next uncached full block is one this step computes (another request's copy of the same
   prefix): next step that block is a cache hit, so a prefix shared by requests arriving
   together is computed once (SGLang's in-batch prefix caching makes the same trade).

The scheduler never touches tensors; the runner turns its output into a batch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from dlengine.cache.block_manager import BlockManager
from dlengine.config import SchedulerConfig
from dlengine.engine.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens fed this step, from request.num_computed_tokens on
    sample: bool  # True when this step reaches the end of the request's known tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    num_cached_tokens: int = 0  # prefix-cache hits of the requests admitted this step

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    # ------------------------------------------------------------------ bookkeeping
    def add_request(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def add_running(self, request: Request) -> None:
        """Admit a request whose computed tokens' KV is already in its blocks (a KV migration
        landed): it joins the running set and decodes from its next step on."""
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish_request(self, request: Request) -> None:
        """Remove a request (finished or aborted) and free its blocks. Safe at any point."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.block_manager.free(request)
        request.status = RequestStatus.FINISHED

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    # ------------------------------------------------------------------ the step
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        chunked = self.config.chunked_prefill

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            remaining = req.num_tokens - req.num_computed_tokens
            n = min(remaining, budget)
            if not chunked and n < remaining:
                break  # without chunked prefill a prompt runs whole or waits for the next step
            while not self.block_manager.allocate_slots(req, n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status == RequestStatus.PREEMPTED:
                break  # it was the last one: nothing after it in `running`
            out.scheduled.append(ScheduledRequest(req, n, req.num_computed_tokens + n == req.num_tokens))
            budget -= n
            i += 1

        if out.preempted:
            return out  # blocks are short: admitting new work now would only thrash

        caching = self.block_manager.enable_prefix_caching and bool(self.waiting)
        filling = self._blocks_filled(out.scheduled) if caching else set()
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            cached_blocks, num_cached = self.block_manager.find_cached_prefix(req)
            if self._next_block_is_filling(req, len(cached_blocks), filling):
                break  # held one step; the request computing that block is scheduled, so no deadlock
            remaining = req.num_tokens - num_cached
            n = min(remaining, budget)
            if not chunked and n < remaining:
                break
            if not self.block_manager.allocate_slots(req, n, cached_blocks):
                break  # first come first served: do not let later requests overtake
            self.waiting.popleft()
            req.num_computed_tokens = num_cached
            req.metrics.num_cached_tokens = num_cached
            out.num_cached_tokens += num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, n, num_cached + n == req.num_tokens))
            if caching:
                filling.update(self._blocks_filled(out.scheduled[-1:]))
            budget -= n
        return out

    def _blocks_filled(self, scheduled: list[ScheduledRequest]) -> set[bytes]:
        """Hashes of the full blocks these scheduled requests complete in this step."""
        bs = self.block_manager.block_size
        done: set[bytes] = set()
        for s in scheduled:
            c = s.request.num_computed_tokens
            done.update(s.request.block_hashes[c // bs:(c + s.num_new_tokens) // bs])
        return done

    def _next_block_is_filling(self, req: Request, num_hit_blocks: int, filling: set[bytes]) -> bool:
        """Whether the block after `req`'s cached prefix could be a hit next step because a
        request scheduled in this step completes the same content (its last token is never a hit)."""
        if not filling or num_hit_blocks >= (req.num_tokens - 1) // self.block_manager.block_size:
            return False
        return num_hit_blocks < len(req.block_hashes) and req.block_hashes[num_hit_blocks] in filling

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advance progress for what ran and publish newly full blocks in the prefix cache."""
        for s in out.scheduled:
            req = s.request
            if req.is_finished or req.status == RequestStatus.PREEMPTED:
                continue  # finished (or preempted) while this step ran: its work is discarded
            if req.num_computed_tokens < req.num_prompt_tokens:
                req.metrics.num_computed_prompt_tokens += min(
                    s.num_new_tokens, req.num_prompt_tokens - req.num_computed_tokens
                )
            req.num_computed_tokens += s.num_new_tokens
            self.block_manager.cache_full_blocks(req)
