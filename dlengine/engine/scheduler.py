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
2. waiting requests, in the order the policy gives (first come first served by default), if
   nothing was preempted this step. Their cached prefix (prefix caching) is counted as computed
   at admission. Admission stops at a request whose next uncached full block is one this step
   computes (another request's copy of the same prefix): next step that block is a cache hit, so
   a prefix shared by requests arriving together is computed once (SGLang's in-batch prefix
   caching makes the same trade). A request whose KV comes from elsewhere (the KV connector says
   how many tokens) gets its blocks and waits in WAITING_FOR_REMOTE_KV until the connector
   reports it ready; then it joins the running set with those tokens computed.

Two seams: the policy (`SchedulerPolicy`: admission order and preemption victim) and the KV
connector (dlengine.engine.seams.KVConnector), both given at construction. Speculative drafts
(`request.spec_token_ids`, set by the core before `schedule()`) are scheduled with their
request's decode as look-ahead tokens, and their slots allocated with it.

Look-ahead slots for the speculator's own work (`num_lookahead_tokens`, from a speculator that
declares it: the MTP proposer's chained drafts write KV up to k - 1 positions past what the step
verifies) are reserved last, after every running and admitted request got the blocks its tokens
need, from blocks still free, oldest request first, and never in a step that preempted. A request
that cannot get them keeps its step and proposes fewer drafts next time: look-ahead never
preempts or holds back another request's tokens. The core returns them after the step
(`release_lookahead`), with the slots of rejected drafts.

The scheduler never touches tensors; the runner turns its output into a batch.
"""

from __future__ import annotations

from collections import deque
from itertools import islice
from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence

from dlengine.cache.block_manager import BlockManager
from dlengine.config import ConfigError, SchedulerConfig
from dlengine.engine.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens fed this step, from request.num_computed_tokens on (drafts included)
    sample: bool  # True when this step reaches the end of the request's known tokens
    num_spec_tokens: int = 0  # draft tokens among num_new_tokens (verified by this step)
    num_lookahead_tokens: int = 0  # slots reserved past num_new_tokens for the speculator (not fed)

    @property
    def is_prefill(self) -> bool:
        return self.num_new_tokens - self.num_spec_tokens > 1 or not self.sample


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    failed: list[tuple[Request, str]] = field(default_factory=list)  # remote KV that could not arrive
    num_cached_tokens: int = 0  # prefix-cache hits of the requests admitted this step

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class SchedulerPolicy(Protocol):
    """Which waiting request to admit first and which running request to preempt when blocks
    run out. Pass an object with these two methods to `EngineBuilder.scheduler(policy=...)`."""

    name: str

    def admission_order(self, waiting: Sequence[Request]) -> Iterable[Request]:
        """The waiting requests in the order admission should try them. Admission stops at the
        first one that does not fit (so a large request is not starved by smaller ones)."""
        ...

    def preemption_victim(self, running: Sequence[Request]) -> Request:
        """The running request to preempt (free its blocks, recompute it later)."""
        ...


class FCFSPolicy:
    """First come, first served; the newest running request is preempted first (vLLM's default)."""

    name = "fcfs"

    def admission_order(self, waiting: Sequence[Request]) -> Iterable[Request]:
        return waiting

    def preemption_victim(self, running: Sequence[Request]) -> Request:
        return running[-1]


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, policy: SchedulerPolicy | None = None,
                 connector=None, num_lookahead_tokens: int = 0, max_model_len: int | None = None) -> None:
        """num_lookahead_tokens: slots a speculator writes past the step's verified positions for a
        request that samples (Speculator.num_lookahead_tokens; 0 without one). max_model_len bounds
        them (no request grows past it)."""
        if not isinstance(num_lookahead_tokens, int) or isinstance(num_lookahead_tokens, bool) \
                or num_lookahead_tokens < 0:
            raise ConfigError(f"a speculator's num_lookahead_tokens must be a non-negative integer, "
                              f"got {num_lookahead_tokens!r}")
        self.config = config
        self.num_lookahead_tokens = num_lookahead_tokens
        self.max_model_len = max_model_len
        self.block_manager = block_manager
        self.policy = policy or FCFSPolicy()
        self.connector = connector
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # request id -> (request, tokens its connector is loading) while their KV arrives
        self.waiting_for_kv: dict[str, tuple[Request, int]] = {}
        self.num_preemptions = 0  # since construction (EngineStats counts since its last reset)

    # ------------------------------------------------------------------ bookkeeping
    def add_request(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.waiting_for_kv)

    @property
    def num_active(self) -> int:
        """Requests holding blocks: running, or waiting for their KV to arrive."""
        return len(self.running) + len(self.waiting_for_kv)

    def finish_request(self, request: Request) -> None:
        """Remove a request (finished or aborted) and free its blocks. Safe at any point."""
        if request in self.running:
            self.running.remove(request)
        elif self.waiting_for_kv.pop(request.request_id, None) is None and request in self.waiting:
            self.waiting.remove(request)
        self.block_manager.free(request)
        request.status = RequestStatus.FINISHED

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.status = RequestStatus.PREEMPTED
        request.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    # ------------------------------------------------------------------ remote KV
    def _poll_connector(self, out: SchedulerOutput) -> None:
        """Move requests whose KV has arrived into the running set; report those that failed."""
        result = self.connector.poll()
        for req in result.ready:
            entry = self.waiting_for_kv.pop(req.request_id, None)
            if entry is None:
                continue  # finished (aborted) meanwhile
            _, num_tokens = entry
            req.num_computed_tokens = num_tokens
            req.metrics.num_cached_tokens = num_tokens
            self.block_manager.cache_full_blocks(req)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
        for req, error in result.failed:
            out.failed.append((req, error))
        for req in result.recompute:
            # compute the prompt here instead, like a request preempted by recompute (its
            # already-known tokens are kept and re-fed as prompt)
            self.waiting_for_kv.pop(req.request_id, None)
            if req in self.waiting:
                self.waiting.remove(req)
            self.block_manager.free(req)
            req.num_computed_tokens = 0
            req.metrics.num_cached_tokens = 0
            self.add_request(req)

    def _admit_remote(self, req: Request, num_external: int) -> bool:
        """Allocate blocks for KV that arrives through the connector; False if it must wait."""
        if self.num_active >= self.config.max_num_seqs:
            return False
        if not self.block_manager.allocate_slots(req, num_external):
            return False
        if not self.connector.on_allocated(req, num_external):
            self.block_manager.free(req)
            return False
        req.status = RequestStatus.WAITING_FOR_REMOTE_KV
        self.waiting_for_kv[req.request_id] = (req, num_external)
        return True

    # ------------------------------------------------------------------ the step
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        if self.connector is not None:
            self._poll_connector(out)
        budget = self.config.max_num_batched_tokens
        chunked = self.config.chunked_prefill
        block_size = self.block_manager.block_size

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            computed = req.num_computed_tokens
            remaining = len(req.all_token_ids) - computed
            if remaining == 1 and not req.spec_token_ids and computed < len(req.block_ids) * block_size:
                # the common decode step: one token whose slot lies in a block the request holds
                # (entry j of its block table covers positions [j * block_size, (j + 1) * block_size)),
                # so there is nothing to allocate and nobody to preempt; skipping allocate_slots
                # saves a few microseconds per request on all but one step in block_size
                out.scheduled.append(ScheduledRequest(req, 1, not req.score_only))
                budget -= 1
                i += 1
                continue
            if req.spec_token_ids:
                # drafts ride along with the decode only when all of them fit
                if remaining == 1 and 1 + len(req.spec_token_ids) <= budget:
                    remaining += len(req.spec_token_ids)
                else:
                    req.spec_token_ids = []
            n = min(remaining, budget, req.max_chunk_tokens or budget)
            if not chunked and n < remaining:
                break  # without chunked prefill a prompt runs whole or waits for the next step
            while not self.block_manager.allocate_slots(req, n):
                victim = self.policy.preemption_victim(self.running)
                index = self.running.index(victim)
                del self.running[index]
                self._preempt(victim)
                out.preempted.append(victim)
                if index < i:  # scheduled earlier this step: its tokens go back to the budget
                    k = next(k for k, s in enumerate(out.scheduled) if s.request is victim)
                    budget += out.scheduled.pop(k).num_new_tokens
                    i -= 1
                if victim is req:
                    break
            if req.status == RequestStatus.PREEMPTED:
                continue  # `req` itself was the victim: whatever now sits at index i runs next
            num_spec = len(req.spec_token_ids)
            sample = req.num_computed_tokens + n == req.num_tokens + num_spec and not req.score_only
            out.scheduled.append(ScheduledRequest(req, n, sample, num_spec))
            budget -= n
            i += 1

        if out.preempted:
            return out  # blocks are short: admitting new work (or reserving look-ahead) would only thrash

        caching = self.block_manager.enable_prefix_caching and bool(self.waiting)
        filling = self._blocks_filled(out.scheduled) if caching else set()
        # at most (free sequence slots) admissions, then one request that stops the loop: snapshot
        # only that much of the order, not the whole waiting queue, since admission removes from it
        room = max(0, self.config.max_num_seqs - self.num_active) + 1
        for req in list(islice(self.policy.admission_order(self.waiting), room)):
            if budget <= 0 or self.num_active >= self.config.max_num_seqs:
                break
            num_external = self.connector.num_external_tokens(req) if self.connector is not None else 0
            if num_external > 0:
                if not self._admit_remote(req, num_external):
                    break
                self.waiting.remove(req)
                continue
            if req.score_only:
                cached_blocks, num_cached = [], 0
            else:
                cached_blocks, num_cached = self.block_manager.find_cached_prefix(req)
                if self._next_block_is_filling(req, len(cached_blocks), filling):
                    break  # held one step; the request computing that block is scheduled, so no deadlock
            remaining = req.num_tokens - num_cached
            n = min(remaining, budget, req.max_chunk_tokens or budget)
            if not chunked and n < remaining:
                break
            if not self.block_manager.allocate_slots(req, n, cached_blocks):
                break  # do not let later requests overtake
            self.waiting.remove(req)
            req.num_computed_tokens = num_cached
            req.metrics.num_cached_tokens = num_cached
            out.num_cached_tokens += num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, n, num_cached + n == req.num_tokens and not req.score_only))
            if caching:
                filling.update(self._blocks_filled(out.scheduled[-1:]))
            budget -= n
        if self.num_lookahead_tokens:
            self._reserve_lookahead(out.scheduled)
        return out

    # ------------------------------------------------------------------ speculative look-ahead
    def _reserve_lookahead(self, scheduled: list[ScheduledRequest]) -> None:
        """Best effort, from blocks left free once the step's own tokens have theirs: per sampling
        request that may draft next step, the slots its speculator writes past this step's
        positions. All-or-nothing per block, so a short pool gives a request as many of them as
        fit (fewer drafts next step) instead of preempting anyone."""
        for s in scheduled:
            want = self._lookahead_wanted(s)
            while want > 0 and not self.block_manager.allocate_slots(s.request, s.num_new_tokens + want):
                want -= 1
            s.num_lookahead_tokens = want

    def _lookahead_wanted(self, s: ScheduledRequest) -> int:
        """Look-ahead slots past this step's positions worth reserving: none unless the request
        samples and may draft next step; capped where the core would cut the next step's drafts
        anyway (max_tokens, max_model_len). Draft 1 comes from the step's last kept position and
        drafts 2..j each write KV one position further, at N' - 1 .. N' + j - 3 (N': the request's
        tokens after this step). The core keeps at most min(max_tokens - outputs, max_model_len -
        N') - 1 drafts, so the slots worth having end below min(num_tokens + max_tokens -
        num_output_tokens, max_model_len) - 2, whatever this step accepts."""
        req = s.request
        if not s.sample or not may_draft_next_step(req):
            return 0
        end = req.num_computed_tokens + s.num_new_tokens  # slots this step writes: positions [0, end)
        limit = req.num_tokens + req.params.max_tokens - req.num_output_tokens - 3  # slots [0, limit)
        if self.max_model_len is not None:
            limit = min(limit, self.max_model_len - 3)
        return max(0, min(self.num_lookahead_tokens, limit - end))

    def release_lookahead(self, scheduled: Sequence[ScheduledRequest]) -> None:
        """After a step's tokens are applied (and the speculator's chained drafts ran): give back
        the slots of rejected drafts and of the look-ahead, i.e. every block past the request's
        computed positions. Between steps a request then holds what plain decoding would, so
        look-ahead blocks never make the next schedule preempt anyone. A custom block manager
        without `free_blocks_after` keeps them until the request ends (still counted right)."""
        free_after = getattr(self.block_manager, "free_blocks_after", None)
        if free_after is None:
            return
        for s in scheduled:
            req = s.request
            if (s.num_spec_tokens or s.num_lookahead_tokens) and not req.is_finished \
                    and req.status == RequestStatus.RUNNING:
                free_after(req, req.num_computed_tokens)

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

    def update_after_step(self, out: SchedulerOutput) -> int:
        """Advance progress for what ran and publish newly full blocks in the prefix cache.
        Steps that verified drafts are advanced by the core once it knows how many were accepted.
        Returns how many prompt tokens the step computed."""
        block_size = self.block_manager.block_size
        cache_full_blocks = self.block_manager.cache_full_blocks
        prompt_tokens = 0
        for s in out.scheduled:
            req = s.request
            status = req.status
            if status is RequestStatus.FINISHED or status is RequestStatus.PREEMPTED or s.num_spec_tokens:
                continue  # finished (or preempted) while this step ran: its work is discarded
            before = req.num_computed_tokens
            after = before + s.num_new_tokens
            num_prompt = len(req.prompt_token_ids)
            if before < num_prompt:
                computed_prompt = min(s.num_new_tokens, num_prompt - before)
                req.metrics.num_computed_prompt_tokens += computed_prompt
                prompt_tokens += computed_prompt
            req.num_computed_tokens = after
            # only a block that became full in this step is new to the prefix cache: the blocks
            # full before it were published when their last token was computed (every path that
            # advances num_computed_tokens publishes right after), so a decode step within a
            # block skips the call
            if after // block_size != before // block_size:
                cache_full_blocks(req)
        return prompt_tokens


def may_draft_next_step(req: Request) -> bool:
    """Whether a request that samples now may get drafts at its next step: its sampling must not
    look at its own history (penalties, min_tokens) nor report logprobs; the core proposes only
    for such requests (EngineCore._propose_drafts), once their last token is the only uncomputed one."""
    p = req.params
    return not (req.score_only or p.logprobs is not None or p.repetition_penalty != 1.0
                or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
                or req.num_output_tokens + 1 < p.min_tokens)
