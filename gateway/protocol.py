"""The HTTP/1.1 protocol a gateway runs under uvicorn: resumes answered from memory without ASGI.

A client that reconnects (a phone that changed networks, every client of a gateway that
restarted) costs the gateway one request. Through uvicorn and the application that request is
a protocol, a request cycle, a task, the middleware, the router, a response and a disconnect
watcher task: about half a millisecond of the gateway's core (docs/bench/profile.md). When the
answer is in this process's memory (the message's tail is live here and holds the client's
position), none of that is needed. This protocol reads the request head, writes the same
bytes uvicorn and the application would have written, and follows the message with one task.

Every other request, and any request it does not fully understand (another method or path, a
percent-encoded target, a body, an upgrade, a repeated header, HTTP/1.0, a cursor this process
does not hold), is handed with every byte received to uvicorn's own httptools
protocol, which serves it through the application as before, and gives the connection back
once its response is complete and nothing of another request has arrived. The application
stays the reference: this path answers only what it would answer, and the tests compare the
two byte for byte.
"""

from __future__ import annotations

import asyncio
import logging
import re
import weakref
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qsl

from uvicorn.config import Config
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from gateway.direct import DirectWriter, Gateway, chunk
from gateway.hub import Subscriber
from gateway.render import Renderer
from gateway.resume import StartPoint, follow, from_memory
from gateway.sse import event_stream_headers, stream_direct, until_the_end
from gateway.state import GatewayState
from gateway.warm_routes import WarmRoute
from shared.events import EntryId

_log = logging.getLogger(__name__)

_REQUEST_LINE = re.compile(rb"GET (/[!-~]*) HTTP/1\.1")
_HEADER_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# Headers whose presence means a request this protocol leaves to uvicorn.
_NOT_OURS = frozenset({b"content-length", b"transfer-encoding", b"upgrade", b"expect"})
# Larger request heads are uvicorn's to accept or refuse.
_MAX_HEAD = 16_384
# Bytes a client may send while its stream runs (a pipelined request) before reads pause.
_MAX_PENDING = 65_536


@dataclass(frozen=True, slots=True)
class _Request:
    path: bytes
    query: bytes
    last_event_id: bytes | None
    forwarded_for: bytes | None
    keep_alive: bool


def parse_head(head: bytes) -> _Request | None:
    """A ``GET`` request head (without its final blank line) this protocol can answer; None for
    anything else, which uvicorn then parses and answers."""
    lines = head.split(b"\r\n")
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        return None
    target = match[1]
    if b"%" in target or b"#" in target:
        return None
    path, _, query = target.partition(b"?")
    seen: set[bytes] = set()
    last_event_id = forwarded_for = None
    keep_alive = True
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or _HEADER_NAME.fullmatch(name) is None or _CONTROL.search(value):
            return None
        name = name.lower()
        if name in seen or name in _NOT_OURS:
            return None
        seen.add(name)
        value = value.strip(b" \t")
        if name == b"last-event-id":
            last_event_id = value
        elif name == b"x-forwarded-for":
            forwarded_for = value
        elif name == b"connection":
            tokens = {token.strip().lower() for token in value.split(b",")}
            if b"upgrade" in tokens:
                return None
            keep_alive = b"close" not in tokens
    return _Request(path, query, last_event_id, forwarded_for, keep_alive)


def _wanted(
    routes: list[WarmRoute], request: _Request
) -> tuple[WarmRoute, str, EntryId | None] | None:
    """The route, message id and cursor of a request for here, read as the application reads
    them (``resume_cursor``: the header, else the ``last_event_id`` parameter; a blank one
    starts over); None to let the application answer."""
    for route in routes:
        message_id = route.message_id(request.path)
        if message_id is not None:
            break
    else:
        return None
    if request.last_event_id is not None:
        raw: str | None = request.last_event_id.decode("latin-1")
    elif request.query:
        # As Starlette parses a query string; the last of repeated parameters wins.
        query = parse_qsl(request.query.decode("latin-1"), keep_blank_values=True)
        raw = dict(query).get("last_event_id")
    else:
        raw = None
    if raw is None or not raw.strip():
        return route, message_id, None
    try:
        return route, message_id, EntryId.parse(raw.strip())
    except ValueError:
        return None  # the application answers 400


def _may_be_ours(start: bytes) -> bool:
    """Whether the first bytes of a request head may still become a GET answered here (bare
    LF line ends are uvicorn's to refuse)."""
    return b"GET /".startswith(start[:5]) and start.count(b"\n") == start.count(b"\r\n")


class _Server:
    """What every connection of one uvicorn server shares: found once, on its first one."""

    __slots__ = ("access_log", "gateway", "proxy")

    def __init__(self, config: Config) -> None:
        app = config.loaded_app
        #: uvicorn's X-Forwarded-For handling, which decides the client the access log names.
        self.proxy: ProxyHeadersMiddleware | None = None
        while app is not None and not isinstance(app, Gateway):
            if isinstance(app, ProxyHeadersMiddleware):
                self.proxy = app
            app = getattr(app, "app", None)  # uvicorn's and Starlette's wrappers keep it here
        usable = (
            app is not None
            and app.warm_routes
            and not config.root_path
            # uvicorn's answer past the limit (a 503) is uvicorn's to give.
            and config.limit_concurrency is None
        )
        self.gateway: Gateway | None = app if usable else None
        access = logging.getLogger("uvicorn.access")
        self.access_log = access if access.hasHandlers() else None


_servers: weakref.WeakKeyDictionary[Config, _Server] = weakref.WeakKeyDictionary()


class GatewayProtocol(asyncio.Protocol):
    """uvicorn's ``http`` protocol class for the gateway (see the module's docstring)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not config.loaded:
            config.load()
        self._config = config
        self._server_state = server_state
        # uvicorn types this set with its own protocols; it only calls shutdown() on them.
        self._connections: set[Any] = server_state.connections
        self._app_state = app_state
        self._loop = _loop or asyncio.get_event_loop()
        server = _servers.get(config)
        if server is None:
            server = _servers[config] = _Server(config)
        self._server = server
        self._gateway = server.gateway
        self._transport: asyncio.Transport | None = None
        self._flow: FlowControl | None = None
        self._received = b""
        self._subscriber: Subscriber | None = None
        self._keep_alive = True
        self._idle: asyncio.TimerHandle | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        self._flow = FlowControl(transport)
        self._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        del exc  # a stream ends the same way whatever ended its connection
        self._connections.discard(self)
        self._cancel_idle()
        if self._subscriber is not None:
            self._subscriber.close()  # its task sees the end and stops
        if self._flow is not None:
            self._flow.resume_writing()  # a write waiting for the client ends too

    def eof_received(self) -> bool | None:
        return None  # the transport closes; the stream ends with the connection

    def pause_writing(self) -> None:
        assert self._flow is not None
        self._flow.pause_writing()

    def resume_writing(self) -> None:
        assert self._flow is not None
        self._flow.resume_writing()

    def data_received(self, data: bytes) -> None:
        self._cancel_idle()
        received = self._received + data if self._received else data
        if self._subscriber is not None:
            # A request sent while the stream runs waits for its end, as uvicorn's do.
            self._received = received
            if len(received) > _MAX_PENDING:
                assert self._flow is not None
                self._flow.pause_reading()
            return
        self._received = b""
        end = received.find(b"\r\n\r\n")
        if end < 0:
            if len(received) > _MAX_HEAD or not _may_be_ours(received):
                self._hand_over(received)  # uvicorn answers it now, as it would have
            else:
                self._received = received
            return
        # Only a lone GET is answered here: anything after it (a body, a pipelined request)
        # goes to uvicorn with it.
        if end + 4 != len(received):
            self._hand_over(received)
            return
        try:
            served = self._serve(received[:end])
        except Exception:
            _log.exception("answering %r failed", received[:200])
            self._fail()
            return
        if not served:
            self._hand_over(received)

    # uvicorn's server

    def shutdown(self) -> None:
        """The server stops: close an idle connection now, a streaming one at its end (the
        gateway drains every stream on SIGTERM)."""
        self._keep_alive = False
        if self._subscriber is None and self._transport is not None:
            self._transport.close()

    # Serving

    def _serve(self, head: bytes) -> bool:
        """Answer the request from memory; False (nothing done) when it is not for here."""
        gateway = self._gateway
        if gateway is None:
            return False
        request = parse_head(head)
        if request is None:
            return False
        state: GatewayState | None = getattr(gateway.state, "gateway", None)
        if state is None:
            return False  # the lifespan has not started (or has ended)
        wanted = _wanted(gateway.warm_routes, request)
        if wanted is None:
            return False
        route, message_id, cursor = wanted
        hub = state.hub
        if hub.draining:
            return False
        start = from_memory(hub, message_id, cursor)
        if not isinstance(start, StartPoint):
            return False  # Redis must tell, or the client has it all (204)
        self._start_stream(state, gateway, route, message_id, start, request.keep_alive)
        gateway.warm_answers += 1
        access_log = self._server.access_log
        if access_log is not None:
            self._log_access(access_log, request)
        return True

    def _log_access(self, access_log: logging.Logger, request: _Request) -> None:
        """The line uvicorn logs for the request, client for client."""
        assert self._transport is not None
        peer = self._transport.get_extra_info("peername")
        host, port = peer[:2] if isinstance(peer, tuple) else (None, 0)
        proxy = self._server.proxy
        if proxy is not None and request.forwarded_for and host in proxy.trusted_hosts:
            forwarded = proxy.trusted_hosts.get_trusted_client_address(
                request.forwarded_for.decode("latin-1")
            )
            if forwarded[0]:
                host, port = forwarded
        target = request.path + b"?" + request.query if request.query else request.path
        client = f"{host}:{port}" if host else ""
        access_log.info('%s - "%s %s HTTP/%s" %d', client, "GET", target.decode(), "1.1", 200)

    def _start_stream(
        self,
        state: GatewayState,
        gateway: Gateway,
        route: WarmRoute,
        message_id: str,
        start: StartPoint,
        keep_alive: bool,
    ) -> None:
        transport, flow = self._transport, self._flow
        assert transport is not None
        assert flow is not None
        subscriber = self._subscriber = follow(state.hub, message_id, start)
        self._keep_alive = keep_alive
        # The head uvicorn writes for the application's response, header for header.
        lines = self._head(b"200 OK", [*event_stream_headers(message_id), *gateway.warm_headers()])
        if not keep_alive:
            lines.append(b"connection: close\r\n")
        lines.append(b"transfer-encoding: chunked\r\n\r\n")
        retry_ms = state.settings.retry_ms if route.retry_hint else None
        if retry_ms is not None:
            lines.append(chunk(b"retry: %d\n\n" % retry_ms))
        render = route.renderer(message_id, start.info)
        writer = DirectWriter(transport, flow)
        task = self._loop.create_task(
            self._stream(subscriber, render, writer, b"".join(lines), retry_ms or 0)
        )
        # uvicorn's shutdown waits for these (and cancels them after its grace).
        self._server_state.tasks.add(task)
        task.add_done_callback(self._server_state.tasks.discard)

    async def _stream(
        self,
        subscriber: Subscriber,
        render: Renderer,
        writer: DirectWriter,
        head: bytes,
        retry_ms: int,
    ) -> None:
        try:
            following = stream_direct(subscriber, render, writer, head)
            last_words = await until_the_end(following, render, retry_ms)
        except asyncio.CancelledError:
            self._close()  # uvicorn's shutdown gave up waiting
            raise
        except Exception:
            # As uvicorn does when an application fails after its response started.
            _log.exception("stream of %s failed", subscriber.message_id)
            self._close()
            return
        finally:
            subscriber.close()
            self._subscriber = None
        transport = self._transport
        assert transport is not None
        if transport.is_closing():
            return
        transport.write(chunk(last_words) + b"0\r\n\r\n" if last_words else b"0\r\n\r\n")
        self._server_state.total_requests += 1
        if not self._keep_alive:
            transport.close()
            return
        assert self._flow is not None
        self._flow.resume_reading()
        if self._received:
            pending, self._received = self._received, b""
            self.data_received(pending)
        else:
            self._await_request()

    def _hand_over(self, received: bytes) -> None:
        """Let uvicorn's own protocol serve this connection from here, starting with
        ``received``."""
        transport, flow = self._transport, self._flow
        assert transport is not None
        assert flow is not None
        self._connections.discard(self)
        flow.resume_reading()
        protocol = _UvicornProtocol(
            self._config, self._server_state, self._app_state, _loop=self._loop
        )
        # Nothing to give the connection back for when nothing is answered here.
        protocol.gives_back = self._gateway is not None
        _take_over(protocol, transport, flow.write_paused)
        protocol.data_received(received)

    def _await_request(self) -> None:
        """Wait for the next request on a kept-alive connection as uvicorn would: closed when
        none comes within its keep-alive timeout (after a stream, or when uvicorn's protocol
        hands the connection back between requests)."""
        self._idle = self._loop.call_later(self._config.timeout_keep_alive, self._close)

    def _fail(self) -> None:
        """Answer 500 and close, as uvicorn does when an application fails before its response
        started (nothing of it was written: the stream's task writes the head)."""
        if self._subscriber is not None:
            self._subscriber.close()
            self._subscriber = None
        transport = self._transport
        assert transport is not None
        lines = self._head(b"500 Internal Server Error", [])
        lines.append(
            b"content-type: text/plain; charset=utf-8\r\ncontent-length: 21\r\n"
            b"connection: close\r\n\r\nInternal Server Error"
        )
        transport.write(b"".join(lines))
        transport.close()

    def _head(self, status: bytes, headers: list[tuple[bytes, bytes]]) -> list[bytes]:
        """The status line and headers of a response, uvicorn's own headers (date, server)
        first, as uvicorn writes them; the caller adds the rest and the blank line."""
        lines = [b"HTTP/1.1 " + status + b"\r\n"]
        for name, value in (*self._server_state.default_headers, *headers):
            lines += (name, b": ", value, b"\r\n")
        return lines

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _cancel_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None


class _UvicornProtocol(HttpToolsProtocol):
    """uvicorn's own protocol, serving what the gateway protocol handed over; once a response
    is complete and nothing of another request has arrived, it hands the connection back, so
    that a later resume on it (a proxy reusing its connections to the gateway, a client
    keeping its own alive) can be answered from memory too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gives_back = True
        self._message_open = False  # the parser is inside a request (its head or body)

    def on_message_begin(self) -> None:
        self._message_open = True
        super().on_message_begin()

    def on_message_complete(self) -> None:
        self._message_open = False
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        cycle = self.cycle
        if (
            not self.gives_back
            or self.transport.is_closing()
            or self.pipeline
            or self._message_open
            or (cycle is not None and not cycle.response_complete)
        ):
            return  # closing, or busy with the next request: it stays here
        self._unset_keepalive_if_required()  # the gateway protocol keeps its own timer
        self.connections.discard(self)
        protocol = GatewayProtocol(self.config, self.server_state, self.app_state, _loop=self.loop)
        _take_over(protocol, self.transport, self.flow.write_paused)
        protocol._await_request()


def _take_over(
    protocol: asyncio.Protocol, transport: asyncio.Transport, write_paused: bool
) -> None:
    """Make ``protocol`` the connection's from now on."""
    protocol.connection_made(transport)
    if write_paused:
        # The transport tells a protocol only when its buffer crosses the mark: the new one
        # must know that it is already past it.
        protocol.pause_writing()
    transport.set_protocol(protocol)
