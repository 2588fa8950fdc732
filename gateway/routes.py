"""The HTTP endpoints of the gateway."""

from __future__ import annotations

import logging

import orjson
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from gateway.errors import ApiError
from gateway.hub import Gap, Subscriber
from gateway.requests import accepts, parse_chat_request, read_json_object, resume_cursor
from gateway.resume import locate
from gateway.sse import EventStreamResponse, RetryLaterResponse, SeedRenderer
from gateway.state import GatewayState
from shared.events import Kind
from shared.messages import Job, is_message_id, new_message_id, submit

_log = logging.getLogger(__name__)
_SSE = "text/event-stream"
_JSON = "application/json"


async def post_chat(request: Request) -> Response:
    """Start a generation; stream it as SSE (``stream: true``) or answer the whole text as JSON."""
    state = GatewayState.of(request)
    settings = state.settings
    # Room for the longest prompt with every character JSON-escaped, plus the other fields.
    body = await read_json_object(request, max_bytes=settings.max_prompt_chars * 6 + 16_384)
    chat = parse_chat_request(body, settings)
    wanted = _SSE if chat.stream else _JSON
    if not accepts(request, wanted):
        raise ApiError(
            406, f"'stream': {str(chat.stream).lower()} answers {wanted}, which Accept excludes"
        )
    message_id = new_message_id()
    await submit(
        state.redis,
        Job(message_id=message_id, prompt=chat.prompt, max_tokens=chat.max_tokens),
        ttl_ms=settings.stream_ttl_s * 1000,
    )
    subscriber = state.hub.subscribe(message_id)
    headers = {"X-Message-Id": message_id}
    if chat.stream:
        return EventStreamResponse(
            subscriber, SeedRenderer(message_id), retry_ms=settings.retry_ms, headers=headers
        )
    content, error = await _collect(subscriber)
    if error is not None:
        # The model failed: same body as the stream's error event, as a gateway error.
        return JSONResponse({"id": message_id, "error": error}, status_code=502, headers=headers)
    return JSONResponse({"id": message_id, "content": content}, headers=headers)


async def get_chat(request: Request) -> Response:
    """Replay a message from the start or after the client's cursor, then follow it live."""
    state = GatewayState.of(request)
    message_id = request.path_params["message_id"]
    if not is_message_id(message_id):
        raise ApiError(404, f"message {message_id} does not exist")
    cursor = resume_cursor(request)
    try:
        start = await locate(state.redis, message_id, cursor)
    except RedisError as exc:
        _log.warning("resume of %s deferred: %s", message_id, exc)
        return RetryLaterResponse(state.settings.retry_ms, "storage unavailable, retry later")
    if start is None:
        return Response(status_code=204)  # the cursor is the final event: nothing more, ever
    subscriber = state.hub.subscribe(message_id, after=start.after, next_n=start.next_n)
    return EventStreamResponse(
        subscriber,
        SeedRenderer(message_id),
        retry_ms=state.settings.retry_ms,
        headers={"X-Message-Id": message_id},
    )


async def _collect(subscriber: Subscriber) -> tuple[str, dict[str, object] | None]:
    """The whole text of a message, or its error event's body."""
    parts: list[str] = []
    try:
        while (items := await subscriber.next_batch()) is not None:
            for item in items:
                if isinstance(item, Gap):
                    raise ApiError(500, "part of the answer was trimmed (TOKENRELAY_STREAM_MAXLEN)")
                if item.kind is Kind.CHUNK:
                    parts.append(orjson.loads(item.data))
                elif item.kind is Kind.ERROR:
                    return "".join(parts), orjson.loads(item.data)
    finally:
        subscriber.close()
    return "".join(parts), None


async def healthz(request: Request) -> Response:
    """The process is alive (it answers)."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Redis answers: this gateway can serve streams."""
    try:
        await GatewayState.of(request).redis.ping()
    except RedisError as exc:
        raise ApiError(503, f"redis unreachable: {exc}") from exc
    return JSONResponse({"status": "ready"})


def demo_page(html: bytes) -> Route:
    """``GET /``: the demo page."""

    async def page(request: Request) -> Response:
        return HTMLResponse(html)

    return Route("/", page, methods=["GET"])


ROUTES = [
    Route("/chat/stream", post_chat, methods=["POST"]),
    Route("/chat/stream/{message_id}", get_chat, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
]
