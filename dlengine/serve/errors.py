"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with the right status.

Routes raise `APIError` (or let an `InvalidRequestError` from the engine through); FastAPI's
validation errors (malformed JSON, unknown fields, wrong types) become 400s naming the field.
Nothing a client sends reaches the generic 500 handler unless it is a bug.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dlengine.sampling_params import InvalidRequestError

logger = logging.getLogger("dlengine.serve")


class APIError(Exception):
    """An error answered to the client as-is."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(name: str, served: str) -> APIError:
    return APIError(404, f"The model {name!r} does not exist; this server serves {served!r}", param="model",
                    code="model_not_found")


def too_many_requests(limit: int) -> APIError:
    return APIError(429, f"Too many concurrent requests: this server takes at most {limit} at once; retry later",
                    type="rate_limit_error", code="rate_limit_exceeded")


def unauthorized() -> APIError:
    return APIError(401, "Missing or invalid API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")


def engine_failed(message: str) -> APIError:
    return APIError(500, message, type="server_error", code="engine_error")


def unavailable(message: str) -> APIError:
    return APIError(503, message, type="server_error", code="unavailable")


def _describe_validation_error(err: dict) -> tuple[str, str | None]:
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    kind = err.get("type", "")
    if kind == "json_invalid":
        return f"Malformed JSON body: {err.get('msg', '')}", None
    if not loc and kind in ("model_attributes_type", "dict_type", "model_type"):
        return "The request body must be a JSON object (send it with Content-Type: application/json)", None
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    if kind == "missing" and param:
        return f"Missing required parameter: {param}", param
    where = f"{param}: " if param else ""
    return f"Invalid value for {where}{err.get('msg', 'invalid')}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(InvalidRequestError)
    async def _invalid_request(request: Request, exc: InvalidRequestError):
        return bad_request(str(exc)).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if not errors:
            return bad_request("Invalid request body").response()
        # a body that is not a JSON object at all shows up as one error at the root
        message, param = _describe_validation_error(errors[0])
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return bad_request(message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response(headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, f"Internal server error: {type(exc).__name__}", type="server_error").response()
