"""Engine: the front every engine shares -- requests in, outputs out.

The front validates and tokenises prompts, hands `Request`s to a core, and turns the core's
token ids into `RequestOutput`s (detokenising, stop strings). The core is anything with the
`EngineCoreClient` interface: the in-process `EngineCore`, a lockstep group of rank cores in
worker processes (`dlengine.parallel.ParallelEngine`), or rank 0 of a torchrun world
(`dlengine.parallel.DistributedEngine`); the API is the same for all of them.

Thread use: `abort` may be called from any thread (an HTTP handler whose client went away);
it only queues the id, and the next `step` applies it on the stepping thread.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence, Union

from dlengine.config import EngineConfig
from dlengine.engine.core import CoreOutput, scoring_request
from dlengine.engine.output_processor import OutputProcessor, TrackedRequest
from dlengine.engine.request import Request, RequestMetrics, RequestOutput
from dlengine.multimodal.processor import VisionPromptProcessor
from dlengine.sampling_params import InvalidRequestError, SamplingParams

# a text or token-id prompt, or {"prompt": text or token ids, "images": [...], "videos": [...]}
# for a vision model
Prompt = Union[str, Sequence[int], Mapping[str, Any]]
logger = logging.getLogger("dlengine")


OUTPUT_KINDS = ("cumulative", "final_only")


class EngineCoreClient(Protocol):
    """What the front needs from a core."""

    def add(self, request: Request) -> None: ...

    def abort(self, request_id: str) -> bool: ...

    def step(self) -> list[CoreOutput]: ...

    def has_unfinished(self) -> bool: ...

    def describe(self) -> dict: ...

    def close(self) -> None: ...


def _is_token_list(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(isinstance(t, int) for t in prompt)


class Engine:
    """A built inference engine. Make one with `EngineBuilder`.

    >>> from dlengine import EngineBuilder, SamplingParams
    >>> engine = EngineBuilder("tiny-qwen3").cache(block_size=16).build()
    >>> [out] = engine.generate(["hello world"], SamplingParams(max_tokens=4, temperature=0.0))
    >>> len(out.token_ids), out.finish_reason
    (4, 'length')

    Drive it by hand with `add_request` and `step`; `stream` yields outputs as tokens arrive:

    >>> rid = engine.add_request([5, 6, 7], SamplingParams(max_tokens=3, temperature=0.0))
    >>> while engine.has_unfinished_requests():
    ...     outs = engine.step()
    >>> outs[-1].request_id == rid, len(outs[-1].token_ids)
    (True, 3)
    """

    def __init__(self, config: EngineConfig, core: EngineCoreClient, tokenizer) -> None:
        self.config = config
        self.core = core
        self.tokenizer = tokenizer
        self._tracked: dict[str, TrackedRequest] = {}
        self._processor = OutputProcessor(tokenizer)
        self._pending_outputs: list[RequestOutput] = []  # aborted requests, reported by the next step()
        self._replay: list[RequestOutput] = []  # outputs prompt_logits' steps made: returned again, not re-delivered
        self._abort_queue: list[str] = []  # ids aborted from other threads
        self._lock = threading.Lock()
        self._stepping_thread: threading.Thread | None = None  # set by the first step()
        self._scores: dict = {}  # request id -> logits of finished scoring requests
        self._listeners: dict[str, Callable[[RequestOutput], None]] = {}  # add_request(on_output=...)
        self._ids = itertools.count()
        # image and video preprocessing for vision models (None for text-only ones)
        self._vision = VisionPromptProcessor.for_model(config.model, tokenizer)
        self._encoder_client = None  # pulls image embeddings from encoder engines (EPD), made on first use
        # request id -> request whose image embeddings are being pulled (encoder_cache(pull_mode=
        # "async")): tracked (abortable, counted as unfinished) but not in the core until they land
        self._pulling: dict[str, Request] = {}

    # the local core's parts, for notebooks and tests (a parallel engine's live in its workers)
    scheduler = property(lambda self: self.core.scheduler)
    block_manager = property(lambda self: self.core.block_manager)
    runner = property(lambda self: self.core.runner)
    kv_cache = property(lambda self: self.core.kv_cache)
    model = property(lambda self: self.core.model)
    connector = property(lambda self: self.core.connector)
    speculator = property(lambda self: self.core.speculator)
    memory_plan = property(lambda self: self.core.memory_plan)
    async_scheduling = property(lambda self: self.core.async_scheduling)

    @property
    def stats(self):
        """The core's counters (EngineStats)."""
        return self.core.stats

    def __repr__(self) -> str:
        d = self.describe()
        c = self.config
        parts = [f"model={c.model.architecture} @ {c.model.path}", f"role={c.role}", f"device={c.device}",
                 f"dtype={d.get('dtype')}"]
        if c.quantization != "none":
            parts.append(f"quantization={c.quantization}")
        parts += [f"attention={d.get('attention_backend')}", f"cuda_graphs={d.get('cuda_graphs')}",
                  f"async_scheduling={d.get('async_scheduling')}"]
        if "kv_transfer" in d:
            t = d["kv_transfer"]
            parts.append(f"transfer={t.get('transfer_backend')}/{t.get('transfer_transport')}")
        if "kv_cache_gib" in d:
            parts.append(f"kv_blocks={d.get('num_kv_blocks')} x {d.get('block_size')}")
            if d.get("kv_cache_dtype") not in (None, d.get("dtype")):
                parts.append(f"kv_cache_dtype={d['kv_cache_dtype']}")
        spec = d.get("speculative")
        if spec is not None:
            k = spec.get("num_tokens")
            parts.append(f"speculative={spec['method']}" + (f" x{k}" if k is not None else ""))
            if spec.get("forced_acceptance") is not None:
                parts.append(f"forced acceptance {spec['forced_acceptance']:g} (outputs are not the model's)")
        parts += [f"max_model_len={c.max_model_len}", f"max_num_seqs={c.scheduler.max_num_seqs}",
                  f"max_num_batched_tokens={c.scheduler.max_num_batched_tokens}",
                  f"prefix_caching={c.cache.prefix_caching}", f"chunked_prefill={c.scheduler.chunked_prefill}"]
        return f"{type(self).__name__}({', '.join(parts)})"

    def describe(self) -> dict:
        """The facts a benchmark or a log line should carry: model, device, kernels, cache, limits."""
        d = self.core.describe()
        if self._encoder_client is not None:
            d["ec_pulls"] = self._encoder_client.describe()
        return d

    def close(self) -> None:
        """Abort what is running and release the engine's memory (and worker processes) now."""
        for rid in list(self._tracked):
            self.abort(rid)
        self._pending_outputs.clear()
        self._replay.clear()
        self._abort_queue.clear()
        if self._encoder_client is not None:
            self._encoder_client.close()
            self._encoder_client = None
        self.core.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ requests
    def make_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                     arrival_time: float | None = None) -> Request:
        """Validate and tokenise one prompt into a Request without admitting it.
        Raises InvalidRequestError naming the problem."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"sampling params must be a SamplingParams, not {type(params).__name__}")
        vocab = self.config.model.vocab_size
        params.validate(vocab)
        text = None
        prompt, images, videos = self._split_media(prompt)
        # videos first: their timestamps are text that goes into the prompt
        videos = self._vision.process_videos(videos) if videos else []
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this checkpoint has no tokenizer; pass prompts as lists of token ids")
            text = prompt
            if self._vision is not None:
                prompt = self._vision.expand_videos_in_text(prompt, videos)
            token_ids = list(self.tokenizer.encode(prompt))
        elif isinstance(prompt, (list, tuple)):
            token_ids = list(prompt)
            bad = [t for t in token_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]}")
            if self._vision is not None:
                token_ids = self._vision.expand_videos_in_ids(token_ids, videos)
        else:
            raise InvalidRequestError(f"a prompt is a string or a list of token ids, not {type(prompt).__name__}")
        if not token_ids:
            raise InvalidRequestError("empty prompt: at least one token is needed")
        multimodal = None
        if self._vision is not None and (images or videos or self._vision.image_token_id in token_ids):
            # each image placeholder becomes the image's tokens; pixels, hashes and M-RoPE positions
            # are computed here, once
            token_ids, multimodal = self._vision.process(token_ids, images, videos)
        max_len = self.config.max_model_len
        if len(token_ids) >= max_len:
            raise InvalidRequestError(
                f"prompt has {len(token_ids)} tokens but max_model_len is {max_len}; "
                "the prompt and at least one generated token must fit"
            )
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        elif request_id in self._tracked:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if len(token_ids) + params.max_tokens > max_len:
            # as vLLM does: the request runs, but says up front that it will be cut short
            logger.warning("request %s: prompt of %d tokens + max_tokens=%d exceeds max_model_len=%d; at most %d "
                           "tokens will be generated (finish_reason 'length')", request_id, len(token_ids),
                           params.max_tokens, max_len, max_len - len(token_ids))
        return Request(request_id, token_ids, params, prompt=text, eos_token_ids=self.config.model.eos_token_ids,
                       arrival_time=arrival_time, multimodal=multimodal)

    def _split_media(self, prompt) -> tuple[Prompt, list, list]:
        """(text or token ids, images, videos) of a prompt; a dict prompt carries its images and
        videos."""
        if not isinstance(prompt, Mapping):
            return prompt, [], []
        unknown = set(prompt) - {"prompt", "images", "videos"}
        if "prompt" not in prompt or unknown:
            raise InvalidRequestError(f"a dict prompt has the keys 'prompt' and 'images' / 'videos'; got "
                                      f"{sorted(prompt)}")
        images = prompt.get("images") or []
        if not isinstance(images, (list, tuple)):
            images = [images]
        videos = prompt.get("videos")
        if videos is None:
            videos = []
        elif not isinstance(videos, (list, tuple)):
            raise InvalidRequestError("'videos' is a list of videos (each a list of frames, a [T, H, W, C] array, "
                                      f"a dict with 'frames' and 'fps', or a video file), not {type(videos).__name__}")
        if (images or videos) and self._vision is None:
            what = "images" if images else "videos"
            raise InvalidRequestError(f"{self.config.model.architecture} takes no {what}; use a vision model "
                                      "such as Qwen3-VL")
        return prompt["prompt"], list(images), list(videos)

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    arrival_time: float | None = None, kv_transfer_params: dict | None = None,
                    on_output: Callable[[RequestOutput], None] | None = None,
                    output_kind: str = "cumulative", ec_transfer_params: dict | None = None) -> str:
        """Queue a prompt (as `generate` takes it, images included); returns its request id. Bad
        input raises InvalidRequestError and leaves every other request untouched. `arrival_time`
        (time.perf_counter() clock) defaults to now; TTFT and latency metrics count from it.

        `on_output(output)`, if given, is called (on the stepping thread) with each of this
        request's outputs as `step()` makes them, the final one included: a per-request queue for
        a server (e.g. `lambda o: loop.call_soon_threadsafe(queue.put_nowait, o)` for asyncio).

        On a decode engine, `kv_transfer_params` (a prefill engine's output field) makes the
        request pull the prompt's KV instead of computing it; `prompt` must be the same prompt.

        On a vision model, `ec_transfer_params` (an encoder engine's `encode(images, videos=...)`
        result for this prompt's images and videos) makes the request pull their embeddings
        instead of encoding them (docs/vision.md, EPD); a failed pull raises EncoderPullError
        naming the encoder (or encodes here, with encoder_cache(on_pull_failure="local")). With
        encoder_cache(pull_mode="async") the pull runs while `step()` runs the other requests,
        and a failed one ends the request with finish_reason "error" and that message instead.

        `output_kind`: "cumulative" (an output every step the request gains tokens) or
        "final_only" (only its final output: cheaper per step for batch jobs, as generate() uses)."""
        if output_kind not in OUTPUT_KINDS:
            raise InvalidRequestError(f"output_kind must be one of {OUTPUT_KINDS}, got {output_kind!r}")
        request = self.make_request(prompt, params, request_id, arrival_time)
        if kv_transfer_params is not None:
            custom = self.config.components.kv_connector is not None  # it checks its own params
            if self.config.role != "decode" and not custom:
                raise InvalidRequestError(
                    f"kv_transfer_params need a decode engine (EngineBuilder(...).role('decode')); this engine's role "
                    f"is {self.config.role!r}")
            if not custom:
                from dlengine.disagg.params import check_transfer_params

                check_transfer_params(kv_transfer_params, request, self.config.model.vocab_size)
            request.remote_kv = kv_transfer_params
        pulling = ec_transfer_params is not None and self._pull_visual_embeddings(request, ec_transfer_params)
        if pulling:
            rid = self._hold_for_pull(request, output_kind)
        else:
            rid = self.add_prepared_request(request, output_kind)
        if on_output is not None:
            self._listeners[rid] = on_output
        return rid

    def _pull_visual_embeddings(self, request: Request, ec_transfer_params: dict) -> bool:
        """Pull (sync) or start pulling (async) the embeddings of the request's images and
        videos; True when the request must wait for an async pull before it enters the core."""
        if self._vision is None:
            raise InvalidRequestError(f"ec_transfer_params carry image and video embeddings; "
                                      f"{self.config.model.architecture} takes no images or videos")
        if request.remote_kv is not None:
            return False  # the prompt's KV is pulled whole: its images and videos are never encoded here
        from dlengine.disagg.ec_params import EncoderTransferParams

        # malformed params are refused before a transfer engine is made for them
        params = EncoderTransferParams.from_dict(ec_transfer_params)
        client = self._ensure_encoder_client()
        if self.config.encoder_cache.pull_mode == "async":
            client.start(request.request_id, params, request.multimodal)
            return True
        client.pull(params, request.multimodal)
        return False

    def _hold_for_pull(self, request: Request, output_kind: str) -> str:
        """Track a request whose embeddings are on their way; `_admit_pulled` hands it to the core."""
        self._pulling[request.request_id] = request
        self._tracked[request.request_id] = TrackedRequest.of(request, self.tokenizer,
                                                              final_only=output_kind == "final_only")
        return request.request_id

    def _admit_pulled(self) -> list[RequestOutput]:
        """Advance the embedding pulls (never blocks): requests whose embeddings landed (or that
        encode locally after a failed pull) enter the core; failed ones end with their error."""
        if self._encoder_client is None:
            return []
        outputs = []
        for o in self._encoder_client.poll():
            request = self._pulling.pop(o.request_id, None)
            t = self._tracked.get(o.request_id)
            if request is None or t is None:
                continue  # aborted meanwhile (the client ended its pull already)
            if o.pulled or o.encode_locally:
                self.core.add(request)
                continue
            # ended before it ran: no tokens, the pull's error as the reason
            t.finished, t.finish_reason, t.error = True, "error", o.error
            t.metrics.finished_time = time.perf_counter()
            self._tracked.pop(o.request_id)
            outputs.append(t.output([]))
        return outputs

    def _ensure_encoder_client(self):
        if self._encoder_client is None:
            from dlengine.disagg.encoder_client import EncoderCacheClient
            from dlengine.parallel.transfer import make_transfer_engine

            t = self.config.transfer
            transfer = make_transfer_engine("dlslime", transport="tcp", host=t.host if t is not None else "127.0.0.1")
            try:
                self._encoder_client = EncoderCacheClient(self.config, transfer)
            except BaseException:
                transfer.close()
                raise
        return self._encoder_client

    def add_prepared_request(self, request: Request, output_kind: str = "cumulative") -> str:
        """Admit a request made by `make_request`."""
        self.core.add(request)  # may append a migrated request's first token
        self._tracked[request.request_id] = TrackedRequest.of(request, self.tokenizer,
                                                              final_only=output_kind == "final_only")
        return request.request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its blocks. Its final output (finish_reason
        "abort") is returned by the next `step()`. Returns False for unknown/finished ids.
        Safe to call from another thread than the one stepping: the abort is then applied at
        the next step."""
        stepper = self._stepping_thread
        if stepper is not None and stepper is not threading.current_thread():
            with self._lock:
                self._abort_queue.append(request_id)
            return request_id in self._tracked
        return self._abort_now(request_id)

    def _abort_now(self, request_id: str) -> bool:
        t = self._tracked.pop(request_id, None)
        if t is None or t.finished:
            # a prefill engine's handed-off request: release its pinned blocks
            return self.core.abort(request_id)
        if self._pulling.pop(request_id, None) is not None:
            self._encoder_client.abort(request_id)  # frees its receive run once no read can land in it
        else:
            self.core.abort(request_id)
        self._pending_outputs.append(self._processor.aborted(t))
        return True

    def has_unfinished_requests(self) -> bool:
        return (self.core.has_unfinished() or bool(self._pending_outputs) or bool(self._replay)
                or bool(self._abort_queue) or bool(self._pulling)
                # an aborted request's pull frees its receive run only once its read lands
                or (self._encoder_client is not None and self._encoder_client.busy))

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._tracked)

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[RequestOutput]:
        """Run one core step and return an output for every request that produced tokens (or
        finished). With async scheduling (default on CUDA) these are the previous step's
        outputs; tokens are identical either way."""
        self._stepping_thread = threading.current_thread()
        if self._abort_queue:
            with self._lock:
                queued, self._abort_queue = self._abort_queue, []
            for rid in queued:
                self._abort_now(rid)
        outputs, self._pending_outputs = self._pending_outputs, []
        replay, self._replay = self._replay, []
        if self._encoder_client is not None:  # also when nothing waits: aborted pulls free their runs here
            outputs += self._admit_pulled()
        for co in self.core.step():
            t = self._tracked.get(co.request_id)
            if t is None:
                continue  # ended here already (a stop string); the core's late token is dropped
            if co.prompt_logits is not None:
                t.finished = True
                self._scores[co.request_id] = co.prompt_logits
                self._tracked.pop(co.request_id)
                continue
            out, stopped = self._processor.process(t, co)
            if out is None:  # a final-only request, not finished
                continue
            if stopped:
                # a stop string: the core cannot see text, so the request ends here and there
                self.core.abort(co.request_id)
            if out.finished:
                self._tracked.pop(co.request_id, None)
            outputs.append(out)
        if self._listeners:
            for out in outputs:
                listener = self._listeners.get(out.request_id)
                if listener is not None:
                    if out.finished:
                        del self._listeners[out.request_id]
                    listener(out)
        return replay + outputs

    # ------------------------------------------------------------------ scoring
    def prompt_logits(self, token_ids: Sequence[int], chunk_size: int | None = None):
        """float32 logits [len(token_ids), vocab] for every position of a token sequence,
        computed through the scheduler and paged cache in chunks of `chunk_size` tokens (default:
        the step budget). For teacher-forced comparisons and scoring; other requests keep running
        meanwhile (their outputs come from the next `step()`)."""
        req = self.make_request(list(token_ids), SamplingParams(max_tokens=1))
        req = scoring_request(req.request_id, req.prompt_token_ids, chunk_size)
        self.add_prepared_request(req)
        held: list[RequestOutput] = []
        while req.request_id not in self._scores:
            if not self.core.has_unfinished():
                raise RuntimeError(f"scoring request {req.request_id} ended without logits")
            held += self.step()
        self._replay = held + self._replay  # the caller's next step() returns them (listeners had them)
        return self._scores.pop(req.request_id)

    # ------------------------------------------------------------------ batch helpers
    def _prepare_batch(self, prompts, params) -> tuple[list[Request | None], list[str | None]]:
        if isinstance(prompts, (str, Mapping)) or _is_token_list(prompts):
            prompts = [prompts]
        try:
            prompts = list(prompts)
        except TypeError:
            raise InvalidRequestError(f"prompts must be a string, a list of token ids, or a list of those; got "
                                      f"{type(prompts).__name__}") from None
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

        Prompts are strings or lists of token ids; for a vision model also dicts
        {"prompt": text or ids, "images": [PIL images, arrays or paths]} (docs/vision.md). A bad
        prompt raises InvalidRequestError naming its index before anything runs; with
        `raise_on_error=False` it comes back instead as an output with `finish_reason="error"` and
        `error` set, and the rest of the batch runs.
        """
        reqs, errors = self._prepare_batch(prompts, params)
        if raise_on_error and any(errors):
            msgs = [f"prompt {i}: {e}" for i, e in enumerate(errors) if e]
            raise InvalidRequestError("; ".join(msgs))
        for r in reqs:
            if r is not None:
                self.add_prepared_request(r, output_kind="final_only")
        finals: dict[str, RequestOutput] = {}
        pending = {r.request_id for r in reqs if r is not None}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(pending), desc="generate", unit="req")
        try:
            while pending:
                for out in self.step():
                    if out.finished and out.request_id in pending:
                        finals[out.request_id] = out
                        pending.discard(out.request_id)
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return [finals[r.request_id] if r is not None else error_output(err) for r, err in zip(reqs, errors)]

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


def error_output(error: str | None) -> RequestOutput:
    """The output of a prompt refused before it ran (generate(..., raise_on_error=False))."""
    return RequestOutput(request_id="", prompt=None, prompt_token_ids=[], token_ids=[], text="", new_token_ids=[],
                         finished=True, finish_reason="error", stop_reason=None, metrics=RequestMetrics(0.0),
                         error=error)
