"""EngineCore: token ids in, token ids out.

The core owns the loop of one engine: Scheduler (what runs) -> BlockManager (where its KV
lives) -> ModelRunner (tensors, forward, sampling) -> back here (append tokens, token-level
stops, outputs). It knows no tokenizer and no text: the front (`dlengine.engine.engine.Engine`)
turns prompts into `Request`s, hands them to `add`, and turns the `CoreOutput`s of `step` into
user-facing outputs (detokenising, stop strings). Stop strings are the front's: when one
matches, the front calls `abort`.

Variations plug in at declared seams, each called at a fixed point of `step`:
- the KV connector (`dlengine.engine.seams.KVConnector`): asked by the scheduler whether a
  waiting request's KV comes from elsewhere, told when blocks are allocated, polled every step,
  told when a request finishes (a prefill engine then holds its blocks for a decode engine);
- the speculator (`dlengine.engine.seams.Speculator`): proposes draft tokens for decoding
  requests before scheduling; the runner verifies them in the same forward as the step;
  rejected drafts are rolled back here (the KV by moving num_computed_tokens past the accepted
  ones only; a recurrent state through the state rollback, `dlengine.engine.seams.StateRollback`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from dlengine.engine.request import Request, RequestMetrics, RequestStatus
from dlengine.sampling_params import InvalidRequestError


@dataclass(slots=True)  # one per running request and step: slots make them cheaper to build
class CoreOutput:
    """What one step says about one request: the tokens it gained and whether it ended."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[dict[int, float]] | None  # one row per new token, when the request asked
    finished: bool
    finish_reason: str | None = None  # "stop", "length", "abort", "error", "kv_transfer", "scored"
    stop_reason: int | str | None = None
    error: str | None = None
    kv_transfer_params: dict | None = None  # prefill role: what a decode engine needs to continue
    metrics: RequestMetrics | None = None
    prompt_logits: torch.Tensor | None = None  # scoring requests: [prompt_len, vocab] float32


@dataclass
class StepRecord:
    num_seqs: int
    num_tokens: int
    num_prefill_tokens: int
    num_decodes: int
    duration_s: float


def step_record(sched, num_tokens: int, duration_s: float) -> StepRecord:
    """The record of a step that ran `sched` (a SchedulerOutput) of `num_tokens` tokens: one pass
    over its requests."""
    num_prefill_tokens = num_decodes = 0
    for s in sched.scheduled:
        if s.is_prefill:
            num_prefill_tokens += s.num_new_tokens
        else:
            num_decodes += 1
    return StepRecord(num_seqs=len(sched.scheduled), num_tokens=num_tokens,
                      num_prefill_tokens=num_prefill_tokens, num_decodes=num_decodes, duration_s=duration_s)


@dataclass
class EngineStats:
    """Counters since the engine was built (or `reset()`); `steps` keeps one record per step."""

    num_steps: int = 0
    num_computed_tokens: int = 0  # tokens run through the model (prompt chunks + decodes + recompute)
    num_prompt_tokens_computed: int = 0  # prompt tokens among those
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_generated_tokens: int = 0
    num_preemptions: int = 0
    num_finished: int = 0
    # speculative decoding: drafts proposed / accepted, verify rows (one per request and step)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_spec_verifications: int = 0
    # benchmarking: drafts were kept with this probability, not by matching the target
    # (speculative(forced_acceptance=p)); the tokens generated are then not the model's
    forced_acceptance: float | None = None
    steps: list[StepRecord] = field(default_factory=list)

    def reset(self) -> None:
        self.__init__(forced_acceptance=self.forced_acceptance)  # a setting of the engine, not a counter

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted drafts / proposed drafts (None before any draft). Under forced acceptance p
        with k drafts a step this is about (p + p^2 + ... + p^k) / k, not p: a draft is only
        tried when every draft before it was kept."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens gained per verified request-step: accepted drafts + the one the target adds."""
        if not self.num_spec_verifications:
            return None
        return (self.num_accepted_tokens + self.num_spec_verifications) / self.num_spec_verifications


class EngineCore:
    """One engine's requests, scheduler, cache and runner. Built by `EngineBuilder`; driven by a
    front through `add` / `abort` / `step` / `has_unfinished`."""

    def __init__(self, config, model, kv_cache, block_manager, scheduler, runner, *, connector=None,
                 speculator=None, memory_plan=None, state_rollback=None) -> None:
        self.config = config
        self.model = model
        self.kv_cache = kv_cache
        self.block_manager = block_manager
        self.scheduler = scheduler
        self.runner = runner
        self.connector = connector
        self.speculator = speculator
        self.memory_plan = memory_plan
        # a model with recurrent state that speculates: rejected drafts are undone in the state
        # (engine/seams.py StateRollback; the runner laid the step out with the same object)
        self.state_rollback = state_rollback
        self.stats = EngineStats(forced_acceptance=config.speculative_forced_acceptance)
        self.requests: dict[str, Request] = {}
        # async scheduling overlaps step N+1's scheduling with step N's device work; speculative
        # steps need their verified tokens before the next proposal, so they run synchronously
        self.async_scheduling = config.async_scheduling and speculator is None
        self._inflight = None  # the launched step whose tokens are not applied yet (async scheduling)

    # ------------------------------------------------------------------ requests
    def add(self, request: Request) -> None:
        """Queue a validated, tokenised request (the front makes it)."""
        if request.request_id in self.requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
        if self.connector is not None:
            self.connector.on_add(request)
        self.requests[request.request_id] = request
        self.scheduler.add_request(request)

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its blocks; no output is made for it (the front
        reports it). Unknown ids go to the connector (a prefill engine's handed-off request holds
        blocks after it finished here). Returns False for ids nobody knows."""
        req = self.requests.get(request_id)
        if req is None:
            return self.connector.abort(request_id) if self.connector is not None else False
        self._finish(req, "abort")
        return True

    def has_unfinished(self) -> bool:
        if self.scheduler.has_unfinished():
            return True
        # an in-flight step whose requests have all finished holds only discarded work
        return self._inflight is not None and any(not r.is_finished for r in self._inflight.sampled)

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[CoreOutput]:
        """Schedule, run the model once, and return an output for every request that gained a
        token or finished.

        With async scheduling the step launches its forward pass, then applies the previous
        step's tokens while the device works, so the outputs returned are those of the previous
        step; tokens are identical either way. A request that stops is then computed one step too
        far, and that extra token is dropped.
        """
        outputs: list[CoreOutput] = []
        t0 = time.perf_counter()
        if self.speculator is not None:
            self._propose_drafts()
        sched = self.scheduler.schedule()
        for req, error in sched.failed:  # the connector could not deliver this request's KV
            req.error = error
            self._finish(req, "error")
            outputs.append(self._output(req, []))
        self.stats.num_preemptions += len(sched.preempted)
        if not sched.is_empty and self._inflight is not None and not self._can_overlap(sched):
            # this step's sampling needs every token known (penalties, logprobs, min_tokens)
            outputs += self._resolve(self._inflight)
            self._inflight = None
            sched.scheduled = [s for s in sched.scheduled if not s.request.is_finished]
        if sched.is_empty:
            if self._inflight is not None:
                outputs += self._resolve(self._inflight)
                self._inflight = None
            return outputs
        now = time.perf_counter()
        for s in sched.scheduled:
            metrics = s.request.metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now
        handle = self.runner.execute(sched)
        if self._inflight is not None:  # overlaps with the device running this step
            outputs += self._resolve(self._inflight)
            self._inflight = None
        prompt_tokens = self.scheduler.update_after_step(sched)
        outputs += self._collect_scores(handle)
        if self.async_scheduling and handle.sampled:
            for row, req in enumerate(handle.sampled):
                if req.status is not RequestStatus.FINISHED:
                    req.add_placeholder(row)
            self._inflight = handle
        else:
            if handle.hidden_states is not None:
                # a speculator drafting from the target's hidden states (MTP) runs its own layer on
                # the step's kept positions; before _resolve, while every request still holds its
                # blocks (a finishing prefill hands them to its connector there)
                gained = dict(zip((r.request_id for r in handle.sampled), handle.accepted_tokens()))
                self.speculator.observe_hidden_states(handle.hidden_states, gained)
            outputs += self._resolve(handle)
            if self.speculator is not None:
                # rollback: rejected drafts' and look-ahead slots go back to the pool (after the
                # speculator's chain above wrote its scratch KV there)
                self.scheduler.release_lookahead(sched.scheduled)

        self.stats.num_steps += 1
        num_tokens = sched.num_batched_tokens
        self.stats.num_computed_tokens += num_tokens
        self.stats.num_prompt_tokens_computed += prompt_tokens
        self.stats.num_cached_tokens += sched.num_cached_tokens
        self.stats.steps.append(step_record(sched, num_tokens, time.perf_counter() - t0))
        return outputs

    def _can_overlap(self, sched) -> bool:
        """Whether the step can be sampled before the in-flight step's tokens are known: only
        when no sampling row looks at generated tokens (penalties, min_tokens) or wants logprobs."""
        for s in sched.scheduled:  # every step over the whole batch: plain attribute reads, no properties
            req = s.request
            p = req.params
            if (p.logprobs is not None or p.repetition_penalty != 1.0 or p.presence_penalty != 0.0
                    or p.frequency_penalty != 0.0 or len(req.output_token_ids) < p.min_tokens):
                return False
        return True

    # ------------------------------------------------------------------ speculative decoding
    def _propose_drafts(self) -> None:
        """Ask the speculator for drafts for every running request that decodes next step and
        whose sampling does not look at its own history (penalties, min_tokens, logprobs: those
        decode one token a step)."""
        max_len = self.config.max_model_len
        ready = []
        for req in self.scheduler.running:
            req.spec_token_ids = []
            p = req.params
            if (req.num_computed_tokens != req.num_tokens - 1 or p.logprobs is not None or req.score_only
                    or p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
                    or req.num_output_tokens < p.min_tokens):
                continue
            ready.append(req)
        if not ready:
            return
        drafts = self.speculator.propose(ready)
        for req, draft in zip(ready, drafts):
            # never draft past what the request may still produce: its last token is the one the
            # target adds after the accepted drafts
            room = min(req.params.max_tokens - req.num_output_tokens, max_len - req.num_tokens) - 1
            if self.state_rollback is not None:  # a state keeps snapshots for this many drafts
                room = min(room, self.state_rollback.max_drafts)
            req.spec_token_ids = [int(t) for t in draft[: max(0, room)]]

    # ------------------------------------------------------------------ applying tokens
    def _resolve(self, handle) -> list[CoreOutput]:
        """Apply a finished step's sampled tokens: append (or fill in the placeholder), roll back
        rejected drafts, check token-level stops, and make the outputs. Requests that ended
        meanwhile are skipped."""
        if not handle.sampled:
            return []
        rows = handle.accepted_tokens()  # per request: the tokens this step gained (>= 1)
        logprob_rows = handle.logprob_rows()
        now = time.perf_counter()
        max_model_len = self.config.max_model_len
        outputs = []
        num_generated = 0
        for i, (req, tokens) in enumerate(zip(handle.sampled, rows)):
            if req.status is RequestStatus.FINISHED:
                continue
            num_drafts = handle.num_drafts[i]
            if num_drafts:
                self._finish_verification(req, tokens, num_drafts)
            metrics = req.metrics
            if metrics.first_token_time is None:
                metrics.first_token_time = now
            p = req.params
            new: list[int] = []
            for tok in tokens:
                if req.pending_row is not None:
                    req.resolve_placeholder(tok)
                else:
                    req.append_token(tok)
                new.append(tok)
                # only a token that can end the request goes through the stop checks: one of its
                # stop ids, or the length limits reached (what _check_stop tests, min_tokens aside)
                if (tok in req.eos_token_ids or tok in p.stop_token_ids or len(req.output_token_ids) >= p.max_tokens
                        or len(req.all_token_ids) >= max_model_len):
                    self._check_stop(req, tok)
                    if req.status is RequestStatus.FINISHED:
                        break
            if num_drafts and req.status is not RequestStatus.FINISHED:
                self.block_manager.cache_full_blocks(req)
            num_generated += len(new)
            lp = [logprob_rows[i]] if logprob_rows is not None and logprob_rows[i] is not None else None
            outputs.append(self._output(req, new, lp))
        self.stats.num_generated_tokens += num_generated
        return outputs

    def _finish_verification(self, req: Request, tokens: list[int], num_drafts: int) -> None:
        """The step fed the request's last token and `num_drafts` drafts; `tokens` are the
        accepted drafts plus the target's own next token. Only the accepted positions' KV counts:
        the computed count moves past the last token and the accepted drafts, the rest of the
        step's slots are overwritten later; their blocks past the computed positions go back to
        the pool once the step is applied (Scheduler.release_lookahead)."""
        accepted = len(tokens) - 1
        if self.state_rollback is not None:  # the state saw every draft: back to the accepted ones
            self.state_rollback.rollback(req, num_drafts, accepted)
        req.num_computed_tokens += 1 + accepted
        req.spec_token_ids = []
        self.stats.num_draft_tokens += num_drafts
        self.stats.num_accepted_tokens += accepted
        self.stats.num_spec_verifications += 1
        if hasattr(self.speculator, "on_verified"):
            self.speculator.on_verified(req, num_drafts, accepted)

    def _collect_scores(self, handle) -> list[CoreOutput]:
        """Scoring requests: keep this step's logits; a request whose prompt is all computed is
        finished with its logits."""
        outputs = []
        for req, logits in handle.scores:
            req.prompt_logits.append(logits)
            if req.num_computed_tokens >= req.num_tokens and not req.is_finished:
                self._finish(req, "scored")
                out = self._output(req, [])
                out.prompt_logits = torch.cat(req.prompt_logits).cpu()
                req.prompt_logits = []
                outputs.append(out)
        return outputs

    def _check_stop(self, req: Request, token: int) -> None:
        """Token-level stops (the front checks stop strings)."""
        p = req.params
        can_stop = req.num_output_tokens >= p.min_tokens
        if can_stop and (token in req.eos_token_ids or token in p.stop_token_ids):
            return self._finish(req, "stop", token)
        if req.num_output_tokens >= p.max_tokens or req.num_tokens >= self.config.max_model_len:
            return self._finish(req, "length")

    def _finish(self, req: Request, reason: str, stop_reason=None) -> None:
        if self.connector is not None:  # prefill: pin the blocks and hand off; decode: abort mid-pull
            reason = self.connector.on_finish(req, reason)
        req.finish_reason, req.stop_reason = reason, stop_reason
        req.metrics.finished_time = time.perf_counter()
        self.scheduler.finish_request(req)
        self.stats.num_finished += 1
        self.requests.pop(req.request_id, None)

    def _output(self, req: Request, new_tokens: list[int], logprobs=None) -> CoreOutput:
        finished = req.is_finished
        # positional arguments, in CoreOutput's field order: this runs for every request at every
        # step, and a keyword call of the dataclass' __init__ costs about twice as much
        return CoreOutput(req.request_id, new_tokens, logprobs, finished, req.finish_reason, req.stop_reason,
                          req.error, req.kv_transfer_params if finished else None, req.metrics)

    # ------------------------------------------------------------------ the rest
    def describe(self) -> dict:
        c = self.config
        info = {
            "model_path": c.model.path,
            "architecture": c.model.architecture,
            "role": c.role,
            "device": str(c.device),
            "dtype": str(c.dtype).replace("torch.", ""),
            "attention_backend": self.runner.backend.name,
            "cuda_graphs": self.runner.graph_runner is not None,
            "async_scheduling": self.async_scheduling,
            "block_size": self.kv_cache.block_size,
            "num_kv_blocks": self.block_manager.num_blocks,
            "kv_cache_tokens": self.block_manager.num_blocks * self.kv_cache.block_size,
            "kv_cache_dtype": str(self.kv_cache.dtype).replace("torch.", ""),
            "kv_cache_gib": self.kv_cache.nbytes / 2**30,
            "max_model_len": c.max_model_len,
            "max_num_seqs": c.scheduler.max_num_seqs,
            "max_num_batched_tokens": c.scheduler.max_num_batched_tokens,
            "prefix_caching": c.cache.prefix_caching,
            "chunked_prefill": c.scheduler.chunked_prefill,
            "scheduler_policy": getattr(self.scheduler.policy, "name", type(self.scheduler.policy).__name__),
        }
        kernels = getattr(self.runner, "kernels", None)
        if kernels is not None and hasattr(kernels, "describe"):
            info["kernels"] = kernels.describe()
        if self.connector is not None:
            info["kv_transfer"] = self.connector.describe()
        if self.speculator is not None:
            info["speculative"] = {"method": getattr(self.speculator, "name", type(self.speculator).__name__),
                                   "num_tokens": getattr(self.speculator, "num_tokens", None)}
            if c.speculative_forced_acceptance is not None:
                # benchmarking only: say so wherever the engine is described
                info["speculative"]["forced_acceptance"] = c.speculative_forced_acceptance
                info["speculative"]["note"] = (f"forced acceptance {c.speculative_forced_acceptance:g}: drafts are "
                                               "kept at random, outputs are not the model's")
        if self.memory_plan is not None:
            info["memory_plan"] = self.memory_plan.describe(self.kv_cache.block_size)
        return info

    def close(self) -> None:
        """Abort what is running and release the KV cache, graphs and weights' device memory now
        (rather than when the garbage collector gets to it), so another engine can be built."""
        for rid in list(self.requests):
            self.abort(rid)
        if self.connector is not None:
            self.connector.close()
        self.runner.release()
        self.kv_cache.release()
        self.model = None
        import gc

        gc.collect()
        if self.config.device.type == "cuda":
            torch.cuda.empty_cache()


def scoring_request(request_id: str, token_ids: Sequence[int], chunk_size: int | None) -> Request:
    """A request that computes the logits of every position of `token_ids` and samples nothing
    (Engine.prompt_logits). It never takes prefix-cache hits: logits of cached positions were
    never stored, so every position is computed."""
    from dlengine.sampling_params import SamplingParams

    req = Request(request_id, list(token_ids), SamplingParams(max_tokens=1))
    req.score_only = True
    req.max_chunk_tokens = chunk_size
    return req
