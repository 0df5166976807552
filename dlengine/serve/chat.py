"""POST /v1/chat/completions: messages through the checkpoint's chat template, n choices,
streamed or not, logprobs, and tool calls parsed out of the generated text."""

from __future__ import annotations

from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from dlengine.disagg.encoder_client import EncoderPullError
from dlengine.engine.request import RequestOutput
from dlengine.serve.errors import bad_request, engine_failed
from dlengine.serve.media import image_bytes, video_input
from dlengine.serve.logprobs import chat_logprobs
from dlengine.serve.params import MAX_TOP_LOGPROBS, choice_params, sampling_params
from dlengine.serve.pd import check_ec_request, check_pd_request, encoder_pull_failed, handoff_params, hold_prefill
from dlengine.serve.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                                     ChatCompletionRequest, ChatCompletionResponse, DeltaMessage, DeltaToolCall,
                                     FunctionCall, ImagePart, TextPart, ToolCall, Usage, VideoFramesPart,
                                     VideoURLPart, new_id)
from dlengine.serve.state import ServerState
from dlengine.serve.streams import SSE_DONE, Delta, abort_on_disconnect, collect, merge, sse, unless_disconnected
from dlengine.serve.tool_parsers import ParsedToolCall, StreamingToolParser


def render_prompt(state: ServerState, req: ChatCompletionRequest) -> tuple[list[int], list[bytes], list, str]:
    """The chat template applied to the messages (and tools), as token ids; the encoded images of
    the messages' image parts and the videos of their video parts, in order (the template writes
    one placeholder each); and the rendered text."""
    tok = state.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise bad_request("this model has no chat template: use /v1/completions", param="messages")
    messages, images, videos = [], [], []
    media_path = state.config.allowed_local_media_path
    for i, m in enumerate(req.messages):
        msg = m.model_dump(exclude_none=True)
        if isinstance(m.content, list) and all(isinstance(part, TextPart) for part in m.content):
            msg["content"] = "".join(part.text for part in m.content)  # text parts: one string
        elif isinstance(m.content, list):  # with images or videos: the template renders each part
            for k, part in enumerate(m.content):
                if isinstance(part, ImagePart):
                    images.append(image_bytes(part.image_url.url, media_path, f"messages[{i}] image {len(images)}"))
                elif isinstance(part, (VideoURLPart, VideoFramesPart)):
                    videos.append(video_input(part, media_path, f"messages[{i}] video {len(videos)}"))
                    # Qwen's templates write a video placeholder for a part of type "video"
                    msg["content"][k] = {"type": "video"}
        messages.append(msg)
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    try:
        text = tok.apply_chat_template(messages, tools=tools, tokenize=False,
                                       add_generation_prompt=req.add_generation_prompt,
                                       **(req.chat_template_kwargs or {}))
    except Exception as e:  # the template's own checks (role order, ...) or bad kwargs
        raise bad_request(f"the chat template cannot render these messages: {e}", param="messages") from None
    return list(tok.encode(text, add_special_tokens=False)), images, videos, text


def engine_prompt(state: ServerState, ids: list[int], text: str, images: list, videos: list):
    """The prompt for the engine: token ids, with the images and videos when there are any. With
    videos the text goes instead when the engine's tokenisation of it gives the same ids: the
    engine then writes the frame timestamps into the text before tokenising, exactly as
    transformers' processor does (in token ids a timestamp is tokenised on its own)."""
    if not images and not videos:
        return ids
    prompt = text if videos and list(state.tokenizer.encode(text)) == ids else ids
    return {"prompt": prompt, "images": images, "videos": videos}


def _parse_tools(req: ChatCompletionRequest) -> bool:
    """Whether to look for tool calls in the output. Forcing a call ("required", a named
    function) needs constrained decoding, which the engine does not have: refused, not faked."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", param="tool_choice")
        return False
    if choice == "required" or (choice is not None and not isinstance(choice, str)):
        raise bad_request("tool_choice 'required' or a named function needs constrained decoding, which this "
                          "server does not support; use 'auto' or 'none'", param="tool_choice")
    return choice != "none"


async def create_chat_completion(req: ChatCompletionRequest, raw: Request):
    state: ServerState = raw.app.state.server
    state.check_model(req.model)
    parse_tools = _parse_tools(req)
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
        raise bad_request(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]", param="top_logprobs")
    if req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", param="top_logprobs")
    prompt, images, videos, text = render_prompt(state, req)
    job_prompt = engine_prompt(state, prompt, text, images, videos)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = sampling_params(req, max_tokens=max_tokens, default_max_tokens=max(1, state.max_model_len - len(prompt)),
                             logprobs=(req.top_logprobs or 0) if req.logprobs else None, vocab_size=state.vocab_size)
    kv, prefill_url = check_pd_request(state, req.kv_transfer_params, stream=req.stream, num_choices=req.n)
    ec = check_ec_request(state, req.ec_transfer_params, has_media=bool(images or videos), num_choices=req.n)
    rid = new_id("chatcmpl")
    try:
        streams = await state.async_engine.add(
            [(job_prompt, choice_params(params, c), f"{rid}-{c}") for c in range(req.n)], kv, ec)
    except EncoderPullError as e:
        raise encoder_pull_failed(str(e)) from None
    if ec is not None and state.async_engine.engine.config.encoder_cache.pull_mode == "async":
        await _pulled_or_424(raw, streams[0])
    if kv is not None:
        hold_prefill(prefill_url, req.kv_transfer_params, streams[0])
    if req.stream:
        return StreamingResponse(_stream(state, req, rid, prompt, streams, parse_tools, raw),
                                 media_type="text/event-stream")
    finals = await unless_disconnected(raw, collect(streams))
    choices = []
    for c, out in enumerate(finals):
        if out.finish_reason == "error":
            raise engine_failed(f"generation failed: {out.error}")
        content, calls = (state.tool_parser().extract(out.text) if parse_tools else (out.text, []))
        message = AssistantMessage(content=content, tool_calls=[_tool_call(x) for x in calls])
        logprobs = (chat_logprobs(out.token_ids, out.logprobs or [], state.text_of, req.top_logprobs or 0)
                    if req.logprobs else None)
        choices.append(ChatChoice(index=c, message=message, logprobs=logprobs, finish_reason=_finish(out, bool(calls)),
                                  stop_reason=out.stop_reason))
    return ChatCompletionResponse(id=rid, model=req.model, choices=choices, usage=_usage(prompt, finals),
                                  kv_transfer_params=handoff_params(state, finals))


async def _pulled_or_424(raw: Request, stream) -> None:
    """An asynchronous embedding pull ends before the request's first output: a failed one ends
    the request with no tokens. Wait for that output, so a failed pull is still answered 424
    before any byte (a router then encodes elsewhere), as the synchronous pull was."""
    first = await unless_disconnected(raw, stream.first())
    if first.finished and first.finish_reason == "error" and not first.token_ids:
        async for _ in stream.outputs():  # hand the final output to the stream's bookkeeping
            pass
        raise encoder_pull_failed(first.error or "the image and video embedding pull failed")


def _tool_call(call: ParsedToolCall) -> ToolCall:
    return ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))


def _finish(out: RequestOutput, called_tools: bool) -> str | None:
    if not out.finished:
        return None
    if called_tools and out.finish_reason == "stop":
        return "tool_calls"
    return out.finish_reason


def _usage(prompt: list[int], finals) -> Usage:
    completion = sum(len(o.token_ids) for o in finals if o is not None)
    # the engine's prompt: with images, each placeholder expanded to the image's tokens
    num_prompt = next((len(o.prompt_token_ids) for o in finals if o is not None), len(prompt))
    return Usage(prompt_tokens=num_prompt, completion_tokens=completion, total_tokens=num_prompt + completion)


async def _stream(state: ServerState, req: ChatCompletionRequest, rid: str, prompt: list[int], streams,
                  parse_tools: bool, raw: Request) -> AsyncIterator[str]:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    deltas = [Delta(stop) for _ in streams]
    parsers = [StreamingToolParser(state.tool_parser()) if parse_tools else None for _ in streams]
    n_calls = [0] * len(streams)
    finals: list[RequestOutput | None] = [None] * len(streams)
    include_usage = req.stream_options is not None and req.stream_options.include_usage

    def chunk(choice: ChatChunkChoice) -> str:
        return sse(ChatCompletionChunk(id=rid, model=req.model, choices=[choice]))

    watcher = abort_on_disconnect(raw, streams)
    try:
        for c in range(len(streams)):
            yield chunk(ChatChunkChoice(index=c, delta=DeltaMessage(role="assistant", content="")))
        async for c, out in merge(streams):
            if out.finished:
                finals[c] = out
                if out.finish_reason == "error":
                    yield sse(engine_failed(f"generation failed: {out.error}").body())
                    break
            text, ids, lps = deltas[c].advance(out)
            calls: list[ParsedToolCall] = []
            if parsers[c] is not None:
                text, calls = parsers[c].update(out.text[:deltas[c].text_sent], final=out.finished)
            delta = DeltaMessage(content=text or None)
            if calls:
                delta.tool_calls = [DeltaToolCall(index=n_calls[c] + i, id=x.id, type="function",
                                                  function=FunctionCall(name=x.name, arguments=x.arguments))
                                    for i, x in enumerate(calls)]
                n_calls[c] += len(calls)
            logprobs = (chat_logprobs(ids, lps or [], state.text_of, req.top_logprobs or 0)
                        if req.logprobs and ids else None)
            if delta.content or delta.tool_calls or logprobs or out.finished:
                yield chunk(ChatChunkChoice(index=c, delta=delta, logprobs=logprobs,
                                            finish_reason=_finish(out, n_calls[c] > 0)))
        else:
            if include_usage:
                yield sse(ChatCompletionChunk(id=rid, model=req.model, choices=[], usage=_usage(prompt, finals)))
    except Exception as e:  # the engine stopped mid-stream: the status line is sent, so say it in-band
        yield sse(engine_failed(f"generation failed: {e}").body())
    finally:
        watcher.cancel()
    yield SSE_DONE
