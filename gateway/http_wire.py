"""HTTP/1.1 bytes every answer shares, whoever writes it (the application or the server
adapter): stream and common headers, chunk framing, a stream's head, the access line."""

from __future__ import annotations

import email.utils
import logging
import os
import socket
import time
from http import HTTPStatus

SSE_MEDIA_TYPE = "text/event-stream; charset=utf-8"
SSE_HEADERS = {
    "Content-Type": SSE_MEDIA_TYPE,
    "Cache-Control": "no-cache",
    # nginx (and nginx-based ingresses) buffer proxied responses unless told not to.
    "X-Accel-Buffering": "no",
}
_RAW_SSE_HEADERS = [(k.lower().encode(), v.encode()) for k, v in SSE_HEADERS.items()]
LAST_CHUNK = b"0\r\n\r\n"
#: One line per request, whoever answered it (uvicorn's own access log is off).
access_log = logging.getLogger("tokenrelay.access")


def stream_headers(message_id: str, heartbeat_ms: int) -> list[tuple[bytes, bytes]]:
    """The headers of an event stream of ``message_id`` (X-Message-Id: the id to resume with,
    for clients that did not choose it; X-Heartbeat-Ms: the longest silence of a healthy
    stream, so that a client can tell a dead connection from a quiet one)."""
    return [
        *_RAW_SSE_HEADERS,
        (b"x-message-id", message_id.encode()),
        (b"x-heartbeat-ms", b"%d" % heartbeat_ms),
    ]


class _Clock:
    """The ``date`` header, made once a second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def header(self) -> tuple[bytes, bytes]:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._value = email.utils.formatdate(now, usegmt=True).encode()
        return (b"date", self._value)


_clock = _Clock()
_served_by: dict[int, tuple[bytes, bytes]] = {}


def served_by() -> tuple[bytes, bytes]:
    """This process's ``X-Served-By`` header (per pid: each forked process has its own); which
    gateway a load balancer chose is otherwise hard to tell when a stream misbehaves."""
    pid = os.getpid()
    header = _served_by.get(pid)
    if header is None:
        header = _served_by[pid] = (b"x-served-by", f"{socket.gethostname()}:{pid}".encode())
    return header


def common_headers() -> list[tuple[bytes, bytes]]:
    """The headers every response of the gateway carries."""
    return [_clock.header(), served_by()]


def chunk(body: bytes) -> bytes:
    """``body`` as one HTTP/1.1 chunk."""
    return b"%x\r\n%b\r\n" % (len(body), body)


_STREAM_HEAD = b"".join(
    [b"HTTP/1.1 200 OK\r\n", *(b"%s: %s\r\n" % header for header in _RAW_SSE_HEADERS)]
)


def stream_head(message_id: str, heartbeat_ms: int, *, keep_alive: bool) -> bytes:
    """The head of a 200 event stream sent chunked, header for header as the application's
    answer (its headers, then the common ones, as its middleware adds them)."""
    date, served = common_headers()
    return (
        b"%bx-message-id: %b\r\nx-heartbeat-ms: %d\r\ndate: %b\r\nx-served-by: %b\r\n"
        b"%btransfer-encoding: chunked\r\n\r\n"
        % (
            _STREAM_HEAD,
            message_id.encode(),
            heartbeat_ms,
            date[1],
            served[1],
            b"" if keep_alive else b"connection: close\r\n",
        )
    )


def log_access(
    client: tuple[str, int] | None, method: str, target: bytes, http_version: str, status: int
) -> None:
    """The access line of one request (``target``: its path and query, as sent). The query is
    left out: it may carry a credential (an EventSource cannot send headers)."""
    path, query, _ = target.partition(b"?")
    # Health checks and scrapes come every second or so: at info they would drown the rest.
    level = logging.DEBUG if path in _QUIET_PATHS and status == 200 else logging.INFO
    if access_log.isEnabledFor(level):
        peer = f"{client[0]}:{client[1]}" if client else "-"
        line = path.decode("latin-1") + ("?…" if query else "")
        access_log.log(level, '%s - "%s %s HTTP/%s" %d', peer, method, line, http_version, status)


_QUIET_PATHS = frozenset({b"/healthz", b"/readyz", b"/metrics"})


def refusal(status: int, body: bytes) -> bytes:
    """A whole response that refuses a request and closes the connection: for what is refused
    before any application sees it (a request head too large to read)."""
    date, served = common_headers()
    return (
        b"HTTP/1.1 %d %b\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\ndate: %b\r\nx-served-by: %b\r\n\r\n%b"
        % (status, HTTPStatus(status).phrase.encode(), len(body), date[1], served[1], body)
    )
