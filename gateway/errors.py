"""HTTP errors as JSON: ``{"error": {"message", "type", "param", "code"}}``.

That is OpenAI's error shape; the seed endpoints use it too, with their own ``type`` names.
"""

from __future__ import annotations

import logging

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from shared.errors import TokenrelayError

_log = logging.getLogger(__name__)

_TYPES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    422: "invalid_request",
    500: "internal_error",
    502: "model_error",
    503: "unavailable",
}


class ApiError(TokenrelayError):
    """An error answered to the client with ``status`` and a JSON body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type or _TYPES.get(status, "error")
        self.param = param
        self.code = code


class RetryLater(TokenrelayError):
    """Redis is unreachable while a stream was asked for: answered 200 + ``retry:`` + close."""


def error_response(
    status: int, error_type: str, message: str, *, param: str | None = None, code: str | None = None
) -> JSONResponse:
    """The JSON error body with ``status``."""
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


async def handle_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.error_type, exc.message, param=exc.param, code=exc.code)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 and friends, in our JSON shape."""
    assert isinstance(exc, HTTPException)
    message = (
        exc.detail
        if exc.status_code != 404
        else f"no route for {request.method} {request.url.path}"
    )
    response = error_response(exc.status_code, _TYPES.get(exc.status_code, "error"), message)
    if exc.headers:
        response.headers.update(exc.headers)  # keeps Allow on 405
    return response


async def handle_redis_error(request: Request, exc: Exception) -> Response:
    """Redis unreachable: 503, retry later. Any other Redis error is a bug of ours: 500."""
    if isinstance(exc, RedisConnectionError | RedisTimeoutError):
        _log.warning("%s %s: redis unavailable: %s", request.method, request.url.path, exc)
        return error_response(503, "unavailable", "storage unavailable, retry later")
    _log.error("%s %s: redis error", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal error")
