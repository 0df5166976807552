"""The front's side of a request: text, stop strings and the outputs the user sees.

The core reports token ids (`CoreOutput`); this module keeps, per request, the cumulative token
ids, the incrementally detokenised text and logprobs, checks stop strings (the one stop the
core cannot see, since it has no tokenizer) and makes `RequestOutput`s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from dlengine.engine.core import CoreOutput
from dlengine.engine.request import Request, RequestMetrics, RequestOutput
from dlengine.sampling_params import SamplingParams
from dlengine.tokenizer import IncrementalDetokenizer


@dataclass
class TrackedRequest:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict[int, float]] | None = None
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    kv_transfer_params: dict | None = None
    # only the final output is wanted (Engine.generate, offline benchmarks): no output object per
    # step, and without stop strings no text until the end (one full decode, as flush does anyway)
    final_only: bool = False

    @staticmethod
    def of(request: Request, tokenizer, final_only: bool = False) -> "TrackedRequest":
        p = request.params
        detok = IncrementalDetokenizer(tokenizer, p.skip_special_tokens) if tokenizer is not None else None
        tracked = TrackedRequest(request.request_id, request.prompt, request.prompt_token_ids, p, request.metrics,
                                 detok, logprobs=[] if p.logprobs is not None else None, final_only=final_only)
        # a decode engine's migrated request starts with the prefill side's first token
        for tok in request.output_token_ids:
            tracked.token_ids.append(tok)
            if detok is not None:  # its text too, or streamed deltas would miss it until the final flush
                detok.update(tracked.token_ids)
                tracked.text = detok.text
        return tracked

    def output(self, new_token_ids: list[int]) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            token_ids=list(self.token_ids),
            text=self.text,
            new_token_ids=new_token_ids,
            finished=self.finished,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            metrics=self.metrics,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            error=self.error,
            kv_transfer_params=self.kv_transfer_params if self.finished else None,
        )


class OutputProcessor:
    """Applies core outputs to tracked requests. `process` returns the user output (None for a
    final-only request that has not finished) and whether a stop string ended the request (the
    front then aborts it in the core)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def process(self, t: TrackedRequest, out: CoreOutput) -> tuple[RequestOutput | None, bool]:
        if out.metrics is not None:
            t.metrics = out.metrics
        if t.final_only and not out.finished and not t.params.stop:
            # nothing to show before the end and no stop string to look for: just keep the ids
            t.token_ids += out.new_token_ids
            if t.logprobs is not None and out.new_logprobs is not None:
                t.logprobs += out.new_logprobs[:len(out.new_token_ids)]
            return None, False
        new: list[int] = []
        stopped_by_string = False
        p_stop = bool(t.params.stop)
        for i, tok in enumerate(out.new_token_ids):
            t.token_ids.append(tok)
            new.append(tok)
            if t.logprobs is not None and out.new_logprobs is not None and i < len(out.new_logprobs):
                t.logprobs.append(out.new_logprobs[i])
            last = i == len(out.new_token_ids) - 1
            # the core's token-level stop (eos, stop token) on this token comes first, as it
            # would on one engine; a stop string beats a length limit reached on the same token
            token_stop = last and out.finished and out.finish_reason == "stop" and isinstance(out.stop_reason, int)
            if (p_stop or not t.final_only) and self._update_text(t, check_stop=not token_stop):
                stopped_by_string = True
                break
        if stopped_by_string:
            t.metrics.finished_time = time.perf_counter()
            return t.output(new), True
        if out.finished:
            t.finished = True
            t.finish_reason, t.stop_reason, t.error = out.finish_reason, out.stop_reason, out.error
            t.kv_transfer_params = out.kv_transfer_params
            if t.detokenizer is not None:
                t.detokenizer.flush(t.token_ids)
                t.text = t.detokenizer.text
        elif t.final_only:
            return None, False
        return t.output(new), False

    def _update_text(self, t: TrackedRequest, check_stop: bool) -> bool:
        """Extend the text by the newest token; True when a stop string ended the request."""
        if t.detokenizer is None:
            return False
        prev_len = len(t.text)
        new_text = t.detokenizer.update(t.token_ids)
        t.text = t.detokenizer.text
        p = t.params
        if not (check_stop and p.stop and new_text and len(t.token_ids) >= p.min_tokens):
            return False
        longest = max(len(s) for s in p.stop)
        start = max(0, prev_len - longest + 1)
        hits = [(t.text.find(s, start), s) for s in p.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return False
        idx, s = min(hits)
        t.text = t.text[: idx + (len(s) if p.include_stop_str_in_output else 0)]
        t.finished, t.finish_reason, t.stop_reason = True, "stop", s
        return True

    def aborted(self, t: TrackedRequest) -> RequestOutput:
        t.finished, t.finish_reason = True, "abort"
        t.metrics.finished_time = time.perf_counter()
        if t.detokenizer is not None:
            t.detokenizer.flush(t.token_ids)
            t.text = t.detokenizer.text
        return t.output([])
