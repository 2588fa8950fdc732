"""The streaming responses: an event stream that follows a subscriber, and "come back later"."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Mapping
from typing import Any

from redis.exceptions import RedisError
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.direct import DirectWriter, chunk, writer_for
from gateway.hub import Draining, LiveBatch, MessageGone, Subscriber
from gateway.render import Renderer

_log = logging.getLogger(__name__)

SSE_MEDIA_TYPE = "text/event-stream; charset=utf-8"
SSE_HEADERS = {
    "Cache-Control": "no-cache",
    # nginx (and nginx-based ingresses) buffer proxied responses unless told not to.
    "X-Accel-Buffering": "no",
}


def _encoded(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


_RAW_HEADERS = _encoded({"Content-Type": SSE_MEDIA_TYPE, **SSE_HEADERS})


def event_stream_headers(message_id: str) -> list[tuple[bytes, bytes]]:
    """The headers of an event stream of ``message_id``."""
    return [*_RAW_HEADERS, (b"x-message-id", message_id.encode())]


class EventStreamResponse(Response):
    """Streams a subscriber's items until the terminal event, a disconnect, or a failure.

    uvicorn (ASGI spec 2.3) silently drops writes to a disconnected client, so a watcher task
    waits on ``receive()`` for the disconnect and closes the subscriber, which frees it at once.
    A stream that ends without its terminal event (Redis failed, the message vanished) makes the
    client reconnect after the ``retry:`` hint, and the reconnect gets the right answer.
    """

    media_type = SSE_MEDIA_TYPE

    def __init__(
        self,
        subscriber: Subscriber,
        render: Renderer,
        *,
        retry_ms: int | None,
    ) -> None:
        # No Response.__init__: it would render a body and announce "content-length: 0"; and
        # the constant headers are encoded once (a gateway keeps one response per client).
        self.status_code = 200
        self.background = None
        # X-Message-Id: the id to resume with, for clients that did not choose it.
        self.raw_headers = event_stream_headers(subscriber.message_id)
        self._subscriber = subscriber
        self._render = render
        # OpenAI-format clients (the openai package among them) take a frame without data for
        # a malformed event, so those streams get no standalone retry hint.
        self._first = b"" if retry_ms is None else b"retry: %d\n\n" % retry_ms
        self._retry_ms = retry_ms or 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        subscriber, render, retry_ms = self._subscriber, self._render, self._retry_ms
        watcher = asyncio.ensure_future(close_on_disconnect(receive, subscriber))
        try:
            writer = writer_for(scope)
            if writer is None:
                await self._start(send)
                last_words = await until_the_end(self._stream(send), render, retry_ms)
            else:
                with writer.holding() as head:
                    await self._start(send)
                if writer.usable:
                    following = stream_direct(subscriber, render, writer, head.data)
                    last_words = await until_the_end(following, render, retry_ms)
                else:  # a HEAD request, or the client left: uvicorn's send takes the rest
                    writer.write(head.data)
                    last_words = await until_the_end(self._stream(send), render, retry_ms)
        finally:
            subscriber.close()
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        await send({"type": "http.response.body", "body": last_words, "more_body": False})

    async def _start(self, send: Send) -> None:
        """The status and headers, then the ``retry:`` hint."""
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        if self._first:
            await send({"type": "http.response.body", "body": self._first, "more_body": True})

    async def _stream(self, send: Send) -> None:
        """Every item through ASGI ``send``."""
        subscriber, render = self._subscriber, self._render
        while (items := await subscriber.next_batch()) is not None:
            body = render(items) if items else render.heartbeat
            if body:  # events without a frame in this format render to nothing
                await send({"type": "http.response.body", "body": body, "more_body": True})


async def until_the_end(
    streaming: Coroutine[Any, Any, None], render: Renderer, retry_ms: int
) -> bytes:
    """Await ``streaming`` (a subscriber's items going out); what a stream it ended early says
    last (``b""`` after the terminal event or a disconnect).

    A stream that ends without its terminal event (Redis failed, the message vanished, the
    gateway drains) makes the client reconnect after the ``retry:`` hint, and the reconnect
    gets the right answer.
    """
    try:
        await streaming
    except Draining:
        return render.draining(retry_ms)
    except MessageGone as exc:
        _log.warning("stream of %s ended: %s", render.message_id, exc)
        return render.lost()
    except RedisError as exc:
        _log.warning("stream of %s ended early: %s", render.message_id, exc)
        return render.interrupted(type(exc).__name__)
    return b""


async def stream_direct(
    subscriber: Subscriber, render: Renderer, writer: DirectWriter, head: bytes
) -> None:
    """Catch-up batches and heartbeats written here; live events by the tail (the sink).

    ``head`` (status, headers, retry hint) leaves together with what the client missed,
    when this gateway has that in memory: one write, and one packet for the client.
    """
    subscriber.sink = _DirectSink(writer, render)
    # No await from here to the write: the tail writes live events only after it.
    missed = subscriber.ready_now()
    body = render(missed) if missed else b""
    writer.write(head + chunk(body) if body else head)
    if writer.congested:
        await writer.drained()
    while (items := await subscriber.next_batch()) is not None:
        if not writer.usable:
            return  # the client left (its disconnect closes the subscriber too)
        # No await between next_batch() and this write: a live event the tail writes
        # directly can only come after it.
        body = render(items) if items else render.heartbeat
        if body:
            writer.write(chunk(body))
        if writer.congested:
            await writer.drained()


class _DirectSink:
    """A live subscriber's events, written to its socket in the tail's loop.

    This runs once per batch per subscriber: it reads uvicorn's flow control and the transport
    directly, and takes the batch's bytes from its cache when another subscriber made them.
    """

    __slots__ = ("_flow", "_key", "_render", "_transport")

    def __init__(self, writer: DirectWriter, render: Renderer) -> None:
        self._transport = writer.transport
        self._flow = writer.flow
        self._render = render
        self._key = render.key

    def offer(self, batch: LiveBatch) -> bool:
        transport = self._transport
        if self._flow.write_paused or transport.is_closing():
            return False
        framed = batch.chunks.get(self._key)
        if framed is None:
            framed = batch.chunks[self._key] = self._render.chunked(batch.events)
        if framed:
            transport.write(framed)
        return True


class RetryLaterResponse(Response):
    """200 + ``retry:`` + close: the one way to make a browser EventSource come back later.

    Any other status (503 included) makes EventSource give up for good.
    """

    media_type = SSE_MEDIA_TYPE

    def __init__(self, retry_ms: int, reason: str) -> None:
        body = b"retry: %d\n: %s\n\n" % (retry_ms, reason.encode())
        super().__init__(content=body, headers=SSE_HEADERS, media_type=self.media_type)


async def close_on_disconnect(receive: Receive, subscriber: Subscriber) -> None:
    """Close ``subscriber`` when the client goes away."""
    while (await receive())["type"] != "http.disconnect":
        pass
    subscriber.close()
