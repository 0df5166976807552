"""Plumbing between request streams and HTTP responses: merging the n choices of a request,
collecting final outputs while watching for a client that leaves, taking the new part of each
cumulative output, and server-sent events.
"""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator, Awaitable, Sequence, TypeVar

from fastapi import Request
from pydantic import BaseModel

from dlengine.engine.request import RequestOutput
from dlengine.serve.async_engine import RequestStream

T = TypeVar("T")
_DONE = object()


async def merge(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) from all streams as they arrive. Leaving early aborts every
    request still running; an error in one stream ends the merge with that error."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream.outputs():
                q.put_nowait((i, out))
        except Exception as e:
            q.put_nowait((i, e))
        finally:
            q.put_nowait((i, _DONE))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await q.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.close()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(streams: Sequence[RequestStream]) -> list[RequestOutput]:
    """The final output of every stream, in order."""
    finals: list[RequestOutput | None] = [None] * len(streams)
    async for i, out in merge(streams):
        if out.finished:
            finals[i] = out
    return finals  # type: ignore[return-value]


class ClientDisconnected(Exception):
    """The client closed the connection before the answer was ready."""


async def _disconnected(request: Request) -> None:
    """Returns when the client has closed the connection (the body is read by then, so the next
    ASGI message is the disconnect notice)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so aborting its requests) if the client goes away."""
    job = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({job, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if job in done:
            return job.result()
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)
        raise ClientDisconnected()
    finally:
        watcher.cancel()
        if not job.done():
            job.cancel()


def abort_on_disconnect(request: Request, streams: Sequence[RequestStream]) -> asyncio.Task:
    """A task that aborts the streams' requests as soon as the client goes away (cancel it when
    the response is done). A streamed response would otherwise notice only at its next write,
    which for a request still waiting to be scheduled may be a long time later."""

    async def watch() -> None:
        await _disconnected(request)
        for s in streams:
            s.close()

    return asyncio.ensure_future(watch())


class Delta:
    """The not-yet-sent part of one choice's cumulative outputs. Text that could still be cut by
    a stop string (its last len(longest stop) - 1 characters) is held back until the next output
    or the final one. Repeated or older outputs yield nothing."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text_sent = 0
        self.tokens_sent = 0

    def advance(self, out: RequestOutput) -> tuple[str, list[int], list[dict[int, float]] | None]:
        n = len(out.token_ids)
        new_ids = out.token_ids[self.tokens_sent:n]
        new_logprobs = out.logprobs[self.tokens_sent:n] if out.logprobs is not None else None
        self.tokens_sent = max(self.tokens_sent, n)
        limit = len(out.text) if out.finished else len(out.text) - self.hold
        new_text = out.text[self.text_sent:limit] if limit > self.text_sent else ""
        self.text_sent = max(self.text_sent, limit)
        return new_text, new_ids, new_logprobs


def sse(payload: BaseModel | dict) -> str:
    body = payload.model_dump_json(exclude_none=False) if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {body}\n\n"


SSE_DONE = "data: [DONE]\n\n"
