"""Writing an event stream's body straight to the client's socket, bypassing ASGI ``send``.

Through ASGI, every event costs each subscriber a task wake-up and a pass through four
``send`` wrappers (uvicorn's, Starlette's two, ours): a profile of 1,000 subscribers showed
about 70 % of the gateway's time there. A subscriber that is live on a message's tail instead
has the tail write the event's bytes (framed once for every subscriber of that format) to its
transport, in the tail's own loop, with no task switch.

This is available when uvicorn serves the request with its httptools protocol over HTTP/1.1
with chunked encoding (the default in production): :class:`Gateway` finds the connection's
transport behind the ``send`` it is given. The gateway's own protocol (gateway.protocol) writes
the streams it answers this way too. Under any other server the body goes through ASGI
``send`` as before. Flow control is uvicorn's own: once the transport's buffer passes its high
water mark the writer reports ``congested``, the subscriber stops taking live events, and it
catches up from Redis when the client has drained it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.stream_routes import StreamRoutes

if TYPE_CHECKING:
    from gateway.warm_routes import WarmRoute

# The scope key under which the gateway leaves uvicorn's RequestResponseCycle for the response.
EXTENSION = "tokenrelay.direct"
_HTTPTOOLS_CYCLE = "uvicorn.protocols.http.httptools_impl"


class DirectWriter:
    """The socket of one HTTP/1.1 response whose body is sent chunked: uvicorn's (made from its
    request cycle) or the gateway protocol's own (gateway.protocol)."""

    __slots__ = ("_cycle", "_flow", "_transport")

    def __init__(self, transport: Any, flow: Any, cycle: Any = None) -> None:
        self._cycle = cycle
        self._transport = transport
        self._flow = flow

    @classmethod
    def of_cycle(cls, cycle: Any) -> DirectWriter:
        """The writer of a response uvicorn's httptools protocol serves."""
        return cls(cycle.transport, cycle.flow, cycle)

    @property
    def usable(self) -> bool:
        """The response was started chunked, and the client is still there."""
        cycle = self._cycle
        if cycle is None:
            return not self._transport.is_closing()
        return cycle.chunked_encoding is True and not cycle.disconnected

    @property
    def congested(self) -> bool:
        """The client reads slower than events come: wait for :meth:`drained`."""
        return bool(self._flow.write_paused or self._transport.is_closing())

    @property
    def transport(self) -> Any:
        return self._transport

    @property
    def flow(self) -> Any:
        return self._flow

    @contextlib.contextmanager
    def holding(self) -> Iterator[Held]:
        """While in this block, what uvicorn writes for the response (its head, say) is kept
        in the :class:`Held` instead of sent, so that it can leave with the first events."""
        assert self._cycle is not None, "only uvicorn's cycle writes a head to hold"
        held = Held(self._transport)
        self._cycle.transport = held
        try:
            yield held
        finally:
            self._cycle.transport = self._transport

    def write(self, chunk: bytes) -> None:
        """Write one already chunk-framed piece of the body (see :func:`chunk`); nothing once
        the client is gone (uvloop raises on a write to a closed transport)."""
        if not self._transport.is_closing():
            self._transport.write(chunk)

    async def drained(self) -> None:
        await self._flow.drain()


class Held:
    """Stands in for the transport of uvicorn's cycle: keeps what ``send`` writes, and answers
    ``is_closing`` (which ``receive`` asks) for the real one."""

    __slots__ = ("_parts", "_transport")

    def __init__(self, transport: Any) -> None:
        self._parts: list[bytes] = []
        self._transport = transport

    def write(self, data: bytes) -> None:
        self._parts.append(bytes(data))

    def is_closing(self) -> bool:
        return bool(self._transport.is_closing())

    @property
    def data(self) -> bytes:
        return b"".join(self._parts)


def chunk(body: bytes) -> bytes:
    """``body`` as one HTTP/1.1 chunk."""
    return b"%x\r\n%b\r\n" % (len(body), body)


class Gateway(Starlette):
    """The gateway application: a Starlette app that offers event streams a :class:`DirectWriter`
    when the server makes one possible, and serves them past its middleware stack (see
    gateway.stream_routes)."""

    def __init__(
        self,
        *,
        stream_routes: Sequence[Route] = (),
        warm_routes: Sequence[WarmRoute] = (),
        warm_headers: Callable[[], list[tuple[bytes, bytes]]] = list,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        #: The stream GETs the gateway protocol may answer from memory, and the headers the
        #: middleware would have added to those answers (see gateway.protocol).
        self.warm_routes = list(warm_routes)
        self.warm_headers = warm_headers
        #: Streams the gateway protocol answered itself.
        self.warm_answers = 0
        middleware = self.user_middleware

        def wrap(app: ASGIApp) -> ASGIApp:
            for cls, args, options in reversed(middleware):
                app = cls(app, *args, **options)
            return app

        self._streams = StreamRoutes(stream_routes, self.exception_handlers, wrap)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if scope.get("http_version") == "1.1":
                # uvicorn hands the app its RequestResponseCycle's bound send; Starlette wraps
                # it further in, so this is the one place it can be seen.
                cycle = getattr(send, "__self__", None)
                if cycle is not None and type(cycle).__module__ == _HTTPTOOLS_CYCLE:
                    scope[EXTENSION] = cycle  # a key of its own: no dict per request
            if self._streams.match(scope) is not None:
                scope["app"] = self
                await self._streams.app(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def writer_for(scope: Scope) -> DirectWriter | None:
    """The direct writer of this request, if the server offers one."""
    cycle = scope.get(EXTENSION)
    return None if cycle is None else DirectWriter.of_cycle(cycle)
