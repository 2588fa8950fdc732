"""A Python client for tokenrelay streams that survives flaky networks.

::

    async with TokenrelayClient("http://127.0.0.1:8000") as client:
        stream = await client.ask("Tell me about streams", max_tokens=64)
        async for piece in stream:
            if isinstance(piece, Reset):
                text = ""          # another worker generates the answer again
            else:
                text += piece.text

It reconnects whenever the connection fails, goes silent for longer than
``silence_allowance_s`` (the server sends a heartbeat well within it), or closes before the
answer's end; each reconnect sends ``Last-Event-ID`` so nothing is missed or repeated. Delays
grow exponentially with full jitter, and are never shorter than the server's ``retry:`` hint.
It stops cleanly at ``[DONE]`` (or a 204: the answer was already complete), and raises
:class:`StreamFailed` on an ``error`` event and :class:`StreamCancelled` on ``cancelled``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType

import httpx
import orjson
from httpx_sse import aconnect_sse

from shared.errors import TokenrelayError


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of the answer and its event id (its resume position)."""

    text: str
    event_id: str


@dataclass(frozen=True, slots=True)
class Reset:
    """Discard what you have: the answer is being generated again from the start."""

    event_id: str


class StreamFailed(TokenrelayError):
    """The generation failed (an ``error`` event), or the message cannot be read."""

    def __init__(self, message: str, error_type: str = "error") -> None:
        super().__init__(message)
        self.error_type = error_type


class StreamCancelled(TokenrelayError):
    """The generation was cancelled."""


_TRANSIENT = frozenset({429, 502, 503, 504})


class _Dropped(Exception):
    pass


class MessageStream:
    """The events of one message, as an async iterator of :class:`Chunk` and :class:`Reset`."""

    def __init__(
        self,
        client: TokenrelayClient,
        message_id: str,
        last_event_id: str | None,
        first: httpx.Response | None = None,
    ) -> None:
        self.message_id = message_id
        self.last_event_id = last_event_id
        self.reconnects = 0
        #: The gateway of the current connection (its X-Served-By header).
        self.served_by: str | None = None
        self._client = client
        self._first = first

    def __aiter__(self) -> AsyncIterator[Chunk | Reset]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[Chunk | Reset]:
        failures = 0
        retry_s = self._client.initial_backoff_s
        while True:
            try:
                async for piece in self._connection():
                    failures = 0
                    if piece is None:
                        return
                    yield piece
                raise _Dropped("the stream ended before the answer's end")
            except (_Dropped, httpx.TransportError) as exc:
                self.reconnects += 1
                failures += 1
                await asyncio.sleep(self._client.backoff_s(failures, self._retry_hint_s or retry_s))
                self._client.on_reconnect(self, exc)

    _retry_hint_s: float | None = None

    async def _connection(self) -> AsyncIterator[Chunk | Reset | None]:
        """One connection's pieces; None means the answer is complete."""
        headers = {"Accept": "text/event-stream"}
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        path = f"/chat/stream/{self.message_id}"
        async with aconnect_sse(self._client.http, "GET", path, headers=headers) as source:
            response = source.response
            self.served_by = response.headers.get("x-served-by")
            if response.status_code == 204:
                yield None  # the answer was complete already
                return
            if response.status_code in _TRANSIENT:
                # A balancer with no gateway at hand, or one shedding load: come back later.
                hint = response.headers.get("retry-after", "")
                if hint.isdigit():
                    self._retry_hint_s = float(hint)
                raise _Dropped(f"{response.status_code} from the server")
            if response.status_code != 200:
                await response.aread()
                raise StreamFailed(f"{response.status_code}: {response.text}", "http_error")
            async for sse in source.aiter_sse():
                if sse.retry is not None:
                    self._retry_hint_s = sse.retry / 1000
                if sse.event == "message" and sse.data == "[DONE]":
                    yield None
                    return
                piece = self._piece(sse.event, sse.data, sse.id)
                if piece is not None:
                    yield piece

    def _piece(self, event: str, data: str, event_id: str) -> Chunk | Reset | None:
        if event == "message" and data:
            self.last_event_id = event_id or self.last_event_id
            return Chunk(orjson.loads(data)["content"], self.last_event_id or "")
        if event == "reset":
            self.last_event_id = event_id or self.last_event_id
            return Reset(self.last_event_id or "")
        if event == "error":
            error = orjson.loads(data)["error"]
            raise StreamFailed(
                error.get("message", "generation failed"), error.get("type", "error")
            )
        if event == "cancelled":
            raise StreamCancelled(f"message {self.message_id} was cancelled")
        if event == "truncated":
            raise StreamFailed(
                f"part of message {self.message_id} is no longer retained", "history_truncated"
            )
        return None


class TokenrelayClient:
    """Asks tokenrelay for answers and follows them across failures."""

    def __init__(
        self,
        base_url: str,
        *,
        silence_allowance_s: float = 45.0,
        initial_backoff_s: float = 0.25,
        max_backoff_s: float = 15.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        # The read timeout is the silence allowance: the server's heartbeats keep a healthy
        # stream well within it; a dead one (a half-open connection) trips it.
        timeout = httpx.Timeout(10.0, read=silence_allowance_s)
        self.http = http or httpx.AsyncClient(base_url=base_url, timeout=timeout)
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self.reconnect_log: list[str] = []

    async def __aenter__(self) -> TokenrelayClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.http.aclose()

    async def ask(self, prompt: str, *, max_tokens: int | None = None) -> MessageStream:
        """Start a generation and return its stream (read from its start)."""
        body: dict[str, object] = {"prompt": prompt, "stream": True}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        async with self.http.stream("POST", "/chat/stream", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                raise StreamFailed(f"{response.status_code}: {response.text}", "http_error")
            message_id = response.headers["x-message-id"]
        # The POST's own stream is closed at once; the answer is read (and resumed) by GET.
        return MessageStream(self, message_id, None)

    def follow(self, message_id: str, *, last_event_id: str | None = None) -> MessageStream:
        """The stream of an existing message, from after ``last_event_id``."""
        return MessageStream(self, message_id, last_event_id)

    def backoff_s(self, failures: int, base_s: float) -> float:
        """Exponential backoff with full jitter, never below the server's hint."""
        ceiling = min(self.max_backoff_s, base_s * 2 ** (failures - 1))
        return max(base_s, random.uniform(0, ceiling))

    def on_reconnect(self, stream: MessageStream, reason: BaseException) -> None:
        self.reconnect_log.append(
            f"resumed {stream.message_id} after {stream.last_event_id}: {reason!r}"
        )
