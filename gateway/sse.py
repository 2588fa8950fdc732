"""SSE framing of message events and the streaming response that writes them.

Wire format (the seed contract)::

    id: <entry id>
    data: {"id":"<message id>","content":"<chunk text>"}

    id: <entry id>
    data: [DONE]

    id: <entry id>
    event: error
    data: {"id":"<message id>","error":{"type":"...","message":"..."}}

    event: truncated
    data: {"id":"<message id>","last_event_id":"<id or null>","resumes_at":"<entry id>"}

Chunk text travels as a JSON string, so CR and LF inside it never split a line. The synthetic
``truncated`` frame carries no ``id:``: it is not a resume position. Each event's frame is
rendered once and shared by every subscriber in the process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

import orjson
from redis.exceptions import RedisError
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.hub import Gap, Item, Subscriber
from shared.events import Event, Kind

_log = logging.getLogger(__name__)

HEARTBEAT = b": ping\n\n"
_SEED = "seed"

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    # nginx (and nginx-based ingresses) buffer proxied responses unless told not to.
    "X-Accel-Buffering": "no",
}


class SeedRenderer:
    """Renders items of one message in the ``/chat/stream`` format."""

    def __init__(self, message_id: str) -> None:
        self._id_json = orjson.dumps(message_id)

    def __call__(self, items: list[Item]) -> bytes:
        if not items:
            return HEARTBEAT
        return b"".join([self._frame(item) for item in items])

    def _frame(self, item: Item) -> bytes:
        if isinstance(item, Gap):
            return self.gap(item)
        frames = item.frames
        if frames is None:
            frames = item.frames = {}
        frame = frames.get(_SEED)
        if frame is None:
            frame = frames[_SEED] = self._render(item)
        return frame

    def _render(self, event: Event) -> bytes:
        head = b"id: " + event.raw_id + b"\n"
        if event.kind is Kind.CHUNK:
            return head + b'data: {"id":' + self._id_json + b',"content":' + event.data + b"}\n\n"
        if event.kind is Kind.DONE:
            return head + b"data: [DONE]\n\n"
        return (
            head
            + b'event: error\ndata: {"id":'
            + self._id_json
            + b',"error":'
            + event.data
            + b"}\n\n"
        )

    def gap(self, gap: Gap) -> bytes:
        body = {
            "id": orjson.loads(self._id_json),
            "last_event_id": None if gap.after is None else str(gap.after),
            "resumes_at": str(gap.resumes_at),
        }
        return b"event: truncated\ndata: " + orjson.dumps(body) + b"\n\n"


class EventStreamResponse(Response):
    """Streams a subscriber's items until the terminal event, a disconnect, or a Redis failure.

    uvicorn (ASGI spec 2.3) silently drops writes to a disconnected client, so a watcher task
    waits on ``receive()`` for the disconnect and closes the subscriber, which frees it at once.
    """

    media_type = "text/event-stream; charset=utf-8"

    def __init__(
        self,
        subscriber: Subscriber,
        render: Callable[[list[Item]], bytes],
        *,
        retry_ms: int,
        headers: Mapping[str, str],
        prelude: bytes = b"",
    ) -> None:
        # No Response.__init__: it would render a body and announce "content-length: 0".
        self.status_code = 200
        self.background = None
        self.init_headers({**SSE_HEADERS, **headers})
        self._subscriber = subscriber
        self._render = render
        self._first = b"retry: %d\n\n" % retry_ms + prelude

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        subscriber = self._subscriber
        watcher = asyncio.ensure_future(_close_on_disconnect(receive, subscriber))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            await send({"type": "http.response.body", "body": self._first, "more_body": True})
            while (items := await subscriber.next_batch()) is not None:
                await send(
                    {"type": "http.response.body", "body": self._render(items), "more_body": True}
                )
        except RedisError as exc:
            # Without a terminal event the client reconnects (after the retry hint) and resumes.
            _log.warning("stream of %s ended early: %s", subscriber.message_id, exc)
        finally:
            subscriber.close()
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class RetryLaterResponse(Response):
    """200 + ``retry:`` + close: the one way to make a browser EventSource come back later.

    Any other status (503 included) makes EventSource give up for good.
    """

    media_type = "text/event-stream; charset=utf-8"

    def __init__(self, retry_ms: int, reason: str) -> None:
        body = b"retry: %d\n: %s\n\n" % (retry_ms, reason.encode())
        super().__init__(content=body, headers=SSE_HEADERS, media_type=self.media_type)


async def _close_on_disconnect(receive: Receive, subscriber: Subscriber) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    subscriber.close()
