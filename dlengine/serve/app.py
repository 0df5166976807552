"""The FastAPI application: routes, guards, error handlers, and the engine's lifetime in it.

    app = create_app(engine, ServeConfig(served_model_name="tiny-qwen3"))
    uvicorn.run(app, host="127.0.0.1", port=8000)

The app starts the stepping thread when it starts and stops it when it stops; the engine itself
belongs to the caller (close it after the server has stopped).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response

from dlengine import __version__
from dlengine.config import ConfigError
from dlengine.engine.engine import Engine
from dlengine.serve.async_engine import AsyncEngine, EngineDeadError
from dlengine.serve.chat import create_chat_completion
from dlengine.serve.completions import create_completion
from dlengine.serve.errors import install_error_handlers, unavailable
from dlengine.serve.guards import BodyLimitMiddleware, ConcurrencyLimitMiddleware, require_api_key
from dlengine.serve.metrics import ServerMetrics, engine_snapshot
from dlengine.serve.protocol import ChatCompletionResponse, CompletionResponse, ErrorResponse, ModelCard, ModelList
from dlengine.serve.state import ServeConfig, ServerState
from dlengine.serve.streams import ClientDisconnected
from dlengine.serve.tool_parsers import tool_parser_for

logger = logging.getLogger("dlengine.serve")

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 413, 429, 500, 503)}


def create_app(engine: Engine, config: ServeConfig) -> FastAPI:
    if getattr(engine.config, "speculative_forced_acceptance", None) is not None:
        # a benchmarking mode: accepted drafts are not the model's tokens, so never serve them
        raise ConfigError("this engine was built with speculative(..., forced_acceptance=...), a benchmarking mode "
                          "whose outputs are not the model's; build it without forced_acceptance to serve it")
    metrics = ServerMetrics(config.served_model_name)
    async_engine = AsyncEngine(engine, on_finish=metrics.request_finished, on_abort=metrics.request_aborted)
    parser = tool_parser_for(config.tool_call_parser, engine.config.model.architecture)
    state = ServerState(engine, async_engine, config, metrics, parser)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        registration = None
        try:
            if config.ctrl_address:
                from dlengine.serve.registration import register_server

                registration = register_server(
                    config.ctrl_address, http_url=config.public_url or "", role=config.mode,
                    model=config.served_model_name, scope=config.ctrl_scope,
                    engine_id=(engine.describe().get("kv_transfer") or {}).get("engine_id"))
            yield
        finally:
            if registration is not None:
                registration.close()
            async_engine.stop()

    app = FastAPI(title="dlengine", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API of a dlengine Engine")
    app.state.server = state
    install_error_handlers(app)

    @app.exception_handler(EngineDeadError)
    async def _dead(request: Request, exc: EngineDeadError):
        return unavailable(str(exc)).response()

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected):
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health():
        if not async_engine.healthy:
            return unavailable(f"the engine stopped: {async_engine.error!r}").response()
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics():
        snapshot = await async_engine.call(engine_snapshot, engine) if async_engine.healthy else {}
        return Response(metrics.render(snapshot), media_type="text/plain; version=0.0.4; charset=utf-8")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=_ERRORS)

    @v1.get("/models", response_model=ModelList)
    async def list_models():
        card = ModelCard(id=config.served_model_name, root=engine.config.model.path,
                         max_model_len=engine.config.max_model_len)
        return ModelList(data=[card])

    v1.add_api_route("/completions", create_completion, methods=["POST"], response_model=CompletionResponse,
                     summary="Create a completion (stream: server-sent events of CompletionResponse chunks)")
    v1.add_api_route("/chat/completions", create_chat_completion, methods=["POST"],
                     response_model=ChatCompletionResponse,
                     summary="Create a chat completion (stream: server-sent events of chat.completion.chunk)")
    app.include_router(v1)

    if config.mode == "prefill":  # PD over HTTP: releasing handed-off KV (serve/pd.py); signed params are the proof
        from dlengine.serve.pd import pd_free, pd_hold

        app.add_api_route("/pd/free", pd_free, methods=["POST"], responses=_ERRORS,
                          summary="Release the pinned KV blocks of a handed-off request")
        app.add_api_route("/pd/hold", pd_hold, methods=["POST"], responses=_ERRORS,
                          summary="Liveness stream of a decode server; the blocks are released when it ends")

    # outermost first: the concurrency bound answers 429 before a body is read
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    app.add_middleware(ConcurrencyLimitMiddleware, limit=config.max_concurrent_requests,
                       on_reject=metrics.rejected.inc)
    return app


__all__ = ["create_app", "ServeConfig"]
