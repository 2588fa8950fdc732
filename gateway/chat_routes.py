"""The seed endpoints (``/chat/stream``), cancellation (both APIs), health, the demo page."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from gateway.bodies import read_json_object, refuse_a_foreign_body
from gateway.errors import ApiError
from gateway.frames import SeedRenderer
from gateway.generations import begin, limited
from gateway.requests import accepts, parse_chat_request
from gateway.responses import (
    EventStreamResponse,
    cancel_for,
    collect,
    is_openai_path,
    path_message_id,
)
from gateway.state import GatewayState
from shared.events import Kind
from shared.messages import Job

_SSE = "text/event-stream"
_JSON = "application/json"


async def post_chat(request: Request) -> Response:
    """Start a generation; stream it as SSE (``stream: true``) or answer the whole text as JSON."""
    state = GatewayState.of(request)
    settings = state.settings
    key = await state.access.key_of(request.headers.get("authorization"), openai=False)
    # Room for the longest prompt with every character JSON-escaped, plus the other fields.
    body = await read_json_object(request, max_bytes=settings.max_prompt_chars * 6 + 16_384)
    chat = parse_chat_request(body, limited(settings, key))
    wanted = _SSE if chat.stream else _JSON
    if not accepts(request.headers.get("accept"), wanted):
        raise ApiError(
            406, f"'stream': {str(chat.stream).lower()} answers {wanted}, which Accept excludes"
        )
    begun = await begin(
        request,
        key,
        body,
        lambda message_id: Job(
            message_id, chat.prompt, chat.max_tokens, model=settings.default_model
        ),
        stream=chat.stream,
        cancel_on_disconnect=chat.cancel_on_disconnect,
        openai=False,
    )
    message_id, subscriber, headers = begun.message_id, begun.subscriber, begun.headers
    if subscriber is None:
        return Response(status_code=204, headers=headers)
    if chat.stream:
        render = SeedRenderer(message_id, retry_ms=settings.retry_ms)
        return EventStreamResponse(subscriber, render, state, headers)
    events = await collect(request, subscriber)
    if events[-1].kind is Kind.ERROR:
        # The model failed: the stream's error event body, as a gateway error.
        error = events[-1].data
        return Response(
            b'{"id":"' + message_id.encode() + b'","error":' + error + b"}",
            status_code=502,
            media_type=_JSON,
            headers=headers,
        )
    answer: dict[str, object] = {"id": message_id, "content": "".join(e.content() for e in events)}
    if events[-1].kind is Kind.CANCELLED:
        answer["cancelled"] = True
    if "x-message-token" in headers:
        answer["token"] = headers["x-message-token"]
        answer["read_token"] = headers["x-message-read-token"]
    return JSONResponse(answer, headers=headers)


async def cancel_message(request: Request) -> Response:
    """Stop a generation: 202 (the stream ends with a cancelled event), 404, or 409 if finished."""
    message_id = path_message_id(request)
    refuse_a_foreign_body(request)
    outcome, _ = await cancel_for(request, message_id, openai=is_openai_path(request.url.path))
    if outcome == "missing":
        raise ApiError(404, f"message {message_id} does not exist or has expired")
    if outcome == "finished":
        raise ApiError(409, f"message {message_id} has already finished")
    return JSONResponse({"id": message_id, "status": "cancelling"}, status_code=202)


def demo_page(html: bytes) -> HTMLResponse:
    """``GET /``: the demo page."""
    return HTMLResponse(html)
