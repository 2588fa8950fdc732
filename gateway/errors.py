"""HTTP errors as JSON: every error response has the body ``{"error": {"type", "message"}}``."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from shared.errors import TokenrelayError

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

    def __init__(self, status: int, message: str, *, error_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type or _TYPES.get(status, "error")


def error_response(status: int, error_type: str, message: str) -> JSONResponse:
    """The JSON error body with ``status``."""
    return JSONResponse({"error": {"type": error_type, "message": message}}, status_code=status)


async def handle_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.error_type, exc.message)


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
