"""What stands in front of the routes: the API key, the body size bound, the concurrency bound.

The two bounds are plain ASGI middleware so they act before FastAPI reads or parses anything:
a body over the limit is answered 413 without being buffered whole, and a generation request
past `max_concurrent_requests` is answered 429 at once (a streamed request counts until its
last byte is sent).
"""

from __future__ import annotations

import hmac
import json

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from dlengine.serve.errors import APIError, too_many_requests, unauthorized

_bearer = HTTPBearer(auto_error=False, description="the server's --api-key, when it has one")


async def require_api_key(request: Request,
                          credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    """A FastAPI dependency of every /v1 route: with an API key set, the request must carry it
    as a Bearer token (compared in constant time)."""
    key = request.app.state.server.config.api_key
    if key is None:
        return
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), key.encode()):
        raise unauthorized()


async def _send_error(send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Reads request bodies up to `max_bytes` (413 past it), then hands them on whole."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"Request body too large: the limit is {self.max_bytes} bytes",
                             code="request_too_large")
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    if int(value) > self.max_bytes:
                        return await _send_error(send, too_large)
                except ValueError:
                    return await _send_error(send, APIError(400, "Invalid Content-Length header"))
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await _send_error(send, too_large)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: the disconnect notice

        return await self.app(scope, replay, send)


class ConcurrencyLimitMiddleware:
    """At most `limit` generation requests (POST under /v1) at once; 429 past it."""

    def __init__(self, app, limit: int, on_reject=None) -> None:
        self.app, self.limit, self.on_reject = app, limit, on_reject
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limit:
            if self.on_reject is not None:
                self.on_reject()
            return await _send_error(send, too_many_requests(self.limit))
        self.in_flight += 1
        try:
            return await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
