"""Request bodies: JSON objects only, declared as JSON, bounded in size and in time."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request

from gateway.errors import ApiError
from gateway.state import GatewayState

_log = logging.getLogger(__name__)


def refuse_a_foreign_body(request: Request) -> None:
    """415 for a POST that needs no body but sends one not declared JSON: a form or
    ``text/plain`` POST is what a foreign web page can send without a preflight."""
    declared = request.headers.get("content-length")
    sends = "transfer-encoding" in request.headers or (declared not in (None, "0"))
    if sends:
        _media_type_is_json(request)


def _media_type_is_json(request: Request) -> None:
    content_type = request.headers.get("content-type", "")
    media_type = content_type.partition(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise ApiError(
            415,
            f"the request body must be JSON (Content-Type: application/json), not "
            f"{content_type or 'undeclared'!r}",
            param="Content-Type",
        )


async def read_json_object(request: Request, *, max_bytes: int) -> dict[str, Any]:
    """The body as a JSON object: 415 unless declared JSON (a form or ``text/plain`` POST is
    what a foreign web page can send without a preflight), 413 past ``max_bytes``, 400 if not
    JSON, 422 if not an object."""
    _media_type_is_json(request)
    declared = request.headers.get("content-length")
    if (
        declared is not None
        and declared.isascii()
        and declared.isdigit()
        and int(declared) > max_bytes
    ):
        raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {max_bytes}")
    body = bytearray()
    # A body sent slowly holds a connection as a head sent slowly would: the same bound.
    timeout_s = GatewayState.of(request).settings.header_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            async for piece in request.stream():
                body += piece
                if len(body) > max_bytes:
                    raise ApiError(413, f"request body exceeds the limit of {max_bytes} bytes")
    except TimeoutError:
        raise ApiError(
            408,
            f"the request body did not arrive within {timeout_s:g} s",
            headers={"connection": "close"},
        ) from None
    except ClientDisconnect:
        # Nobody reads the answer: said as what it is, not as a failure of the application.
        _log.info("the client left before its request body arrived")
        raise ApiError(400, "the client left before its request body arrived") from None
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(
            400, f"request body is not valid JSON: {exc}", error_type="invalid_json"
        ) from None
    if not isinstance(value, dict):
        raise ApiError(422, "request body must be a JSON object")
    return value
