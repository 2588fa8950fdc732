"""What can go wrong for a request or a stream, and the JSON body an error is answered with.

Bodies have OpenAI's error shape, ``{"error": {"message", "type", "param", "code"}}``; the seed
endpoints use it too, with their own ``type`` names.
"""

from __future__ import annotations

import orjson

from shared.errors import TokenrelayError

_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limit_exceeded",
    500: "internal_error",
    502: "model_error",
    503: "unavailable",
}


# Our own names, which OpenAI's clients do not know: on the /v1 routes an error named so is
# answered as OpenAI names it (the name moves to ``code``). A quota's 429 and a failed
# generation's 502 have their OpenAI shape where they are raised.
_OURS = frozenset(_TYPES.values()) - {"rate_limit_exceeded", "model_error"}


def in_openai_terms(error: ApiError) -> ApiError:
    """``error`` as the OpenAI API would name it: ``invalid_request_error`` (a 4xx) or
    ``server_error`` (a 5xx)."""
    if error.error_type not in _OURS:
        return error
    return ApiError(
        error.status,
        error.message,
        error_type="server_error" if error.status >= 500 else "invalid_request_error",
        param=error.param,
        code=error.code or error.error_type,
        retry_after_s=error.retry_after_s,
        headers=error.headers,
    )


def error_type(status: int) -> str:
    """The ``type`` of an error answered with ``status``."""
    return _TYPES.get(status, "error")


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
        retry_after_s: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type or _TYPES.get(status, "error")
        self.param = param
        self.code = code
        #: Sent as Retry-After (a 503 or 429 the client may retry).
        self.retry_after_s = retry_after_s
        #: More response headers (WWW-Authenticate, x-ratelimit-*).
        self.headers = headers or {}

    def body(self) -> bytes:
        return error_body(self.error_type, self.message, param=self.param, code=self.code)


def error_body(
    error_type: str, message: str, *, param: str | None = None, code: str | None = None
) -> bytes:
    """The JSON body of an error."""
    return orjson.dumps(
        {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    )


class RetryLater(TokenrelayError):
    """Redis is unreachable while a stream was asked for: answered 200 + ``retry:`` + close."""


class MessageGone(TokenrelayError):
    """The message does not exist, expired, or was deleted while a client was reading it."""


class NotAnEvent(TokenrelayError):
    """A client's cursor is not an event of the message."""


class Draining(TokenrelayError):
    """This gateway is shutting down: the client is to reconnect (to another one)."""


#: Longest part of a request (an id from a path, say) that an error message repeats.
MAX_ECHOED = 64


def echoed(text: str) -> str:
    """``text`` as an error message may repeat it: cut to :data:`MAX_ECHOED` characters."""
    return text if len(text) <= MAX_ECHOED else text[:MAX_ECHOED] + "..."
