"""PD over HTTP, the server side: what a prefill server hands out, what a decode server admits,
and the two routes that release a prefill server's pinned blocks.

- A prefill server answers a one-sequence, non-streaming request with its first token and, when
  the KV was pinned for a decode engine (finish_reason "kv_transfer"), signed
  `kv_transfer_params` in the response body (pd_auth.py). A request the prefill engine finished
  alone (EOS first, max_tokens 1) carries none: its answer is complete.
- A decode server given a request with those params (the same request otherwise) verifies the
  signature, pulls the KV, and returns the whole answer, the prefill's first token included.
- POST /pd/free {"kv_transfer_params": signed} releases the prefill engine's pinned blocks
  (`Engine.abort` of the handed-off request id); a router calls it once the decode leg is over.
- POST /pd/hold {"kv_transfer_params": signed} is a liveness stream: a decode server opens it to
  the prefill server named in the params when it admits the request and keeps it open until the
  request has finished. The prefill server writes a heartbeat line every second and, when the
  stream ends for any reason (the decode server finished, failed, or died: its OS closes the
  socket), aborts the handed-off request. After a pull the blocks are already free and that abort
  is a no-op; before it (a decode server SIGKILLed while the request waited for blocks), the
  blocks come back within a second instead of at the pin timeout.

EPD: a prefill or hybrid server given signed `ec_transfer_params` (an encoder server's answer to
POST /v1/encode, serve/encode.py) in a chat request pulls the embeddings of its images and videos
from that encoder engine (`check_ec_request`); a failed pull is answered 424
`encoder_pull_failed`.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
from fastapi import Request
from fastapi.responses import StreamingResponse

from dlengine.serve.errors import APIError, bad_request
from dlengine.serve.pd_auth import ENCODER_URL, PDAuthError, sign, verify
from dlengine.serve.state import ServerState

logger = logging.getLogger("dlengine.serve")
HOLD_HEARTBEAT_S = 1.0


def forbidden(e: PDAuthError) -> APIError:
    return APIError(403, str(e), param="kv_transfer_params", code="invalid_kv_transfer_params")


def check_pd_request(state: ServerState, kv_transfer_params, *, stream: bool,
                     num_choices: int) -> tuple[dict | None, str]:
    """Checks a request against the server's mode. Returns (the engine's params, the prefill
    server's URL) for a decode server given signed params, else (None, "")."""
    mode = state.config.mode
    if mode == "prefill":
        if stream:
            raise bad_request("a prefill server answers without streaming (the decode server streams)", param="stream")
        if num_choices != 1:
            raise bad_request("a prefill server hands off one sequence per request (n=1, one prompt)", param="n")
        return None, ""
    if kv_transfer_params is None:
        return None, ""
    if mode != "decode":
        raise bad_request(f"kv_transfer_params need a decode server; this one is {mode}", param="kv_transfer_params")
    if num_choices != 1:
        raise bad_request("a request with kv_transfer_params continues one sequence (n=1, one prompt)", param="n")
    try:
        params, prefill_url = verify(state.config.pd_secret, kv_transfer_params)
    except PDAuthError as e:
        raise forbidden(e) from None
    _refuse_replay(state, kv_transfer_params)
    return params, prefill_url


def check_ec_request(state: ServerState, ec_transfer_params, *, has_media: bool, num_choices: int) -> dict | None:
    """The engine's ec_transfer_params of a chat request (signature checked), or None.
    `has_media`: the request has images or videos."""
    if ec_transfer_params is None:
        return None
    mode = state.config.mode
    if mode not in ("prefill", "hybrid"):
        raise bad_request(f"ec_transfer_params need a prefill or hybrid server; this one is {mode}",
                          param="ec_transfer_params")
    if not has_media:
        raise bad_request("ec_transfer_params came with a request that has no images and no videos",
                          param="ec_transfer_params")
    if num_choices != 1:
        raise bad_request("a request with ec_transfer_params runs one sequence (n=1): the embeddings are pulled once",
                          param="n")
    try:
        params, _ = verify(state.config.pd_secret, ec_transfer_params, url_key=ENCODER_URL, what="ec_transfer_params")
    except PDAuthError as e:
        raise APIError(403, str(e), param="ec_transfer_params", code="invalid_ec_transfer_params") from None
    return params


def encoder_pull_failed(message: str) -> APIError:
    """A pull from the encoder engine failed (dead, stalled, released): 424, so a router neither
    blames this server nor retries the same params here."""
    return APIError(424, message, type="server_error", param="ec_transfer_params", code="encoder_pull_failed")


def _refuse_replay(state: ServerState, signed: dict) -> None:
    """Signed params are good for one pull on this server (a second would read blocks the first
    has released, maybe reused by now); remembered until they expire."""
    now = time.time()
    used = state.used_pd_signatures
    for sig, expires in list(used.items()):
        if expires < now:
            del used[sig]
    if signed["signature"] in used:
        raise forbidden(PDAuthError("these kv_transfer_params were already used on this server"))
    used[signed["signature"]] = float(signed.get("expires_at", now))


def handoff_params(state: ServerState, finals) -> dict | None:
    """The signed kv_transfer_params of a prefill server's answer (None when it finished alone)."""
    if state.config.mode != "prefill" or len(finals) != 1 or finals[0].kv_transfer_params is None:
        return None
    params = finals[0].kv_transfer_params
    if not state.config.pd_secret:  # a decode server will refuse these; the pin timeout frees the blocks
        return params
    return sign(state.config.pd_secret, params, prefill_url=state.config.public_url or "",
                ttl_s=float(params.get("pin_timeout_s", 60.0)))


def hold_prefill(prefill_url: str, signed: dict, stream) -> asyncio.Task | None:
    """On a decode server: keep /pd/hold open to the prefill server until `stream` has finished."""
    if not prefill_url:
        return None

    async def hold() -> None:
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=5 * HOLD_HEARTBEAT_S)) as client:
                async with client.stream("POST", f"{prefill_url}/pd/hold", json={"kv_transfer_params": signed}) as r:
                    if r.status_code != 200:
                        logger.warning("prefill server %s refused /pd/hold: %s", prefill_url, r.status_code)
                        return
                    async for _ in r.aiter_lines():
                        if stream.finished:
                            return
        except httpx.HTTPError as e:  # the prefill server is gone: the pull will fail and say so
            logger.warning("liveness stream to prefill server %s ended: %r", prefill_url, e)

    return asyncio.ensure_future(hold())


async def _verified_request_id(state: ServerState, raw: Request) -> str:
    try:
        body = await raw.json()
    except ValueError:
        raise bad_request("the body must be JSON: {\"kv_transfer_params\": {...}}") from None
    if state.config.mode != "prefill":
        raise bad_request(f"/pd routes are a prefill server's; this one is {state.config.mode}")
    try:
        params, _ = verify(state.config.pd_secret, body.get("kv_transfer_params") if isinstance(body, dict) else None)
    except PDAuthError as e:
        raise forbidden(e) from None
    rid = params.get("request_id")
    if not isinstance(rid, str):
        raise bad_request("kv_transfer_params carry no request_id", param="kv_transfer_params")
    return rid


async def pd_free(raw: Request):
    """Release the prefill engine's pinned blocks of a handed-off request."""
    state: ServerState = raw.app.state.server
    rid = await _verified_request_id(state, raw)
    freed = await state.async_engine.call(state.engine.abort, rid)
    return {"freed": bool(freed)}


async def pd_hold(raw: Request):
    """A heartbeat stream; when it ends, the handed-off request's blocks are released."""
    state: ServerState = raw.app.state.server
    rid = await _verified_request_id(state, raw)

    async def beats():
        gone = asyncio.ensure_future(_client_gone(raw))
        try:
            while not gone.done():
                yield "\n"
                await asyncio.wait({gone}, timeout=HOLD_HEARTBEAT_S)
        finally:
            gone.cancel()
            state.async_engine.abort(rid)  # no-op once the decode side has pulled (blocks already free)

    return StreamingResponse(beats(), media_type="text/plain")


async def _client_gone(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass
