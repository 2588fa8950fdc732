"""The seed HTTP endpoints (``/chat/stream``), health, and what the OpenAI endpoints share."""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from gateway.errors import ApiError, RetryLater
from gateway.hub import Draining, Gap, MessageGone, Subscriber
from gateway.render import Renderer, SeedRenderer
from gateway.requests import accepts, parse_chat_request, read_json_object, resume_cursor
from gateway.resume import StartPoint, follow, locate
from gateway.sse import EventStreamResponse, RetryLaterResponse, close_on_disconnect
from gateway.state import GatewayState
from gateway.warm_routes import WarmRoute
from shared.events import Event, Kind
from shared.messages import Job, is_message_id, new_message_id, request_cancel, submit

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
    watch_ms = int(settings.cancel_grace_s * 1000) if chat.cancel_on_disconnect else None
    await submit(
        state.redis,
        Job(
            message_id=message_id,
            prompt=chat.prompt,
            max_tokens=chat.max_tokens,
            model=settings.default_model,
        ),
        ttl_ms=settings.stream_ttl_s * 1000,
        model=settings.default_model,
        watch_ms=watch_ms,
    )
    subscriber = state.hub.subscribe(message_id, watch_ms=watch_ms)
    headers = {"X-Message-Id": message_id}
    if chat.stream:
        return EventStreamResponse(subscriber, SeedRenderer(message_id), retry_ms=settings.retry_ms)
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
    return JSONResponse(answer, headers=headers)


async def get_chat(request: Request) -> Response:
    """Replay a message from the start or after the client's cursor, then follow it live."""
    message_id, start = await start_point(request)
    if start is None:
        return Response(status_code=204)  # the cursor is the final event: nothing more, ever
    return stream_from(request, message_id, start, SeedRenderer(message_id))


async def cancel_chat(request: Request) -> Response:
    """Stop a generation: 202 (the stream ends with a cancelled event), 404, or 409 if finished."""
    state = GatewayState.of(request)
    message_id = _path_message_id(request)
    settings = state.settings
    outcome = await request_cancel(
        state.redis, message_id, ttl_ms=settings.stream_ttl_s * 1000, maxlen=settings.stream_maxlen
    )
    if outcome == "missing":
        raise ApiError(404, f"message {message_id} does not exist or has expired")
    if outcome == "finished":
        raise ApiError(409, f"message {message_id} has already finished")
    return JSONResponse({"id": message_id, "status": "cancelling"}, status_code=202)


async def start_point(request: Request) -> tuple[str, StartPoint | None]:
    """The message id of the path and where the client resumes in it (None: it has it all).

    Redis being unreachable is answered at once with "retry later" (see RetryLaterResponse).
    """
    state = GatewayState.of(request)
    message_id = _path_message_id(request)
    cursor = resume_cursor(request)
    try:
        return message_id, await locate(state.redis, message_id, cursor, hub=state.hub)
    except (RedisConnectionError, RedisTimeoutError) as exc:
        _log.warning("resume of %s deferred: %s", message_id, exc)
        raise RetryLater(str(exc)) from exc


def _path_message_id(request: Request) -> str:
    """The path's message id; 404 unless it has a message id's shape (it is used in keys)."""
    message_id: str = request.path_params["message_id"]
    if not is_message_id(message_id):
        raise ApiError(404, f"message {message_id} does not exist")
    return message_id


def stream_from(
    request: Request,
    message_id: str,
    start: StartPoint,
    renderer: Renderer,
    *,
    retry_hint: bool = True,
) -> Response:
    """An event stream of ``message_id`` from ``start`` (with a ``retry:`` hint first, or not)."""
    state = GatewayState.of(request)
    subscriber = follow(state.hub, message_id, start)
    retry_ms = state.settings.retry_ms if retry_hint else None
    return EventStreamResponse(subscriber, renderer, retry_ms=retry_ms)


async def collect(request: Request, subscriber: Subscriber) -> list[Event]:
    """Every event of a message up to its terminal one (for non-streaming answers).

    The client may leave while it waits: that releases the subscriber too.
    """
    events: list[Event] = []
    watcher = asyncio.ensure_future(close_on_disconnect(request.receive, subscriber))
    try:
        while (items := await subscriber.next_batch()) is not None:
            for item in items:
                if isinstance(item, Gap):
                    raise ApiError(500, "part of the answer was trimmed (TOKENRELAY_STREAM_MAXLEN)")
                if item.kind is Kind.RESET:
                    events.clear()  # another worker generates the answer again from the start
                    continue
                events.append(item)
    except MessageGone as exc:
        raise ApiError(404, str(exc)) from exc
    except Draining as exc:
        raise ApiError(
            503, "this gateway is shutting down; retry", error_type="unavailable"
        ) from exc
    finally:
        subscriber.close()
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    if not events or not events[-1].kind.terminal:
        raise ApiError(
            503, "the client left or the answer was interrupted; retry", error_type="unavailable"
        )
    return events


async def handle_retry_later(request: Request, exc: Exception) -> Response:
    """A stream asked for while Redis is unreachable: come back later (see RetryLaterResponse)."""
    return RetryLaterResponse(
        GatewayState.of(request).settings.retry_ms, "storage unavailable, retry later"
    )


async def healthz(request: Request) -> Response:
    """The process is alive (it answers)."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Redis answers: this gateway can serve streams."""
    await GatewayState.of(request).redis.ping()
    return JSONResponse({"status": "ready"})


def demo_page(html: bytes) -> Route:
    """``GET /``: the demo page."""

    async def page(request: Request) -> Response:
        return HTMLResponse(html)

    return Route("/", page, methods=["GET"])


#: The long-lived GETs, served past the middleware stack (see gateway.stream_routes).
STREAM_ROUTES = [Route("/chat/stream/{message_id}", get_chat, methods=["GET"])]
#: The same GETs, as the gateway protocol answers them from memory (see gateway.protocol).
WARM_ROUTES = [WarmRoute(b"/chat/stream/", b"", lambda m, _: SeedRenderer(m), retry_hint=True)]

ROUTES = [
    Route("/chat/stream", post_chat, methods=["POST"]),
    *STREAM_ROUTES,
    Route("/chat/stream/{message_id}/cancel", cancel_chat, methods=["POST"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
]
