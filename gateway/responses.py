"""What the endpoints share: following a message as an event stream (the stream GETs), who may
read or cancel it, the responses that carry streams and errors, a whole answer collected."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway import delivery, redis_reads
from gateway.access import Reader
from gateway.counters import Counters
from gateway.errors import ApiError, Draining, MessageGone, NotAnEvent, RetryLater, echoed
from gateway.frames import Renderer
from gateway.http_wire import SSE_HEADERS, SSE_MEDIA_TYPE, stream_headers
from gateway.message_tokens import READ, READ_CANCEL
from gateway.positions import Gap, MessageInfo, Rewound, StartPoint
from gateway.requests import resume_cursor
from gateway.state import GatewayState
from gateway.subscriber import Subscriber
from shared.events import EntryId, Event, Kind
from shared.messages import is_message_id, request_cancel
from shared.settings import Settings

_log = logging.getLogger(__name__)
_END = {"type": "http.response.body", "body": b"", "more_body": False}


@dataclass(frozen=True, slots=True)
class StreamGet:
    """``GET <prefix><message id><suffix>``: a message from the client's cursor on, as an event
    stream that ``renderer`` renders (with a ``retry:`` hint first when ``retry_hint``).

    The application's endpoint (:meth:`endpoint`) and the server adapter's answer from memory
    (gateway.server) are both made from this, and send the same bytes.
    """

    prefix: str
    suffix: str
    renderer: Callable[[str, MessageInfo, int | None], Renderer]
    retry_hint: bool

    @property
    def path(self) -> str:
        return f"{self.prefix}{{message_id}}{self.suffix}"

    @property
    def openai(self) -> bool:
        """Whether errors take OpenAI's names (the ``/v1`` routes)."""
        return is_openai_path(self.prefix)

    def message_id(self, path: str) -> str | None:
        """The message id of ``path`` when this route takes it."""
        end = len(path) - len(self.suffix)
        if end <= len(self.prefix) or not (
            path.startswith(self.prefix) and path.endswith(self.suffix)
        ):
            return None
        message_id = path[len(self.prefix) : end]
        return message_id if is_message_id(message_id) else None

    def render(self, message_id: str, info: MessageInfo, settings: Settings) -> Renderer:
        return self.renderer(message_id, info, settings.retry_ms if self.retry_hint else None)

    async def endpoint(self, request: Request) -> Response:
        """Replay the message from the start or after the client's cursor, then follow it."""
        state = GatewayState.of(request)
        message_id = path_message_id(request)
        reader = await reader_of(request, message_id, READ, openai=self.openai)
        counters = state.hub.counters
        try:
            cursor = resume_cursor(
                request.headers.get("last-event-id"), request.query_params.get("last_event_id")
            )
        except ApiError:
            counters.resumes_refused += 1  # a cursor that is not an event id: refused too
            raise
        try:
            if cursor is None and self.openai and "after_chunk" in request.query_params:
                # The message is the reader's (another tenant's is missing) before its events
                # are counted: how many chunks it has is not for another tenant to learn.
                await state.hub.locate(message_id, None, tenant=reader.tenant)
                cursor = await _after_chunks(request, message_id)
            start = await state.hub.locate(message_id, cursor, tenant=reader.tenant)
        except MessageGone as exc:
            counters.resumes_refused += cursor is not None
            raise ApiError(404, f"message {message_id} does not exist or has expired") from exc
        except NotAnEvent as exc:
            counters.resumes_refused += 1
            raise ApiError(400, str(exc)) from exc
        except Draining:
            # Stopping while this join waited: the client comes back, to another gateway.
            return RetryLaterResponse(state.settings.retry_ms, "this gateway is shutting down")
        except (RedisConnectionError, RedisTimeoutError) as exc:
            _log.warning("resume of %s deferred: %s", message_id, exc)
            raise RetryLater(str(exc)) from exc
        if cursor is not None:
            _count_resume(counters, start)
        if start is None:
            return Response(status_code=204)  # the cursor is the final event: nothing more
        subscriber = state.hub.subscribe(message_id, start)
        render = self.render(message_id, start.info, state.settings)
        return EventStreamResponse(subscriber, render, state)


async def _after_chunks(request: Request, message_id: str) -> EntryId | None:
    """``?after_chunk=N`` on the OpenAI route: after the first N chunks, for clients that
    count chunks but cannot see SSE ids (the openai packages keep them to themselves). Every
    stored event is one chunk in that format, so the N-th chunk is the event numbered N - 1."""
    raw = request.query_params["after_chunk"]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:
        raise ApiError(400, f"'after_chunk' must be a count of chunks, not {raw[:32]!r}")
    count = int(raw)
    if count == 0:
        return None
    state = GatewayState.of(request)
    entry = await redis_reads.entry_of_event(state.hub.reads, message_id, count - 1)
    if entry is None:
        raise ApiError(
            400,
            f"message {message_id} has no chunk {count} to resume after (not yet written, or "
            "no longer retained): resume with Last-Event-ID",
        )
    return entry


def _count_resume(counters: Counters, start: StartPoint | None) -> None:
    if start is None:
        counters.resumed_finished += 1
    elif start.rewound:
        counters.resumed_rewound += 1
    elif start.next_n is None:
        counters.resumed_truncated += 1
    elif start.from_memory:
        counters.resumed_from_memory += 1
    else:
        counters.resumed_from_redis += 1


async def reader_of(request: Request, message_id: str, scope: str, *, openai: bool) -> Reader:
    """Who asks to read (``scope`` READ) or cancel (READ_CANCEL) ``message_id``: its key (the
    Authorization header) or the message's token (``?token=``, else that header)."""
    return await GatewayState.of(request).access.reader(
        message_id,
        request.headers.get("authorization"),
        request.query_params.get("token"),
        scope,
        openai=openai,
    )


async def cancel_for(request: Request, message_id: str, *, openai: bool) -> tuple[str, Reader]:
    """Ask for ``message_id``'s cancellation on behalf of the caller (who must be allowed to):
    ``ok``, ``missing`` (or another tenant's) or ``finished``, and who asked."""
    state = GatewayState.of(request)
    settings = state.settings
    reader = await reader_of(request, message_id, READ_CANCEL, openai=openai)
    outcome = await request_cancel(
        state.redis,
        message_id,
        ttl_ms=settings.stream_ttl_s * 1000,
        maxlen=settings.stream_maxlen,
        tenant=reader.tenant,
    )
    return outcome, reader


def is_openai_path(path: str) -> bool:
    """Whether ``path`` is one of the OpenAI-compatible routes (errors take OpenAI's names)."""
    return path.startswith("/v1/")


def path_message_id(request: Request) -> str:
    """The path's message id; 404 unless it has a message id's shape (it is used in keys)."""
    message_id: str = request.path_params["message_id"]
    if not is_message_id(message_id):
        raise ApiError(404, f"message {echoed(message_id)} does not exist")
    return message_id


class EventStreamResponse(Response):
    """Streams a subscriber until the terminal event, a disconnect, or a failure: through the
    socket the server offers when it offers one, else through ASGI ``send`` (gateway.delivery).
    """

    media_type = SSE_MEDIA_TYPE

    def __init__(
        self,
        subscriber: Subscriber,
        render: Renderer,
        state: GatewayState,
        headers: dict[str, str] | None = None,
    ) -> None:
        # No Response.__init__: it would render a body and announce "content-length: 0"; and
        # the constant headers are encoded once (a gateway keeps one response per client).
        self.status_code = 200
        self.background = None
        heartbeat_ms = round(state.settings.heartbeat_s * 1000)
        self.raw_headers = stream_headers(subscriber.message_id, heartbeat_ms)
        for name, value in (headers or {}).items():
            if name != "x-message-id":  # already there
                self.raw_headers.append((name.encode(), value.encode()))
        self._subscriber = subscriber
        self._render = render
        self._counters = state.hub.counters

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        subscriber, render = self._subscriber, self._render
        start = {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
        if scope["method"] == "HEAD":  # the head is all there is to send
            subscriber.close()
            await send(start)
            await send(_END)
            return
        socket = delivery.socket_of(scope)
        if socket is None:
            self._counters.asgi_streams += 1
            await send(start)
            last_words = await delivery.stream_to_asgi(subscriber, render, send, receive)
        else:
            self._counters.direct_streams += 1
            socket.hold()  # the head uvicorn writes leaves with the first events
            try:
                await send(start)
            except BaseException:
                subscriber.close()
                socket.write(b"")
                raise
            last_words = await delivery.stream_to_socket(subscriber, render, socket)
        await send({"type": "http.response.body", "body": last_words, "more_body": False})


class RetryLaterResponse(Response):
    """200 + ``retry:`` + close: the one way to make a browser EventSource come back later.

    Any other status (503 included) makes EventSource give up for good.
    """

    media_type = SSE_MEDIA_TYPE

    def __init__(self, retry_ms: int, reason: str) -> None:
        body = b"retry: %d\n: %s\n" % (retry_ms, reason.encode())
        super().__init__(content=body, headers=SSE_HEADERS, media_type=self.media_type)


def error_response(error: ApiError) -> Response:
    """``error`` as its status and JSON body."""
    headers = dict(error.headers)
    if error.retry_after_s is not None:
        headers["retry-after"] = str(error.retry_after_s)
    return Response(
        error.body(), status_code=error.status, media_type="application/json", headers=headers
    )


async def collect(request: Request, subscriber: Subscriber) -> list[Event]:
    """Every event of a message up to its terminal one (for non-streaming answers).

    The client may leave while it waits: that releases the subscriber too.
    """
    events: list[Event] = []
    watcher = asyncio.ensure_future(delivery.close_on_disconnect(request.receive, subscriber))
    try:
        while (items := await subscriber.next_batch()) is not None:
            for item in items:
                if isinstance(item, Gap):
                    raise ApiError(500, "part of the answer was trimmed (TOKENRELAY_STREAM_MAXLEN)")
                if isinstance(item, Rewound) or item.kind is Kind.RESET:
                    events.clear()  # the answer comes again from its start
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
