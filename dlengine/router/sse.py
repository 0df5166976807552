"""Server-sent events the router writes itself: a complete answer (a prefill server that
finished the request alone) as the chunks a streaming client expects, and an in-band error."""

from __future__ import annotations

import json
from typing import Iterator


def _event(payload: dict | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


DONE = _event("[DONE]")


def error_event(message: str, code: str = "backend_failed") -> bytes:
    return _event({"error": {"message": message, "type": "server_error", "param": None, "code": code}})


def as_stream(answer: dict, include_usage: bool) -> Iterator[bytes]:
    """A complete /v1/completions or /v1/chat/completions answer as SSE chunks."""
    head = {k: answer.get(k) for k in ("id", "created", "model")}
    chat = answer.get("object") == "chat.completion"
    for choice in answer.get("choices", []):
        if chat:
            message = choice.get("message") or {}
            delta = {"role": "assistant", "content": message.get("content")}
            if message.get("tool_calls"):
                delta["tool_calls"] = [{**call, "index": i} for i, call in enumerate(message["tool_calls"])]
            chunk = {"index": choice.get("index", 0), "delta": delta, "logprobs": choice.get("logprobs"),
                     "finish_reason": choice.get("finish_reason")}
            yield _event({**head, "object": "chat.completion.chunk", "choices": [chunk], "usage": None})
        else:
            yield _event({**head, "object": "text_completion", "choices": [choice], "usage": None})
    if include_usage:
        kind = "chat.completion.chunk" if chat else "text_completion"
        yield _event({**head, "object": kind, "choices": [], "usage": answer.get("usage")})
    yield DONE
