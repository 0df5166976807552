"""A small real OpenAI-compatible streaming server over a real dlengine Engine, for testing the
`dlengine bench serve` client without `dlengine serve` (built on another branch).

FastAPI + uvicorn on a free localhost port, one thread stepping the engine, chunks in OpenAI's
format (/v1/completions `text_completion` chunks, /v1/chat/completions `chat.completion.chunk`
deltas, a usage chunk when `stream_options.include_usage` is set, then `data: [DONE]`). It keeps a
log of what the engine generated per request so a test can check the client's counts against it.
`faults` turns on failure modes: every Nth request answered with HTTP 503, or stalled forever
after its first chunk, and `include_usage=False` ignores stream_options (a server without usage).
"""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from dlengine import Engine, SamplingParams


@dataclass
class ServedRequest:
    prompt_tokens: int
    completion_tokens: int
    text_chunks: int  # chunks with non-empty text sent to the client
    engine_ttft_s: float | None  # the engine's own timings (RequestMetrics), without HTTP
    engine_e2e_s: float | None


@dataclass
class Faults:
    http_error_every: int = 0  # every Nth request (1-based count) gets HTTP 503
    stall_every: int = 0  # every Nth request sends one chunk, then nothing more
    include_usage: bool = True  # False: ignore stream_options.include_usage
    received: int = 0  # requests received so far (what "every Nth" counts)


class EngineLoop:
    """Owns the engine: requests are handed over through a queue and stepped on one thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.incoming: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.stopping = False
        self.thread.start()

    def submit(self, prompt, params: SamplingParams, on_output) -> None:
        self.incoming.put((prompt, params, on_output))

    def _run(self) -> None:
        while not self.stopping:
            block = not self.engine.has_unfinished_requests()
            try:
                while True:
                    prompt, params, on_output = self.incoming.get(block=block, timeout=0.05 if block else None)
                    block = False
                    try:
                        self.engine.add_request(prompt, params, on_output=on_output)
                    except Exception as e:  # noqa: BLE001 -- reported to the request, not fatal
                        on_output(e)
            except queue.Empty:
                pass
            if self.engine.has_unfinished_requests():
                self.engine.step()

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(timeout=10)


def make_app(engine: Engine, model_name: str, faults: Faults, log: list[ServedRequest]):
    app = FastAPI()
    loop_owner = EngineLoop(engine)
    app.state.engine_loop = loop_owner

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "dlengine-test"}]}

    async def handle(req: Request, chat: bool):
        body = await req.json()
        faults.received += 1
        n = faults.received
        if faults.http_error_every and n % faults.http_error_every == 0:
            return JSONResponse({"error": {"message": f"overloaded (request {n})", "type": "server_error"}}, 503)
        if chat:
            prompt = "\n".join(m["content"] for m in body["messages"])
        else:
            prompt = body["prompt"]
        params = SamplingParams(max_tokens=body.get("max_tokens", 16), temperature=body.get("temperature", 1.0),
                                ignore_eos=bool(body.get("ignore_eos", False)))
        usage_wanted = faults.include_usage and bool((body.get("stream_options") or {}).get("include_usage"))
        stall = bool(faults.stall_every and n % faults.stall_every == 0)
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        loop_owner.submit(prompt, params, lambda o: loop.call_soon_threadsafe(outputs.put_nowait, o))
        return StreamingResponse(stream(outputs, chat, usage_wanted, stall), media_type="text/event-stream")

    async def stream(outputs: asyncio.Queue, chat: bool, usage_wanted: bool, stall: bool):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:12]}"
        created = int(time.time())
        base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": model_name}

        def event(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        if chat:
            yield event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                              "finish_reason": None}]})
        sent_text = ""
        chunks = 0
        while True:
            out = await outputs.get()
            if isinstance(out, Exception):
                yield event({"error": {"message": str(out), "type": "invalid_request_error"}})
                return
            delta = out.text[len(sent_text):]
            sent_text = out.text
            finish = out.finish_reason if out.finished else None
            if delta or finish:
                choice = {"index": 0, "finish_reason": finish}
                if chat:
                    choice["delta"] = {"content": delta} if delta else {}
                else:
                    choice.update(text=delta, logprobs=None)
                chunks += bool(delta)
                yield event({**base, "choices": [choice]})
                if stall and chunks:
                    await asyncio.sleep(3600)
            if out.finished:
                break
        log.append(ServedRequest(len(out.prompt_token_ids), len(out.token_ids), chunks, out.metrics.ttft,
                                 out.metrics.e2e_latency))
        if usage_wanted:
            p, c = len(out.prompt_token_ids), len(out.token_ids)
            yield event({**base, "choices": [], "usage": {"prompt_tokens": p, "completion_tokens": c,
                                                           "total_tokens": p + c}})
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(req: Request):
        return await handle(req, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: Request):
        return await handle(req, chat=True)

    return app


class ServerThread:
    """uvicorn serving `make_app` on 127.0.0.1:<free port> in a background thread."""

    def __init__(self, engine: Engine, model_name: str = "tiny-qwen3") -> None:
        import uvicorn

        self.faults = Faults()
        self.log: list[ServedRequest] = []
        self.app = make_app(engine, model_name, self.faults, self.log)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        port = self.sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.app.state.engine_loop.stop()
        self.sock.close()
