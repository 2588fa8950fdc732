"""The one seam to uvicorn: how a gateway process is served, the socket every request gets,
and the fast path that answers stream GETs from memory without the application (see
docs/gateway.md). Public seams only: the ``http`` protocol class and the ``app_state`` uvicorn
gives it, the asyncio Protocol and Transport contract, ASGI lifespan state."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Any, cast

import httptools
from starlette.types import ASGIApp
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from gateway import http_wire
from gateway.delivery import SOCKET, stream_to_socket
from gateway.errors import error_body
from gateway.fast_path import granted, wanted
from gateway.frames import Renderer
from gateway.hub import Hub
from gateway.positions import StartPoint
from gateway.request_heads import MAX_HEAD, HeadSizes, RequestHead
from gateway.serving import SERVED, Passthrough, Served
from gateway.state import STATE, GatewayState
from gateway.subscriber import Subscriber
from shared import metrics
from shared.settings import Settings

_log = logging.getLogger(__name__)
_MAX_PENDING = 65_536  # bytes sent during a stream (a pipelined request) before reads pause


def uvicorn_options(settings: Settings, host: str, port: int) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config`` (the app: :func:`served`)."""
    return {
        "host": host,
        "port": port,
        "log_level": settings.log_level,
        "access_log": False,  # the gateway logs every answer itself (gateway.http_wire)
        # Always the gateway's own: it enforces the send and header timeouts; the setting
        # turns off its answers from memory and direct writes (TOKENRELAY_FAST_PATH).
        "http": GatewayConnection,
        "ws": "none",
        "lifespan": "on",
        # The application sends its own date header (and no server header): every answer,
        # whoever writes it, has the same head.
        "server_header": False,
        "date_header": False,
        "proxy_headers": False,
        # uvicorn would otherwise wait forever for open event streams on SIGTERM.
        "timeout_graceful_shutdown": math.ceil(settings.shutdown_grace_s),
    }


def served(app: ASGIApp) -> ASGIApp:
    """``app`` as uvicorn is to serve it (see :class:`Served`)."""
    return Served(app)


class GatewayConnection(asyncio.Protocol):
    """uvicorn's ``http`` protocol class for the gateway (see the module's docstring), and the
    :class:`gateway.delivery.Socket` of the requests on its connection."""

    # One per connection: no instance dict.
    __slots__ = (
        "_app_state",
        "_config",
        "_drain_waiters",
        "_head",
        "_heads",
        "_held",
        "_idle",
        "_loop",
        "_lost",
        "_on_lost",
        "_paused",
        "_received",
        "_served",
        "_server_state",
        "_stalled",
        "_streaming",
        "_timeouts",
        "_transport",
        "_unheard",
        "_uvicorn",
    )

    def __init__(
        self, config: Config, server_state: ServerState, app_state: dict[str, Any], **_: Any
    ) -> None:
        self._config = config
        self._server_state = server_state
        self._app_state = app_state
        self._served: Served | None = app_state.get(SERVED)
        self._loop = asyncio.get_running_loop()
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport: Any = None
        self._lost = self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] | None = None
        self._on_lost: Callable[[], None] | None = None
        self._held: list[bytes] | None = None
        self._head: tuple[RequestHead, httptools.HttpRequestParser] | None = None
        # Created when uvicorn's protocol takes the connection over (the fast path's own
        # parser bounds the heads it reads).
        self._heads: HeadSizes | None = None
        self._received = b""  # of the request being read, or sent while a stream runs
        self._streaming: asyncio.Task[None] | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._uvicorn: HttpToolsProtocol | None = None  # once it serves the connection
        state: GatewayState | None = app_state.get(STATE)
        settings = state.settings if state is not None else Settings()
        self._timeouts = (settings.send_timeout_s, settings.header_timeout_s)
        # Armed while the client does not read what is written (send timeout), and while a
        # request head is awaited but incomplete (header timeout).
        self._stalled: asyncio.TimerHandle | None = None
        self._unheard: asyncio.TimerHandle | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        if self._served is not None:
            self._served.connections.add(self)
        self._unheard = self._loop.call_later(self._timeouts[1], self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._served is not None:
            self._served.connections.discard(self)
        self._cancel_idle()
        for timer in (self._stalled, self._unheard):
            if timer is not None:
                timer.cancel()
        self._wake_drain_waiters()
        if self._on_lost is not None:
            self._on_lost()  # the stream's subscriber closes: its task ends
        if self._uvicorn is not None:
            self._uvicorn.connection_lost(exc)

    def eof_received(self) -> bool | None:
        if self._uvicorn is not None:
            self._uvicorn.eof_received()
        return None  # the transport closes; a stream ends with the connection

    def pause_writing(self) -> None:
        self._paused = True
        if self._stalled is None:
            self._stalled = self._loop.call_later(self._timeouts[0], self._send_timed_out)
        if self._uvicorn is not None:
            self._uvicorn.pause_writing()

    def resume_writing(self) -> None:
        self._paused = False
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None
        self._wake_drain_waiters()
        if self._uvicorn is not None:
            self._uvicorn.resume_writing()

    def data_received(self, data: bytes) -> None:
        self._cancel_idle()
        if self._transport.is_closing():
            return  # refused or ended here: what follows is not read
        if self._uvicorn is not None:
            self._give(data)
        elif self._streaming is not None:
            # A request sent while a stream runs waits for its end, as uvicorn's do.
            self._received += data
            if len(self._received) > _MAX_PENDING:
                self._transport.pause_reading()
        else:
            self._read(data)

    # gateway.delivery.Socket

    def write(self, data: bytes) -> None:
        if self._held is not None:
            data, self._held = b"".join(self._held) + data, None
        if data and not self._lost and not self._transport.is_closing():
            self._transport.write(data)

    def hold(self, head: bytes = b"") -> None:
        self._held = [head]

    @property
    def congested(self) -> bool:
        return self._paused or self._lost or bool(self._transport.is_closing())

    @property
    def closed(self) -> bool:
        return self._lost or bool(self._transport.is_closing())

    async def drained(self) -> None:
        if self._paused and not self._lost:
            waiter = self._loop.create_future()
            if self._drain_waiters is None:
                self._drain_waiters = []
            self._drain_waiters.append(waiter)
            await waiter

    def on_lost(self, callback: Callable[[], None] | None) -> None:
        self._on_lost = callback

    # What the server and the application tell

    def close(self) -> None:
        self._transport.close()
        # A client that reads nothing never lets a close with unsent bytes finish.
        if self._stalled is None and self._transport.get_write_buffer_size():
            self._stalled = self._loop.call_later(self._timeouts[0], self._send_timed_out)

    def _send_timed_out(self) -> None:
        self._stalled = None
        if self._lost:
            return
        _log.info(
            "disconnecting a client that read nothing for %.0f s (TOKENRELAY_SEND_TIMEOUT_S)",
            self._timeouts[0],
        )
        self._counted("send_timeouts")
        self._transport.abort()

    def _refuse_head(self) -> None:
        _log.info("refusing a request head larger than %d bytes", MAX_HEAD)
        message = f"the request head (target and headers) is larger than {MAX_HEAD} bytes"
        self._refuse("head_too_large", 431, "request_header_fields_too_large", message)

    def _refuse_malformed(self, error: Exception) -> None:
        # uvicorn's own answer would be a text/plain 400: every error here has a JSON body.
        _log.info("refusing a request that is not valid HTTP/1.1 (%s)", error)
        message = f"the request is not valid HTTP/1.1: {error}"
        self._refuse("bad_http", 400, "bad_request", message)

    def _refuse(self, reason: str, status: int, error_type: str, message: str) -> None:
        metrics.REFUSED_REQUESTS.labels(reason).inc()
        idle = self._streaming is None and (self._uvicorn is None or self._uvicorn.cycle is None)
        if idle and not self.closed:
            self._transport.write(http_wire.refusal(status, error_body(error_type, message)))
            self._transport.close()
        else:  # a response is being written: no room for another; the connection ends
            self._transport.abort()

    def _head_timed_out(self) -> None:
        self._unheard = None
        if self._lost or self._uvicorn is not None or self._streaming is not None:
            return
        self._counted("header_timeouts")
        self._transport.abort()

    def _counted(self, name: str) -> None:
        state: GatewayState | None = self._app_state.get(STATE)
        if state is not None:
            counters = state.hub.counters
            setattr(counters, name, getattr(counters, name) + 1)

    # Requests answered here

    def _read(self, data: bytes) -> None:
        received = self._received = self._received + data
        if self._head is None:
            head = RequestHead()
            self._head = (head, httptools.HttpRequestParser(head))
        head, parser = self._head
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            head.refused = True  # uvicorn answers it as it would have
        except httptools.HttpParserError as exc:
            self._refuse_malformed(exc)
            return
        if head.headers_done and self._unheard is not None:
            self._unheard.cancel()
            self._unheard = None
        if head.size > MAX_HEAD or (not head.headers_done and len(received) > MAX_HEAD):
            self._refuse_head()
        elif head.complete and not head.refused and self._answer(head, parser):
            self._head, self._received = None, b""
        elif head.refused or head.headers_done:
            self._give(b"")  # a body, an error: uvicorn's to read and answer
        # else: the head is not complete yet

    def _answer(self, head: RequestHead, parser: httptools.HttpRequestParser) -> bool:
        """Answer the request from memory; False (nothing done) when it is not for here."""
        state: GatewayState | None = self._app_state.get(STATE)
        if (
            state is None  # the lifespan has not started (or has ended)
            or not state.settings.fast_path
            or state.hub.draining
            or parser.get_method() != b"GET"
            or parser.get_http_version() != "1.1"
            or (head.origin and state.settings.cors_origin_list)
            or (asked := wanted(head)) is None
        ):
            return False
        route, message_id, cursor, token = asked
        if state.access.required and not granted(state, route, message_id, token, head):
            return False  # the application answers: 401, 403 or 404, or a key's check
        start = state.hub.locate_now(message_id, cursor)
        if not isinstance(start, StartPoint):
            return False  # Redis must tell, or the client has it all (a 204)
        if cursor is not None:
            state.hub.counters.resumed_from_memory += 1
        try:
            render = route.render(message_id, start.info, state.settings)
        except Exception:
            path = head.url.partition(b"?")[0]
            _log.exception("answering %r failed; the application answers it", path)
            return False
        subscriber = state.hub.subscribe(message_id, start)
        stream = self._stream(state.hub, subscriber, render, head.url, head.keep_alive)
        task = self._streaming = self._loop.create_task(stream)
        if self._served is not None:
            self._served.streams.add(task)
            task.add_done_callback(self._served.streams.discard)
        return True

    async def _stream(
        self, hub: Hub, subscriber: Subscriber, render: Renderer, target: bytes, keep_alive: bool
    ) -> None:
        hub.counters.fast_path_answers += 1
        hub.counters.direct_streams += 1
        if http_wire.access_log.isEnabledFor(logging.INFO):
            peer = self._transport.get_extra_info("peername")
            http_wire.log_access(
                peer[:2] if isinstance(peer, tuple) else None, "GET", target, "1.1", 200
            )
        heartbeat_ms = round(hub.heartbeat_s * 1000)
        self.hold(http_wire.stream_head(subscriber.message_id, heartbeat_ms, keep_alive=keep_alive))
        try:
            last_words = await stream_to_socket(subscriber, render, self)
        except Exception:
            # As uvicorn does when an application fails after its response started.
            _log.exception("stream of %s failed", subscriber.message_id)
            self.close()
            return
        finally:
            self._streaming = None
        if self.closed:
            return
        self.write(
            http_wire.chunk(last_words) + http_wire.LAST_CHUNK
            if last_words
            else http_wire.LAST_CHUNK
        )
        if not keep_alive or hub.draining:
            self.close()
        elif self._received:
            pending, self._received = self._received, b""
            self._transport.resume_reading()
            self._read(pending)
        else:
            self._await_request()

    def _await_request(self) -> None:
        """Close a kept-alive connection no request comes on within uvicorn's timeout (and
        one whose next request head does not arrive within the header timeout)."""
        self._idle = self._loop.call_later(self._config.timeout_keep_alive, self.close)
        self._unheard = self._loop.call_later(self._timeouts[1], self._head_timed_out)

    def _cancel_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _wake_drain_waiters(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters or (), None
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # uvicorn's protocol

    def _give(self, data: bytes) -> None:
        """Let uvicorn's protocol serve the connection from here, starting with what was
        received and ``data``."""
        data, self._received, self._head = self._received + data, b"", None
        if self._unheard is not None:
            self._unheard.cancel()
            self._unheard = None
        if self._heads is None:
            # From the start of the request being handed over: in step with its messages.
            self._heads = HeadSizes()
        if self._heads.too_large(data):
            self._refuse_head()
            return
        if self._uvicorn is None:
            # Each request's scope["state"] is a copy of this: the request finds its socket
            # (unless the fast path is off: then every stream goes through ASGI send).
            state: GatewayState | None = self._app_state.get(STATE)
            offered = state is None or state.settings.fast_path
            app_state = {**self._app_state, SOCKET: self} if offered else dict(self._app_state)
            self._uvicorn = HttpToolsProtocol(self._config, self._server_state, app_state)
            passthrough = Passthrough(self, self._transport)
            self._uvicorn.connection_made(cast(asyncio.Transport, passthrough))
            if self._paused:
                self._uvicorn.pause_writing()
        self._uvicorn.data_received(data)

    def write_from_uvicorn(self, data: bytes) -> None:
        """A write of uvicorn's protocol: kept while a head is held (it leaves with the
        stream's first events), else written."""
        if self._held is not None:
            self._held.append(bytes(data))
        elif not self.closed:
            self._transport.write(data)
