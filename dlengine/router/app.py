"""The router's FastAPI application: OpenAI routes passed to the backends (proxy.py), the pool
kept current in the background (monitor.py), /health and /backends for operators."""

from __future__ import annotations

import asyncio
import hmac
import time
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from dlengine import __version__
from dlengine.router.backends import BackendPool
from dlengine.router.config import RouterConfig
from dlengine.router.metrics import RouterMetrics
from dlengine.router.monitor import monitor
from dlengine.router.policies import Policy
from dlengine.router.proxy import Proxy
from dlengine.serve.errors import APIError, bad_request, install_error_handlers, unauthorized


def create_router_app(config: RouterConfig) -> FastAPI:
    pool = BackendPool()
    for role in ("hybrid", "prefill", "decode", "encode"):
        for url in getattr(config, role):
            pool.add(url, role)
    state: dict = {}
    metrics = RouterMetrics(pool)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # no pool limit: a stream holds its connection; trust_env off: backends are addressed directly
        client = httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
                                   trust_env=False)
        state["proxy"] = Proxy(pool, Policy(config.policy, config.prefix_chars), client, config, metrics)
        task = asyncio.ensure_future(monitor(pool, client, config))
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await client.aclose()

    app = FastAPI(title="dlengine router", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible front for dlengine servers (hybrid, prefill, decode)")
    app.state.pool = pool
    app.state.metrics = metrics
    install_error_handlers(app)

    def check_key(raw: Request) -> None:
        if config.api_key is None:
            return
        given = raw.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
            raise unauthorized()

    async def json_body(raw: Request) -> dict:
        try:
            body = await raw.json()
        except ValueError:
            raise bad_request("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        for name in ("kv_transfer_params", "ec_transfer_params"):  # only the router hands those out
            if name in body:
                raise bad_request(f"{name} are set by the router", param=name)
        return body

    @app.get("/health")
    async def health():
        usable = [b for b in pool.backends.values() if b.healthy]
        if not usable:
            return APIError(503, "no healthy backend", type="server_error").response()
        return {"status": "ok", "backends": len(usable)}

    @app.get("/backends")
    async def backends():
        return {"policy": config.policy, "backends": [b.describe() for b in pool.backends.values()]}

    @app.get("/v1/models")
    async def models(raw: Request):
        check_key(raw)
        for b in sorted((b for b in pool.backends.values() if b.healthy), key=lambda b: b.url):
            try:
                r = await state["proxy"].client.get(f"{b.url}/v1/models", headers=state["proxy"].headers,
                                                    timeout=config.health_timeout_s)
                if r.status_code == 200:
                    return JSONResponse(r.json())
            except httpx.HTTPError:
                continue
        raise APIError(503, "no healthy backend to list models", type="server_error", code="no_backend")

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def route(path: str, raw: Request) -> Response:
        """One client request through the proxy, counted whatever its outcome."""
        start = time.perf_counter()
        status = 500
        try:
            check_key(raw)
            response = await state["proxy"].handle(path, await json_body(raw))
            status = response.status_code
            return response
        except APIError as e:
            status = e.status
            raise
        finally:
            metrics.answered(path, status, time.perf_counter() - start)

    @app.post("/v1/completions")
    async def completions(raw: Request):
        return await route("/v1/completions", raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(raw: Request):
        return await route("/v1/chat/completions", raw)

    return app
