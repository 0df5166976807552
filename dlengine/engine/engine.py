"""Engine: the loop that turns requests into tokens.

Data flows one way each step: Scheduler (what runs) -> BlockManager (where its KV lives) ->
ModelRunner (tensors, forward, sampling) -> Engine (append tokens, check stops, emit outputs).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence, Union

from dlengine.cache.block_manager import BlockManager
from dlengine.cache.kv_cache import KVCache
from dlengine.config import EngineConfig
from dlengine.engine.request import Request, RequestOutput
from dlengine.engine.runner import ModelRunner
from dlengine.engine.scheduler import Scheduler
from dlengine.sampling_params import InvalidRequestError, SamplingParams
from dlengine.tokenizer import IncrementalDetokenizer

Prompt = Union[str, Sequence[int]]


@dataclass
class StepRecord:
    num_seqs: int
    num_tokens: int
    num_prefill_tokens: int
    num_decodes: int
    duration_s: float


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
    steps: list[StepRecord] = field(default_factory=list)

    def reset(self) -> None:
        self.__init__()


def _is_token_list(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(isinstance(t, int) for t in prompt)


class Engine:
    """A built inference engine. Make one with `EngineBuilder`.

    >>> from dlengine import EngineBuilder, SamplingParams
    >>> engine = EngineBuilder("tiny-qwen3").cache(block_size=16).build()
    >>> [out] = engine.generate(["hello world"], SamplingParams(max_tokens=4, temperature=0.0))
    >>> len(out.token_ids), out.finish_reason
    (4, 'length')

    Drive it by hand with `add_request` and `step`; `stream` yields outputs as tokens arrive.
    """

    def __init__(self, config: EngineConfig, model, tokenizer, kv_cache: KVCache, block_manager: BlockManager,
                 scheduler: Scheduler, runner: ModelRunner) -> None:
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.kv_cache = kv_cache
        self.block_manager = block_manager
        self.scheduler = scheduler
        self.runner = runner
        self.stats = EngineStats()
        self._requests: dict[str, Request] = {}
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._pending_outputs: list[RequestOutput] = []  # aborted requests, reported by the next step()
        self._ids = itertools.count()
        self.memory_plan = None  # set by EngineBuilder: how the KV cache was sized
        self.async_scheduling = config.async_scheduling
        self._inflight = None  # the launched step whose tokens are not applied yet (async scheduling)
        # prefill/decode behaviour (dlengine.disagg.PrefillRole / DecodeRole); None for hybrid
        self.role = None

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Engine(model={c.model.architecture} @ {c.model.path}, role={c.role}, device={c.device}, "
            f"dtype={c.dtype}, {'' if c.quantization == 'none' else f'quantization={c.quantization}, '}"
            f"attention={self.runner.backend.name}, "
            f"cuda_graphs={self.runner.graph_runner is not None}, async_scheduling={self.async_scheduling}, "
            + (f"transfer={self.role.transfer.backend}/{self.role.transfer.transport}, " if self.role else "")
            + f"{self.kv_cache}, "
            f"max_model_len={c.max_model_len}, max_num_seqs={c.scheduler.max_num_seqs}, "
            f"max_num_batched_tokens={c.scheduler.max_num_batched_tokens}, "
            f"prefix_caching={c.cache.prefix_caching}, chunked_prefill={c.scheduler.chunked_prefill})"
        )

    def describe(self) -> dict:
        """The facts a benchmark or a log line should carry: model, device, backends, cache, limits."""
        c = self.config
        info = {
            "model_path": c.model.path,
            "architecture": c.model.architecture,
            "role": c.role,
            "device": str(c.device),
            "dtype": str(c.dtype).replace("torch.", ""),
            "attention_backend": self.runner.backend.name,
            "kernels": self.runner.kernels.describe() if self.runner.kernels is not None else {},
            "cuda_graphs": self.runner.graph_runner is not None,
            "async_scheduling": self.async_scheduling,
            "block_size": self.kv_cache.block_size,
            "num_kv_blocks": self.block_manager.num_blocks,
            "kv_cache_tokens": self.block_manager.num_blocks * self.kv_cache.block_size,
            "kv_cache_gib": self.kv_cache.nbytes / 2**30,
            "max_model_len": c.max_model_len,
            "max_num_seqs": c.scheduler.max_num_seqs,
            "max_num_batched_tokens": c.scheduler.max_num_batched_tokens,
            "prefix_caching": c.cache.prefix_caching,
            "chunked_prefill": c.scheduler.chunked_prefill,
        }
        if self.role is not None:
            info["kv_transfer"] = self.role.describe()
        if self.memory_plan is not None:
            info["memory_plan"] = self.memory_plan.describe(self.kv_cache.block_size)
        return info

    def close(self) -> None:
        """Abort what is running and release the KV cache, graphs and weights' device memory now
        (rather than when the garbage collector gets to it), so another engine can be built."""
        for rid in list(self._requests):
            self.abort(rid)
        self._pending_outputs.clear()
        if self.role is not None:
            self.role.close()
        device = self.config.device
        self.runner.graph_runner = None
        self.kv_cache.storage = None
        self.kv_cache.layers = []
        self.model = self.runner.model = None
        import gc

        gc.collect()
        if device.type == "cuda":
            import torch

            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ requests
    def make_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                     arrival_time: float | None = None) -> Request:
        """Validate and tokenise one prompt into a Request without admitting it.
        Raises InvalidRequestError naming the problem."""
        params = params or SamplingParams()
        vocab = self.config.model.vocab_size
        params.validate(vocab)
        text = None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this checkpoint has no tokenizer; pass prompts as lists of token ids")
            text = prompt
            token_ids = list(self.tokenizer.encode(prompt))
        elif isinstance(prompt, (list, tuple)):
            token_ids = list(prompt)
            bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]}")
        else:
            raise InvalidRequestError(f"a prompt is a string or a list of token ids, not {type(prompt).__name__}")
        if not token_ids:
            raise InvalidRequestError("empty prompt: at least one token is needed")
        max_len = self.config.max_model_len
        if len(token_ids) >= max_len:
            raise InvalidRequestError(
                f"prompt has {len(token_ids)} tokens but max_model_len is {max_len}; "
                "the prompt and at least one generated token must fit"
            )
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        elif request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        return Request(request_id, token_ids, params, prompt=text, eos_token_ids=self.config.model.eos_token_ids,
                       arrival_time=arrival_time)

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    arrival_time: float | None = None, kv_transfer_params: dict | None = None) -> str:
        """Queue a prompt; returns its request id. Bad input raises InvalidRequestError and leaves
        every other request untouched. `arrival_time` (time.perf_counter() clock) defaults to now;
        TTFT and latency metrics count from it.

        On a decode engine, `kv_transfer_params` (a prefill engine's output field) makes the
        request pull the prompt's KV instead of computing it; `prompt` must be the same prompt."""
        request = self.make_request(prompt, params, request_id, arrival_time)
        if kv_transfer_params is not None:
            if self.role is None or self.role.name != "decode":
                raise InvalidRequestError(
                    f"kv_transfer_params need a decode engine (EngineBuilder(...).role('decode')); this engine's role "
                    f"is {self.config.role!r}")
            self.role.admit(request, kv_transfer_params)
            self._register(request)
            return request.request_id
        return self.add_prepared_request(request)

    def _register(self, request: Request) -> None:
        self._requests[request.request_id] = request
        if self.tokenizer is not None:
            self._detokenizers[request.request_id] = IncrementalDetokenizer(
                self.tokenizer, request.params.skip_special_tokens
            )

    def add_prepared_request(self, request: Request) -> str:
        if self.role is not None:
            self.role.prepare(request)
        self._register(request)
        self.scheduler.add_request(request)
        return request.request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its blocks. Its final output (finish_reason
        "abort") is returned by the next `step()`. Returns False for unknown/finished ids."""
        req = self._requests.get(request_id)
        if req is None or req.is_finished:
            # a prefill engine's handed-off request: release its pinned blocks
            return self.role.abort(request_id) if self.role is not None else False
        self._finish(req, "abort")
        self._pending_outputs.append(self._output(req, []))
        return True

    def has_unfinished_requests(self) -> bool:
        # an in-flight step whose requests have all finished holds only discarded work
        inflight = self._inflight is not None and any(not r.is_finished for r in self._inflight.sampled)
        pulling = self.role is not None and self.role.has_pending()
        return self.scheduler.has_unfinished() or bool(self._pending_outputs) or inflight or pulling

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.running)

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, and return an output for every request that produced a
        token (or finished).

        With async scheduling (default on CUDA) the step launches its forward pass, then finishes
        the previous step's bookkeeping (tokens, stop checks, outputs) while the GPU works, so the
        outputs returned are those of the previous step; tokens are identical either way. A request
        that stops is then computed one step too far, and that extra token is dropped.
        """
        outputs, self._pending_outputs = self._pending_outputs, []
        if self.role is not None:  # KV migrations: start/finish pulls, release pinned blocks
            outputs += self.role.before_step()
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
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
            if s.request.metrics.first_scheduled_time is None:
                s.request.metrics.first_scheduled_time = now
        handle = self.runner.execute(sched)
        if self._inflight is not None:  # overlaps with the GPU running this step
            outputs += self._resolve(self._inflight)
            self._inflight = None
        prompt_tokens_before = sum(s.request.metrics.num_computed_prompt_tokens for s in sched.scheduled)
        self.scheduler.update_after_step(sched)
        prompt_tokens = sum(s.request.metrics.num_computed_prompt_tokens for s in sched.scheduled) - prompt_tokens_before
        if self.async_scheduling and handle.sampled:
            for row, req in enumerate(handle.sampled):
                if not req.is_finished:
                    req.add_placeholder(row)
            self._inflight = handle
        else:
            outputs += self._resolve(handle)

        num_tokens = sched.num_batched_tokens
        self.stats.num_steps += 1
        self.stats.num_computed_tokens += num_tokens
        self.stats.num_prompt_tokens_computed += prompt_tokens
        self.stats.num_cached_tokens += sched.num_cached_tokens
        self.stats.steps.append(StepRecord(
            num_seqs=len(sched.scheduled),
            num_tokens=num_tokens,
            num_prefill_tokens=sum(s.num_new_tokens for s in sched.scheduled if s.num_new_tokens > 1 or not s.sample),
            num_decodes=sum(1 for s in sched.scheduled if s.num_new_tokens == 1 and s.sample),
            duration_s=time.perf_counter() - t0,
        ))
        return outputs

    def _can_overlap(self, sched) -> bool:
        """Whether the step can be sampled before the in-flight step's tokens are known: only
        when no sampling row looks at generated tokens (penalties, min_tokens) or wants logprobs."""
        for s in sched.scheduled:
            p = s.request.params
            if (p.logprobs is not None or p.repetition_penalty != 1.0 or p.presence_penalty != 0.0
                    or p.frequency_penalty != 0.0 or s.request.num_output_tokens < p.min_tokens):
                return False
        return True

    def _resolve(self, handle) -> list[RequestOutput]:
        """Apply a finished step's sampled tokens: append (or fill in the placeholder), stream the
        text, check stops, and make the outputs. Requests that ended meanwhile are skipped."""
        if not handle.sampled:
            return []
        token_ids = handle.token_ids()
        logprob_rows = self._logprob_rows(handle.sampler_out, handle.sampled)
        now = time.perf_counter()
        outputs = []
        for i, (req, tok) in enumerate(zip(handle.sampled, token_ids)):
            if req.is_finished:
                continue
            if req.pending_row is not None:
                req.resolve_placeholder(tok)
            else:
                req.append_token(tok)
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            if req.logprobs is not None:
                req.logprobs.append(logprob_rows[i])
            self._check_stop(req, tok)
            outputs.append(self._output(req, [tok]))
            self.stats.num_generated_tokens += 1
        return outputs

    def _logprob_rows(self, out, reqs: list[Request]) -> list[dict[int, float] | None]:
        if out.sampled_logprobs is None:
            return [None] * len(reqs)
        sampled = out.sampled_logprobs.tolist()
        tok = out.token_ids.tolist()
        top_ids = out.top_token_ids.tolist() if out.top_token_ids is not None else None
        top_lp = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        rows = []
        for i, r in enumerate(reqs):
            n = r.params.logprobs or 0
            row = {tok[i]: sampled[i]}
            if top_ids is not None and n > 0:
                row.update(zip(top_ids[i][:n], top_lp[i][:n]))
            rows.append(row)
        return rows

    def _check_stop(self, req: Request, token: int) -> None:
        p = req.params
        new_text, prev_len = "", len(req.output_text)
        detok = self._detokenizers.get(req.request_id)
        if detok is not None:
            new_text = detok.update(req.output_token_ids)
            req.output_text = detok.text
        can_stop = req.num_output_tokens >= p.min_tokens
        if can_stop and token in req.eos_token_ids:
            return self._finish(req, "stop", token)
        if can_stop and token in p.stop_token_ids:
            return self._finish(req, "stop", token)
        if can_stop and p.stop and new_text:
            longest = max(len(s) for s in p.stop)
            start = max(0, prev_len - longest + 1)
            hits = [(req.output_text.find(s, start), s) for s in p.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                idx, s = min(hits)
                req.output_text = req.output_text[: idx + (len(s) if p.include_stop_str_in_output else 0)]
                return self._finish(req, "stop", s)
        if req.num_output_tokens >= p.max_tokens or req.num_tokens >= self.config.max_model_len:
            return self._finish(req, "length")

    def _finish(self, req: Request, reason: str, stop_reason=None) -> None:
        detok = self._detokenizers.pop(req.request_id, None)
        if detok is not None and not isinstance(stop_reason, str):  # a stop string already cut the text
            detok.flush(req.output_token_ids)
            req.output_text = detok.text
        if self.role is not None:  # prefill: pin the blocks and hand off; decode: abort mid-pull
            reason = self.role.on_finish(req, reason)
        req.finish_reason, req.stop_reason = reason, stop_reason
        req.metrics.finished_time = time.perf_counter()
        self.scheduler.finish_request(req)
        self.stats.num_finished += 1
        self._requests.pop(req.request_id, None)

    def _output(self, req: Request, new_tokens: list[int]) -> RequestOutput:
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            token_ids=list(req.output_token_ids),
            text=req.output_text,
            new_token_ids=new_tokens,
            finished=req.is_finished,
            finish_reason=req.finish_reason,
            stop_reason=req.stop_reason,
            metrics=req.metrics,
            logprobs=list(req.logprobs) if req.logprobs is not None else None,
            error=req.error,
            kv_transfer_params=req.kv_transfer_params if req.is_finished else None,
        )

    # ------------------------------------------------------------------ scoring
    def prompt_logits(self, token_ids: Sequence[int], chunk_size: int | None = None):
        """float32 logits [len(token_ids), vocab] for every position of a token sequence, computed
        through the paged cache in chunks of `chunk_size` tokens (default: the step budget) and
        reusing the prefix cache. For teacher-forced comparisons and scoring; needs an idle engine
        or enough free blocks."""
        import torch

        from dlengine.engine.scheduler import ScheduledRequest, SchedulerOutput

        req = self.make_request(list(token_ids), SamplingParams(max_tokens=1))
        cached, num_cached = self.block_manager.find_cached_prefix(req)
        chunk = chunk_size or self.config.scheduler.max_num_batched_tokens
        if not self.block_manager.allocate_slots(req, req.num_tokens - num_cached, cached):
            raise RuntimeError("not enough free KV blocks to score this sequence now")
        req.num_computed_tokens = num_cached
        pieces = []
        try:
            if num_cached:  # logits of cached positions are not stored; recompute them without writing
                pieces.append(self._uncached_logits(req.all_token_ids[:num_cached]))
            while req.num_computed_tokens < req.num_tokens:
                n = min(chunk, req.num_tokens - req.num_computed_tokens)
                out = SchedulerOutput([ScheduledRequest(req, n, sample=False)])
                pieces.append(self.runner.compute_logits(self.runner.prepare_inputs(out, all_logits=True)))
                req.num_computed_tokens += n
                self.block_manager.cache_full_blocks(req)
        finally:
            self.block_manager.free(req)
        return torch.cat(pieces)

    def _uncached_logits(self, token_ids: list[int]):
        saved = self.block_manager.enable_prefix_caching
        self.block_manager.enable_prefix_caching = False
        try:
            return self.prompt_logits(token_ids)
        finally:
            self.block_manager.enable_prefix_caching = saved

    # ------------------------------------------------------------------ batch helpers
    def _prepare_batch(self, prompts, params) -> tuple[list[Request | None], list[str | None]]:
        if isinstance(prompts, str) or _is_token_list(prompts):
            prompts = [prompts]
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise InvalidRequestError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        reqs: list[Request | None] = []
        errors: list[str | None] = []
        for prompt, p in zip(prompts, params):
            try:
                reqs.append(self.make_request(prompt, p))
                errors.append(None)
            except InvalidRequestError as e:
                reqs.append(None)
                errors.append(str(e))
        return reqs, errors

    def generate(self, prompts: Prompt | Iterable[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, use_tqdm: bool = False, raise_on_error: bool = True) -> list[RequestOutput]:
        """Run a batch to completion; outputs come back in input order.

        Prompts are strings or lists of token ids. A bad prompt raises InvalidRequestError naming
        its index before anything runs; with `raise_on_error=False` it comes back instead as an
        output with `finish_reason="error"` and `error` set, and the rest of the batch runs.
        """
        reqs, errors = self._prepare_batch(prompts, params)
        if raise_on_error and any(errors):
            msgs = [f"prompt {i}: {e}" for i, e in enumerate(errors) if e]
            raise InvalidRequestError("; ".join(msgs))
        for r in reqs:
            if r is not None:
                self.add_prepared_request(r)
        finals: dict[str, RequestOutput] = {}
        pending = {r.request_id for r in reqs if r is not None}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(pending), desc="generate", unit="req")
        while pending:
            for out in self.step():
                if out.finished and out.request_id in pending:
                    finals[out.request_id] = out
                    pending.discard(out.request_id)
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        results = []
        for r, err in zip(reqs, errors):
            if r is not None:
                results.append(finals[r.request_id])
            else:
                results.append(RequestOutput(
                    request_id="", prompt=None, prompt_token_ids=[], token_ids=[], text="", new_token_ids=[],
                    finished=True, finish_reason="error", stop_reason=None,
                    metrics=Request("", [], SamplingParams()).metrics, error=err,
                ))
        return results

    def stream(self, prompts: Prompt | Iterable[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None
               ) -> Iterator[RequestOutput]:
        """Yield outputs of the given prompts as tokens arrive (each has `new_token_ids`); ends
        when all of them are finished. Closing the iterator early aborts what is still running."""
        reqs, errors = self._prepare_batch(prompts, params)
        if any(errors):
            raise InvalidRequestError("; ".join(f"prompt {i}: {e}" for i, e in enumerate(errors) if e))
        ids = {self.add_prepared_request(r) for r in reqs}
        try:
            while ids:
                for out in self.step():
                    if out.request_id in ids:
                        if out.finished:
                            ids.discard(out.request_id)
                        yield out
        finally:
            for rid in ids:
                self.abort(rid)
