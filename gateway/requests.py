"""Validation of request bodies and resume cursors; each failure is an :class:`ApiError`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request

from gateway.errors import ApiError
from shared.events import EntryId
from shared.settings import Settings

_CHAT_FIELDS = {"prompt", "stream", "max_tokens", "cancel_on_disconnect"}


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A validated ``POST /chat/stream`` body."""

    prompt: str
    stream: bool
    max_tokens: int
    cancel_on_disconnect: bool = False


async def read_json_object(request: Request, *, max_bytes: int) -> dict[str, Any]:
    """The body as a JSON object: 413 past ``max_bytes``, 400 if not JSON, 422 if not an object."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {max_bytes}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise ApiError(413, f"request body exceeds the limit of {max_bytes} bytes")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(
            400, f"request body is not valid JSON: {exc}", error_type="invalid_json"
        ) from None
    if not isinstance(value, dict):
        raise ApiError(422, "request body must be a JSON object")
    return value


def parse_chat_request(body: dict[str, Any], settings: Settings) -> ChatRequest:
    """Validate a chat request: 422 for a bad or unknown field, 413 for a too-long prompt."""
    unknown = sorted(set(body) - _CHAT_FIELDS)
    if unknown:
        raise ApiError(422, f"unknown field(s): {', '.join(unknown)}")
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(422, "field 'prompt' is required")
    if not isinstance(prompt, str):
        raise ApiError(422, "field 'prompt' must be a string")
    if not prompt.strip():
        raise ApiError(422, "field 'prompt' must not be empty")
    if len(prompt) > settings.max_prompt_chars:
        raise ApiError(
            413,
            f"prompt of {len(prompt)} characters exceeds the limit of {settings.max_prompt_chars}",
        )
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise ApiError(422, "field 'stream' must be true or false")
    max_tokens = body.get("max_tokens", settings.default_max_tokens)
    # bool is an int in Python; JSON true is not a token count.
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        raise ApiError(422, "field 'max_tokens' must be an integer")
    if not 1 <= max_tokens <= settings.max_tokens_limit:
        raise ApiError(422, f"field 'max_tokens' must be between 1 and {settings.max_tokens_limit}")
    cancel_on_disconnect = body.get("cancel_on_disconnect", False)
    if not isinstance(cancel_on_disconnect, bool):
        raise ApiError(422, "field 'cancel_on_disconnect' must be true or false")
    return ChatRequest(prompt, stream, max_tokens, cancel_on_disconnect)


def resume_cursor(request: Request) -> EntryId | None:
    """The client's position: the ``Last-Event-ID`` header, else the ``last_event_id`` parameter.

    The header wins: a browser EventSource opened with ``?last_event_id=`` keeps that URL on
    every automatic reconnect, while its header carries the newer position.
    """
    raw = request.headers.get("last-event-id")
    source = "Last-Event-ID header"
    if raw is None:
        raw = request.query_params.get("last_event_id")
        source = "last_event_id parameter"
    if raw is None or raw.strip() == "":
        return None  # an empty id is what EventSource sends after a reset: start over
    try:
        return EntryId.parse(raw.strip())
    except ValueError:
        shown = raw if len(raw) <= 64 else raw[:64] + "..."
        raise ApiError(400, f"{source} {shown!r} is not an event id (<ms>-<seq>)") from None


def accepts(request: Request, media_type: str) -> bool:
    """Whether the Accept header admits ``media_type`` (no header admits everything)."""
    header = request.headers.get("accept")
    if not header:
        return True
    major = media_type.split("/")[0]
    for part in header.split(","):
        candidate = part.split(";")[0].strip().lower()
        if candidate in (media_type, f"{major}/*", "*/*"):
            return True
    return False
