"""Request heads as httptools reads them: what the server adapter needs of one, and the bound
on their size (a 431 past it). Pure code: no socket, no server."""

from __future__ import annotations

import httptools

# Request heads (target and headers) larger than this are refused with a 431: uvicorn's
# httptools protocol takes heads of any size, which a client could fill memory with.
MAX_HEAD = 16_384
# Headers whose request the fast path leaves to the application.
_NOT_OURS = frozenset({b"content-length", b"transfer-encoding", b"upgrade", b"expect"})


def header_bytes(name: bytes, value: bytes) -> int:
    """What one header adds to a request head's size (see MAX_HEAD)."""
    return len(name) + len(value) + 4  # ": " and CRLF


class RequestHead:
    """httptools' callbacks for one request head: what the fast path needs of it."""

    __slots__ = (
        "authorization",
        "complete",
        "headers_done",
        "keep_alive",
        "last_event_id",
        "origin",
        "refused",
        "size",
        "url",
    )

    def __init__(self) -> None:
        self.url = b""
        self.size = 0  # of the target and headers (see MAX_HEAD)
        self.last_event_id: bytes | None = None
        self.authorization: bytes | None = None
        self.origin = False
        self.keep_alive = True  # HTTP/1.1's default (other versions are never answered here)
        self.refused = self.headers_done = self.complete = False

    def on_message_begin(self) -> None:
        self.refused = self.refused or self.headers_done  # a second request: not ours

    # Requests pipelined after the first are uvicorn's to read (the first is then refused
    # too): they neither add to this head nor count toward its size.

    def on_url(self, url: bytes) -> None:
        if self.headers_done:
            return
        self.url += url
        self.size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.headers_done:
            return
        self.size += header_bytes(name, value)
        name = name.lower()
        if name == b"last-event-id" and self.last_event_id is None:
            self.last_event_id = value
        elif name == b"authorization" and self.authorization is None:
            self.authorization = value
        elif name == b"origin":
            self.origin = True  # CORS: the application's middleware answers it
        elif name in _NOT_OURS or name in (b"last-event-id", b"authorization"):
            self.refused = True
        elif name == b"connection":
            tokens = {token.strip() for token in value.lower().split(b",")}
            self.keep_alive = self.keep_alive and b"close" not in tokens
            self.refused = self.refused or b"upgrade" in tokens

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_message_complete(self) -> None:
        self.complete = True


class HeadSizes:
    """httptools' callbacks over every byte a connection receives from the request handed to
    uvicorn's protocol on (which reads heads of any size; the fast path bounds the heads it
    reads itself): the size of each request head as it arrives.

    A head's size is the larger of what its completed target and headers hold and the bytes
    of the pieces received wholly inside it (a header that never ends is never completed).
    Neither counts a byte outside the head, so no head within the limit is refused.
    """

    __slots__ = ("_began", "_in_head", "_over", "_parser", "_raw", "_size", "_stopped")

    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._in_head = self._began = self._stopped = self._over = False
        self._size = self._raw = 0

    def on_message_begin(self) -> None:
        self._in_head = self._began = True
        self._size = self._raw = 0

    def on_url(self, url: bytes) -> None:
        self._size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._size += header_bytes(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._over = self._over or self._size > MAX_HEAD

    def too_large(self, data: bytes) -> bool:
        """Whether, with ``data``, the head being received passed :data:`MAX_HEAD`."""
        if self._stopped:
            return False
        inside, self._began = self._in_head, False
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            # Not HTTP/1.1 this parser can follow: the protocol answers it (a 400), and
            # counting stops for the connection.
            self._stopped = True
            return False
        if inside and not self._began:
            self._raw += len(data)
        return self._over or (self._in_head and max(self._size, self._raw) > MAX_HEAD)
