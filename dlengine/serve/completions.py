"""POST /v1/completions: prompts (text or token ids, one or many) x n choices, streamed or not;
`echo` with `logprobs` scores the prompt tokens too (what lm-eval's loglikelihood asks for)."""

from __future__ import annotations

from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from dlengine.engine.request import RequestOutput
from dlengine.serve.errors import bad_request, engine_failed
from dlengine.serve.logprobs import completion_logprobs, prompt_logprobs
from dlengine.serve.params import choice_params, completion_prompts, sampling_params
from dlengine.serve.pd import check_pd_request, handoff_params, hold_prefill
from dlengine.serve.protocol import (CompletionChoice, CompletionRequest, CompletionResponse, Usage,
                                     new_id)
from dlengine.serve.state import ServerState
from dlengine.serve.streams import SSE_DONE, Delta, abort_on_disconnect, collect, merge, sse, unless_disconnected

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


async def create_completion(req: CompletionRequest, raw: Request):
    state: ServerState = raw.app.state.server
    state.check_model(req.model)
    if req.suffix:
        raise bad_request("suffix is not supported", param="suffix")
    prompts = completion_prompts(req.prompt, state.tokenizer)
    params = sampling_params(req, max_tokens=req.max_tokens, default_max_tokens=DEFAULT_MAX_TOKENS,
                             logprobs=req.logprobs, vocab_size=state.vocab_size)
    if req.echo and req.logprobs is not None and req.stream:
        raise bad_request("echo with logprobs is only supported without streaming", param="echo")
    kv, prefill_url = check_pd_request(state, req.kv_transfer_params, stream=req.stream,
                                       num_choices=len(prompts) * req.n)
    rid = new_id("cmpl")
    jobs = [(p, choice_params(params, c), f"{rid}-{i}-{c}") for i, p in enumerate(prompts) for c in range(req.n)]
    streams = await state.async_engine.add(jobs, kv)
    if kv is not None:
        hold_prefill(prefill_url, req.kv_transfer_params, streams[0])
    if req.stream:
        return StreamingResponse(_stream(state, req, rid, prompts, streams, raw), media_type="text/event-stream")
    finals = await unless_disconnected(raw, collect(streams))
    prompt_scores = None
    if req.echo and req.logprobs is not None:
        prompt_scores = [prompt_logprobs(await state.async_engine.prompt_logits(p), p, req.logprobs) for p in prompts]
    choices = []
    for k, out in enumerate(finals):
        if out.finish_reason == "error":
            raise engine_failed(f"generation failed: {out.error}")
        i = k // req.n
        choices.append(_choice(state, req, k, out, prompts[i], prompt_scores[i] if prompt_scores else None))
    return CompletionResponse(id=rid, model=req.model, choices=choices, usage=_usage(prompts, finals, req.n),
                              kv_transfer_params=handoff_params(state, finals))


def _choice(state: ServerState, req: CompletionRequest, index: int, out: RequestOutput, prompt: list[int],
            prompt_scores) -> CompletionChoice:
    text = out.text
    prompt_text = ""
    if req.echo:
        prompt_text = state.tokenizer.decode(prompt) if state.tokenizer is not None else ""
        text = prompt_text + text
    logprobs = None
    if req.logprobs is not None:
        gen = completion_logprobs(out.token_ids, out.logprobs or [], state.text_of, start_offset=len(prompt_text))
        if prompt_scores is not None:
            head = completion_logprobs(prompt, prompt_scores, state.text_of)
            gen.tokens[:0], gen.token_logprobs[:0] = head.tokens, head.token_logprobs
            gen.top_logprobs[:0], gen.text_offset[:0] = head.top_logprobs, head.text_offset
        logprobs = gen
    ids = {"prompt_token_ids": list(prompt), "token_ids": list(out.token_ids)} if req.return_token_ids else {}
    return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=_finish(out),
                            stop_reason=out.stop_reason, **ids)


def _finish(out: RequestOutput) -> str | None:
    return out.finish_reason if out.finished else None


def _usage(prompts: list[list[int]], finals: list[RequestOutput], n: int) -> Usage:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(len(o.token_ids) for o in finals)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


async def _stream(state: ServerState, req: CompletionRequest, rid: str, prompts, streams,
                  raw: Request) -> AsyncIterator[str]:
    deltas = [Delta(choice_params_stop(req)) for _ in streams]
    finals: list[RequestOutput | None] = [None] * len(streams)
    echoed = [False] * len(streams)
    offsets = [0] * len(streams)
    watcher = abort_on_disconnect(raw, streams)
    try:
        async for k, out in merge(streams):
            text, ids, lps = deltas[k].advance(out)
            if req.echo and not echoed[k]:
                echoed[k] = True
                prompt_text = state.tokenizer.decode(prompts[k // req.n]) if state.tokenizer is not None else ""
                text, offsets[k] = prompt_text + text, len(prompt_text)
            if out.finished:
                finals[k] = out
                if out.finish_reason == "error":
                    yield sse(engine_failed(f"generation failed: {out.error}").body())
                    break
            if not (text or ids or out.finished):
                continue
            logprobs = None
            if req.logprobs is not None and lps is not None:
                logprobs = completion_logprobs(ids, lps, state.text_of, start_offset=offsets[k])
                offsets[k] += sum(len(t) for t in logprobs.tokens)
            choice = CompletionChoice(index=k, text=text, logprobs=logprobs, finish_reason=_finish(out),
                                      stop_reason=out.stop_reason if out.finished else None,
                                      **({"token_ids": list(ids)} if req.return_token_ids else {}))
            yield sse(CompletionResponse(id=rid, model=req.model, choices=[choice]))
        else:
            if req.stream_options is not None and req.stream_options.include_usage:
                yield sse(CompletionResponse(id=rid, model=req.model, choices=[],
                                             usage=_usage(prompts, [f for f in finals if f is not None], req.n)))
    except Exception as e:  # the engine stopped mid-stream: the status line is sent, so say it in-band
        yield sse(engine_failed(f"generation failed: {e}").body())
    finally:
        watcher.cancel()
    yield SSE_DONE


def choice_params_stop(req) -> list[str]:
    if req.stop is None:
        return []
    return [req.stop] if isinstance(req.stop, str) else list(req.stop)
