"""AsyncEngine: one thread owns the Engine and steps it; coroutines talk to it.

The engine is not thread-safe (add_request, prompt_logits and step touch the same scheduler), so
every call into it runs on the stepping thread: coroutines queue a command and await its result.
Between steps the thread runs the queued commands (admissions, aborts, scoring, metric
snapshots); when no request is left it sleeps on the command queue.

Each request's outputs reach its coroutine through `Engine.add_request(on_output=...)`, called on
the stepping thread, which hands them to the request's asyncio queue with
`loop.call_soon_threadsafe`. A consumer that goes away (a client that disconnected) aborts its
request at once: the abort is the next command the thread runs, before the next step, so the
request's KV blocks are free one step later.

Outputs are cumulative (`token_ids`, `text`, `logprobs`); consumers should take what is new from
those, not from `new_token_ids`: `prompt_logits` steps the engine itself and the front hands the
outputs of those steps to listeners again at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Any, AsyncIterator, Callable, Sequence

from dlengine.engine.engine import Engine
from dlengine.engine.request import RequestOutput
from dlengine.sampling_params import SamplingParams

logger = logging.getLogger("dlengine.serve")


class EngineDeadError(RuntimeError):
    """The stepping thread stopped on an engine error; the server can no longer generate."""


class AsyncEngine:
    def __init__(self, engine: Engine, *, idle_wait_s: float = 0.05,
                 on_finish: Callable[[RequestOutput], None] | None = None,
                 on_abort: Callable[[str], None] | None = None) -> None:
        self.engine = engine
        self.idle_wait_s = idle_wait_s
        self.on_finish = on_finish  # called on the event loop with each request's final output
        self.on_abort = on_abort  # called with the id of each request its consumer abandoned
        self.error: BaseException | None = None  # why the stepping thread stopped, if it did
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._queues: dict[str, asyncio.Queue] = {}  # live requests; touched on the stepping thread only
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the stepping thread; call from the event loop that will await results."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="dlengine-stepper", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop stepping (requests still running are left to `engine.close()`)."""
        self._stop.set()
        self._commands.put(None)  # wake the thread
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ coroutine API
    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` on the stepping thread and return its result (or raise its error)."""
        if not self.healthy:
            raise EngineDeadError(f"the engine stopped: {self.error!r}" if self.error else "the engine is not running")
        fut = self._loop.create_future()
        self._commands.put((fn, args, fut))
        if self.error is not None:  # the thread died after the check above: fail what it left behind
            self._fail_commands(self.error)
        return await fut

    def abort(self, request_id: str) -> None:
        """Abort a request; safe from any coroutine or thread, applied before the next step."""
        self._commands.put((self._abort, (request_id,), None))

    async def add(self, jobs: Sequence[tuple], kv_transfer_params: dict | None = None,
                  ec_transfer_params: dict | None = None) -> list["RequestStream"]:
        """Admit requests given as (prompt, params, request id), all in one command so they start
        in the same step. If one is refused (InvalidRequestError, raised here before any output)
        none of them runs. `kv_transfer_params` (a decode engine, one job) pull the prompt's KV;
        `ec_transfer_params` (one job) its images' embeddings from an encoder engine."""
        queues = [asyncio.Queue() for _ in jobs]
        try:
            await self.call(self._add_all, list(jobs), queues, kv_transfer_params, ec_transfer_params)
        except asyncio.CancelledError:  # admitted or not, nobody will read them
            for _, _, rid in jobs:
                self.abort(rid)
            raise
        return [RequestStream(self, rid, q) for (_, _, rid), q in zip(jobs, queues)]

    async def prompt_logits(self, token_ids: Sequence[int]):
        return await self.call(self.engine.prompt_logits, list(token_ids))

    # ------------------------------------------------------------------ the stepping thread
    def _add(self, prompt, params: SamplingParams, request_id: str, q: asyncio.Queue,
             kv_transfer_params: dict | None = None, ec_transfer_params: dict | None = None) -> None:
        loop = self._loop

        def on_output(out: RequestOutput) -> None:
            if out.finished:
                self._queues.pop(out.request_id, None)
            _deliver(loop, q, out)

        self.engine.add_request(prompt, params, request_id=request_id, on_output=on_output,
                                kv_transfer_params=kv_transfer_params, ec_transfer_params=ec_transfer_params)
        self._queues[request_id] = q

    def _add_all(self, jobs, queues, kv_transfer_params: dict | None = None,
                 ec_transfer_params: dict | None = None) -> None:
        added = []
        try:
            for (prompt, params, rid), q in zip(jobs, queues):
                self._add(prompt, params, rid, q, kv_transfer_params, ec_transfer_params)
                added.append(rid)
        except Exception:
            for rid in added:
                self._queues.pop(rid, None)
                self.engine.abort(rid)
            raise

    def _abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._run_commands(block=not self.engine.has_unfinished_requests())
                if self._stop.is_set():
                    break
                if self.engine.has_unfinished_requests():
                    self.engine.step()
        except BaseException as e:  # an engine bug or a dead worker: every waiting request learns of it
            logger.exception("the engine's stepping thread stopped")
            self.error = e
            for q in self._queues.values():
                _deliver(self._loop, q, e)
            self._queues.clear()
            self._fail_commands(e)

    def _run_commands(self, block: bool) -> None:
        try:
            item = self._commands.get(timeout=self.idle_wait_s) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            fn, args, fut = item
            try:
                result = fn(*args)
            except Exception as e:  # the command's own error (a bad request): its caller gets it
                if fut is not None:
                    _resolve(self._loop, fut, error=e)
            else:
                if fut is not None:
                    _resolve(self._loop, fut, result=result)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return

    def _fail_commands(self, error: BaseException) -> None:
        while True:
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return
            if item is not None and item[2] is not None:
                _resolve(self._loop, item[2], error=EngineDeadError(f"the engine stopped: {error!r}"))


class RequestStream:
    """One admitted request's outputs. Iterate `outputs()` until the final one; leaving early, or
    `close()` before iterating, aborts the request."""

    def __init__(self, engine: AsyncEngine, request_id: str, q: asyncio.Queue) -> None:
        self.engine, self.request_id, self._queue = engine, request_id, q
        self.finished = False
        self._held = None  # the output `first()` waited for, yielded first by `outputs()`

    async def first(self) -> RequestOutput:
        """Wait for the request's first output without taking it: `outputs()` yields it first.
        If the wait is cancelled (the client went away), the request is aborted."""
        try:
            item = await self._queue.get()
        except asyncio.CancelledError:
            self.close()
            raise
        self._held = item
        if isinstance(item, BaseException):
            raise EngineDeadError(f"the engine stopped: {item!r}") from item
        return item

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                item, self._held = (self._held, None) if self._held is not None else (await self._queue.get(), None)
                if isinstance(item, BaseException):
                    self.finished = True  # the engine is gone: nothing to abort
                    raise EngineDeadError(f"the engine stopped: {item!r}") from item
                if item.finished:
                    self.finished = True
                    if self.engine.on_finish is not None:
                        self.engine.on_finish(item)
                yield item
        finally:
            self.close()

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)
            if self.engine.on_abort is not None:
                self.engine.on_abort(self.request_id)


def _deliver(loop: asyncio.AbstractEventLoop, q: asyncio.Queue, item) -> None:
    try:
        loop.call_soon_threadsafe(q.put_nowait, item)
    except RuntimeError:  # the event loop is closed: the server is shutting down
        pass


def _resolve(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, result=None, error: BaseException | None = None):
    def settle() -> None:
        if fut.done():  # its caller was cancelled meanwhile
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:
        pass
