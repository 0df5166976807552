"""Sending one client request to the backends: to a hybrid server, or prefill -> transfer ->
decode; retried elsewhere while nothing has reached the client.

PD: the request goes, not streamed, to a prefill server (policy-chosen); its answer carries
signed `kv_transfer_params` unless it finished alone (EOS first, max_tokens 1), in which case
it is the answer. Otherwise the same request plus those params goes to a decode server, whose
answer (streamed or not, the first token included) is passed through; once that leg is over
the router POSTs /pd/free to the prefill server (the decode server's liveness stream and the
pin timeout free the blocks too, if the router cannot).

EPD: with encoder servers configured (--encode, or discovered with role "encode"), a chat request
with image or video parts first goes to an encoder server's POST /v1/encode; its signed
`ec_transfer_params` go with the request to the prefill (or hybrid) server, which pulls the
embeddings instead of encoding (never to a decode server: the KV it pulls already holds the
images and videos). An encoder that cannot be reached is dropped and another tried; with none left the
request goes on without params (the prefill server encodes). A prefill/hybrid server that cannot
pull (424 `encoder_pull_failed`: the encoder died between the two legs) gets the request again
without params, and the encoder is dropped until its health check passes.

Failures: a backend that cannot be reached, resets the connection, answers 502/503 or times out
before the first byte is dropped (until a health check sees it again) and the request is tried
on another: another decode server with the same params, then (params freed) a hybrid server,
or a decode server computing the request itself. Once bytes have reached the client the request
cannot move: a backend that dies or stays silent longer than `stream_timeout_s` ends the stream
with an in-band `data: {"error": ...}` event and `[DONE]`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Callable

import httpx
from fastapi.responses import JSONResponse, Response, StreamingResponse

from dlengine.router.backends import Backend, BackendPool
from dlengine.router.config import RouterConfig
from dlengine.router.metrics import RouterMetrics
from dlengine.router.policies import Policy
from dlengine.router.sse import DONE, as_stream, error_event
from dlengine.serve.errors import APIError

logger = logging.getLogger("dlengine.router")
_DEAD_STATUS = (502, 503, 504)


class BackendFailed(Exception):
    """A backend failed before anything reached the client: the request may go elsewhere."""


class EncoderPullFailed(Exception):
    """The prefill/hybrid server could not pull the embeddings (answered 424)."""


ENCODER_PULL_FAILED = 424


MEDIA_PARTS = frozenset({"image_url", "video", "video_url"})


def has_media(body: dict) -> bool:
    """Whether a chat request has image or video parts: only those are worth an encoder's round
    trip."""
    for m in body.get("messages") or []:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in MEDIA_PARTS for p in content):
            return True
    return False


class Proxy:
    def __init__(self, pool: BackendPool, policy: Policy, client: httpx.AsyncClient, config: RouterConfig,
                 metrics: RouterMetrics | None = None) -> None:
        self.pool, self.policy, self.client, self.config, self.metrics = pool, policy, client, config, metrics
        self._background: set[asyncio.Task] = set()
        # only /v1 calls carry the key: /pd/* is signed with the PD secret, /health is open
        self.headers = {"Authorization": f"Bearer {config.backend_api_key}"} if config.backend_api_key else {}

    async def handle(self, path: str, body: dict) -> Response:
        attempts = len(self.pool.backends) + 1  # each failure drops a backend, so this bounds the retries
        for _ in range(attempts):
            encoded = None
            try:
                encoded = await self._encode(path, body)
                if isinstance(encoded, Response):
                    return encoded  # the encoder refused the request (a bad image or video): the client's error
                ec = encoded[1] if encoded else None
                if self.pool.usable("prefill") and self.pool.usable("decode"):
                    return await self._disaggregated(path, body, ec)
                hybrids = self.pool.usable("hybrid")
                candidates = hybrids or self.pool.usable("decode")  # decode servers compute too
                if not candidates:
                    break
                first = {**body, "ec_transfer_params": ec} if ec is not None and hybrids else body
                return await self._forward(self.policy.choose(candidates, body, "hybrid"), path, first,
                                           encoder_leg=first is not body)
            except EncoderPullFailed as e:
                logger.warning("retrying without the encoder: %s", e)
                self.pool.mark_down(encoded[0], str(e))
                self._count_retry()
            except BackendFailed as e:
                if encoded:
                    self._spawn(self._free_ec(*encoded))
                logger.warning("retrying elsewhere: %s", e)
                self._count_retry()
        raise APIError(503, "no backend can take this request (none healthy: see the router's /backends)",
                       type="server_error", code="no_backend")

    # ------------------------------------------------------------------ EPD
    async def _encode(self, path: str, body: dict):
        """(encoder, signed ec_transfer_params) for a chat request with images or videos when
        encoder servers are usable; None to go on without; a Response when the encoder refused it."""
        if path != "/v1/chat/completions" or not has_media(body):
            return None
        while encoders := self.pool.usable("encode"):
            encoder = self.policy.choose(encoders, body, "encode")
            try:
                status, answer = await self._post_json(encoder, "/v1/encode", body)
            except BackendFailed as e:
                logger.warning("encoder leg failed, trying another encoder: %s", e)
                self._count_retry()
                continue
            if status != 200 or not isinstance(answer, dict):
                return JSONResponse(answer, status_code=status)
            if self.metrics is not None:
                self.metrics.pd_paths.labels("encode").inc()
            ec = answer.get("ec_transfer_params")
            return (encoder, ec) if ec is not None else None
        return None

    async def _free_ec(self, encoder: Backend, signed: dict) -> None:
        try:
            await self.client.post(f"{encoder.url}/ec/free", json={"ec_transfer_params": signed},
                                   timeout=self.config.health_timeout_s)
        except httpx.HTTPError as e:  # its pin timeout frees them
            logger.warning("/ec/free on %s failed: %r", encoder.url, e)

    # ------------------------------------------------------------------ PD
    async def _disaggregated(self, path: str, body: dict, ec: dict | None = None) -> Response:
        prefill = self.policy.choose(self.pool.usable("prefill"), body, "prefill")
        first = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        if ec is not None:
            first["ec_transfer_params"] = ec
        status, answer = await self._post_json(prefill, path, first)
        if status == ENCODER_PULL_FAILED and ec is not None:
            raise EncoderPullFailed(f"{prefill.url} could not pull the image embeddings: {answer!r}")
        if status != 200 or not isinstance(answer, dict):
            return JSONResponse(answer, status_code=status)  # the client's own error (400, 404, ...)
        signed = answer.pop("kv_transfer_params", None)
        if signed is None:  # the prefill server finished the request alone: that is the answer
            if self.metrics is not None:
                self.metrics.pd_paths.labels("prefill_only").inc()
            if body.get("stream"):
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                return StreamingResponse(_iterate(as_stream(answer, include_usage)), media_type="text/event-stream")
            return JSONResponse(answer)

        def free() -> None:
            self._spawn(self._free(prefill, signed))

        second = {**body, "kv_transfer_params": signed}
        if self.metrics is not None:
            self.metrics.pd_paths.labels("prefill_decode").inc()
        while decodes := self.pool.usable("decode"):
            decode = self.policy.choose(decodes, body, "decode")
            try:
                return await self._forward(decode, path, second, on_done=free)
            except BackendFailed as e:
                logger.warning("decode leg failed, trying another decode server: %s", e)
                self._count_retry()
        free()
        raise BackendFailed("every decode server failed")

    async def _free(self, prefill: Backend, signed: dict) -> None:
        try:
            await self.client.post(f"{prefill.url}/pd/free", json={"kv_transfer_params": signed},
                                   timeout=self.config.health_timeout_s)
        except httpx.HTTPError as e:  # its pin timeout (or the decode server's liveness stream) frees them
            logger.warning("/pd/free on %s failed: %r", prefill.url, e)

    def _count_retry(self) -> None:
        if self.metrics is not None:
            self.metrics.retries.inc()

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ one backend
    def _timeout(self, stream: bool) -> httpx.Timeout:
        read = self.config.stream_timeout_s if stream else self.config.request_timeout_s
        return httpx.Timeout(read, connect=self.config.connect_timeout_s)

    async def _post_json(self, backend: Backend, path: str, body: dict) -> tuple[int, object]:
        backend.in_flight += 1
        try:
            r = await self.client.post(f"{backend.url}{path}", json=body, headers=self.headers,
                                       timeout=self._timeout(False))
            if r.status_code in _DEAD_STATUS:
                self.pool.mark_down(backend, f"answered {r.status_code}")
                raise BackendFailed(f"{backend.url} answered {r.status_code}")
            return r.status_code, r.json()
        except (httpx.HTTPError, ValueError) as e:
            self.pool.mark_down(backend, repr(e))
            raise BackendFailed(f"{backend.url}: {e!r}") from None
        finally:
            backend.in_flight -= 1

    async def _forward(self, backend: Backend, path: str, body: dict,
                       on_done: Callable[[], None] | None = None, encoder_leg: bool = False) -> Response:
        """The backend's answer, streamed through when the client streams. Raises BackendFailed
        (and calls nothing) when it fails before its first byte, and EncoderPullFailed when it
        answers 424 to a request carrying ec_transfer_params (`encoder_leg`)."""
        stream = bool(body.get("stream"))
        backend.in_flight += 1
        response = None
        try:
            request = self.client.build_request("POST", f"{backend.url}{path}", json=body, headers=self.headers,
                                                timeout=self._timeout(stream))
            response = await self.client.send(request, stream=True)
            if response.status_code in _DEAD_STATUS:
                raise BackendFailed(f"{backend.url} answered {response.status_code}")
            if not stream or response.status_code != 200:
                content = await response.aread()
                await response.aclose()
                backend.in_flight -= 1
                if encoder_leg and response.status_code == ENCODER_PULL_FAILED:
                    raise EncoderPullFailed(f"{backend.url} could not pull the image embeddings: {content[:300]!r}")
                if on_done is not None:
                    on_done()
                return Response(content, status_code=response.status_code,
                                media_type=response.headers.get("content-type", "application/json"))
            chunks = response.aiter_raw()
            first = await chunks.__anext__()
        except (httpx.HTTPError, BackendFailed, StopAsyncIteration) as e:
            if response is not None:
                await response.aclose()
            backend.in_flight -= 1
            self.pool.mark_down(backend, repr(e))
            raise BackendFailed(f"{backend.url}: {e!r}") from None
        return StreamingResponse(self._relay(backend, response, first, chunks, on_done),
                                 media_type="text/event-stream")

    async def _relay(self, backend: Backend, response: httpx.Response, first: bytes, chunks: AsyncIterator[bytes],
                     on_done: Callable[[], None] | None) -> AsyncIterator[bytes]:
        tail = b""  # the last bytes seen: did the backend finish its stream with [DONE]?
        try:
            yield first
            tail = first[-32:]
            async for chunk in chunks:
                yield chunk
                tail = (tail + chunk)[-32:]
            if b"[DONE]" not in tail:
                raise httpx.RemoteProtocolError("the stream ended without [DONE]")
        except httpx.HTTPError as e:
            self.pool.mark_down(backend, repr(e))
            what = ("stopped answering" if isinstance(e, httpx.TimeoutException) else "failed")
            yield error_event(f"the backend {backend.url} {what} mid-stream ({type(e).__name__}); the answer is "
                              "incomplete")
            yield DONE
        finally:
            await response.aclose()
            backend.in_flight -= 1
            if on_done is not None:
                on_done()


async def _iterate(chunks) -> AsyncIterator[bytes]:
    for c in chunks:
        yield c
