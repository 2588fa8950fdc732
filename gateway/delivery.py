"""The one loop that streams a subscriber to its client, and the one interface to a client's
socket: live events written by the tail to the socket when the server offers one, through ASGI
``send`` otherwise (see docs/gateway.md)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from redis.exceptions import RedisError
from starlette.types import Receive, Scope, Send

from gateway.batches import Batch
from gateway.errors import Draining, MessageGone
from gateway.frames import Renderer
from gateway.http_wire import chunk
from gateway.subscriber import Subscriber

_log = logging.getLogger(__name__)

#: The key of the request's :class:`Socket` in ``scope["state"]``, where a server offers it.
SOCKET = "tokenrelay.socket"


class Socket(Protocol):
    """A connection whose response body (HTTP/1.1, chunked) the gateway writes itself."""

    def write(self, data: bytes) -> None:
        """Write ``data`` now (nothing once the client is gone), after what is held."""

    def hold(self, head: bytes = b"") -> None:
        """Keep what is written to the connection (``head`` first) until the next
        :meth:`write`: the response head leaves with the first events, in one packet."""

    @property
    def congested(self) -> bool:
        """The client reads slower than events come (or is gone): wait for :meth:`drained`."""

    @property
    def closed(self) -> bool: ...

    async def drained(self) -> None: ...

    def on_lost(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` when the connection is lost (None: no longer)."""


def socket_of(scope: Scope) -> Socket | None:
    """The socket the server offers for this request, if its body is sent chunked."""
    if scope.get("http_version") != "1.1" or scope.get("method") == "HEAD":
        return None
    state = scope.get("state")
    socket: Socket | None = state.get(SOCKET) if state else None
    return socket


async def stream_to_socket(subscriber: Subscriber, render: Renderer, socket: Socket) -> bytes:
    """Stream ``subscriber`` to ``socket`` until its end; what to send last."""
    sink = subscriber.sink = _LiveWriter(socket, render)
    socket.on_lost(subscriber.close)
    if socket.closed:  # lost before it could say so
        subscriber.close()
    try:
        return await _until_the_end(_follow(subscriber, render, sink.send), render)
    finally:
        subscriber.close()
        socket.on_lost(None)
        socket.write(b"")  # anything still held


async def stream_to_asgi(
    subscriber: Subscriber, render: Renderer, send: Send, receive: Receive
) -> bytes:
    """Stream ``subscriber`` through ASGI ``send`` until its end; what to send last. Servers
    drop writes to a client that left: a watcher of ``receive()`` frees the subscriber."""

    async def send_body(body: bytes) -> None:
        if body:
            await send({"type": "http.response.body", "body": body, "more_body": True})

    watcher = asyncio.ensure_future(close_on_disconnect(receive, subscriber))
    try:
        return await _until_the_end(_follow(subscriber, render, send_body), render)
    finally:
        subscriber.close()
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


async def _follow(
    subscriber: Subscriber, render: Renderer, send: Callable[[bytes], Awaitable[None]]
) -> None:
    """What the client missed (after the prelude), then every batch and heartbeat."""
    # No await between ready_now() and the send: a live event the tail writes directly can
    # only come after it.
    missed = subscriber.ready_now()
    await send(render.prelude + render(missed) if missed else render.prelude)
    while (items := await subscriber.next_batch()) is not None:
        body = render(items) if items else render.heartbeat
        if body:  # events without a frame in this format render to nothing
            await send(body)


async def _until_the_end(streaming: Coroutine[Any, Any, None], render: Renderer) -> bytes:
    """Await ``streaming``; what a stream that ended early says last (``b""`` after the
    terminal event or a disconnect): its client reconnects, and gets the right answer."""
    try:
        await streaming
    except Draining:
        return render.draining()
    except MessageGone as exc:
        _log.warning("stream of %s ended: %s", render.message_id, exc)
        return render.lost()
    except RedisError as exc:
        _log.warning("stream of %s ended early: %s", render.message_id, exc)
        return render.interrupted(type(exc).__name__)
    return b""


async def close_on_disconnect(receive: Receive, subscriber: Subscriber) -> None:
    """Close ``subscriber`` when the client goes away."""
    while (await receive())["type"] != "http.disconnect":
        pass
    subscriber.close()


class _LiveWriter:
    """A subscriber's body to its socket: what its loop sends, and live batches (the sink)."""

    __slots__ = ("_render", "_socket")

    def __init__(self, socket: Socket, render: Renderer) -> None:
        self._socket = socket
        self._render = render

    async def send(self, body: bytes) -> None:
        socket = self._socket
        socket.write(chunk(body) if body else b"")
        if socket.congested:
            await socket.drained()

    def offer(self, batch: Batch) -> bool:
        socket = self._socket
        if socket.congested:
            return False
        framed = _frames.of(batch, self._render)
        if framed:
            socket.write(framed)
        return True


class _BatchFrames:
    """The batch being handed on, framed once per format (a tail hands one batch to all its
    clients before the next, so only the latest is worth keeping)."""

    __slots__ = ("_batch", "_framed")

    def __init__(self) -> None:
        self._batch: Batch | None = None
        self._framed: dict[str, bytes] = {}

    def of(self, batch: Batch, render: Renderer) -> bytes:
        if batch is not self._batch:
            self._batch = batch
            self._framed = {}
        framed = self._framed.get(render.key)
        if framed is None:
            body = render(batch.events)
            framed = self._framed[render.key] = chunk(body) if body else b""
        return framed


_frames = _BatchFrames()
