"""A Python client for tokenrelay streams that survives flaky networks.

::

    async with TokenrelayClient("http://127.0.0.1:8000") as client:
        stream = await client.ask("Tell me about streams", max_tokens=64)
        async for piece in stream:
            if isinstance(piece, Reset):
                text = ""          # another worker generates the answer again
            else:
                text += piece.text

It reconnects whenever the connection fails, goes silent for longer than the server's heartbeat
and ``heartbeat_margin_s`` (each stream says its heartbeat in ``X-Heartbeat-Ms``; at most
``silence_allowance_s``, which is also how long a response head may take), or closes before
the answer's end; each reconnect sends ``Last-Event-ID`` so nothing is missed or repeated. Delays
grow exponentially with full jitter, and are never shorter than the server's ``retry:`` hint.
It stops cleanly at ``[DONE]`` (or a 204: the answer was already complete), and raises
:class:`StreamFailed` on an ``error`` event and :class:`StreamCancelled` on ``cancelled``.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType

import httpx
import orjson
from httpx_sse import aconnect_sse
from redis.backoff import ExponentialWithJitterBackoff

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


def _retry_after_s(response: httpx.Response) -> float | None:
    """The delay a response's ``Retry-After`` asks for (seconds; its date form is not sent)."""
    hint = response.headers.get("retry-after", "")
    return float(hint) if hint.isascii() and hint.isdigit() else None


def _describe(exc: BaseException) -> str:
    """A failure in a few words: httpx's connection errors often have no message."""
    return str(exc) or type(exc).__name__


class _Watched(httpx.AsyncByteStream):
    """A response body that fails with ``ReadTimeout`` when no byte arrives for ``allowance_s``
    (heartbeats are comments, which an SSE parser never yields, so bytes are what is timed)."""

    def __init__(self, response: httpx.Response, allowance_s: float) -> None:
        self._inner = response.stream
        self._request = response.request
        self._allowance_s = allowance_s

    async def __aiter__(self) -> AsyncIterator[bytes]:
        assert isinstance(self._inner, httpx.AsyncByteStream)
        chunks = aiter(self._inner)
        while True:
            try:
                async with asyncio.timeout(self._allowance_s):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except TimeoutError as exc:
                raise httpx.ReadTimeout(
                    f"no byte for {self._allowance_s:g} s (the server's heartbeat allows less)",
                    request=self._request,
                ) from exc
            yield chunk

    async def aclose(self) -> None:
        assert isinstance(self._inner, httpx.AsyncByteStream)
        await self._inner.aclose()


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
        loop = asyncio.get_running_loop()
        failing_since: float | None = None
        while True:
            try:
                async for piece in self._connection():
                    failures, failing_since = 0, None
                    if piece is None:
                        return
                    yield piece
                raise _Dropped("the stream ended before the answer's end")
            except (_Dropped, httpx.TransportError) as exc:
                failing_since = loop.time() if failing_since is None else failing_since
                if loop.time() - failing_since >= self._client.give_up_after_s:
                    raise StreamFailed(
                        f"gave up after {self._client.give_up_after_s:.0f} s without an answer "
                        f"from {self._client.http.base_url} ({_describe(exc)})",
                        "unreachable",
                    ) from exc
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
                if (hint_s := _retry_after_s(response)) is not None:
                    self._retry_hint_s = hint_s
                raise _Dropped(f"{response.status_code} from the server")
            if response.status_code != 200:
                await response.aread()
                raise StreamFailed(f"{response.status_code}: {response.text}", "http_error")
            # Past the head, silence longer than the server's heartbeat allows means a dead
            # connection (the head alone may be slow: a busy gateway reading Redis for a resume).
            response.stream = _Watched(response, self._client.silence_after(response))
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
        heartbeat_margin_s: float = 10.0,
        initial_backoff_s: float = 0.25,
        max_backoff_s: float = 15.0,
        give_up_after_s: float = 120.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        # The read timeout is the silence allowance: the server's heartbeats keep a healthy
        # stream well within it; a dead one (a half-open connection) trips it. Once a stream's
        # head has said its heartbeat, the body is held to that (silence_after).
        timeout = httpx.Timeout(10.0, read=silence_allowance_s)
        self.http = http or httpx.AsyncClient(base_url=base_url, timeout=timeout)
        self.silence_allowance_s = silence_allowance_s
        self.heartbeat_margin_s = heartbeat_margin_s
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        #: How long reconnects may keep failing (no event in between) before StreamFailed.
        self.give_up_after_s = give_up_after_s
        self.reconnect_log: list[str] = []

    def silence_after(self, response: httpx.Response) -> float:
        """The longest silence of a healthy stream once its head has come: the heartbeat its
        ``X-Heartbeat-Ms`` announces and ``heartbeat_margin_s`` more, at most
        ``silence_allowance_s``.

        The margin (10 s unless told) is for a busy server, a slow network and this process's
        own event loop: a tighter allowance mistakes load for a dead connection, and every
        client that reconnects then adds to the load (Centrifugo's clients allow the same)."""
        raw = response.headers.get("x-heartbeat-ms", "")
        if raw.isascii() and raw.isdigit() and int(raw) > 0:
            return min(self.silence_allowance_s, int(raw) / 1000 + self.heartbeat_margin_s)
        return self.silence_allowance_s

    async def __aenter__(self) -> TokenrelayClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.http.aclose()

    async def ask(self, prompt: str, *, max_tokens: int | None = None) -> MessageStream:
        """Start a generation and return its stream (read from its start).

        The POST carries an ``Idempotency-Key``, so it is sent again, with backoff, when the
        connection fails or the server answers 5xx or 429 (for ``give_up_after_s``): a repeat
        answers the message the first one created, never a second generation.
        """
        body: dict[str, object] = {"prompt": prompt, "stream": True}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        loop = asyncio.get_running_loop()
        started = loop.time()
        for failures in itertools.count(1):
            try:
                async with self.http.stream(
                    "POST", "/chat/stream", json=body, headers=headers
                ) as response:
                    if response.status_code == 200:
                        message_id = response.headers["x-message-id"]
                        # Closed at once; the answer is read (and resumed) by GET.
                        return MessageStream(self, message_id, None)
                    await response.aread()
                    if response.status_code < 500 and response.status_code != 429:
                        raise StreamFailed(f"{response.status_code}: {response.text}", "http_error")
                    failure: BaseException = StreamFailed(
                        f"{response.status_code}: {response.text}", "http_error"
                    )
                    hint_s = _retry_after_s(response)
            except httpx.TransportError as exc:
                failure, hint_s = exc, None
            if loop.time() - started >= self.give_up_after_s:
                raise StreamFailed(
                    f"gave up after {self.give_up_after_s:.0f} s asking: {failure}", "unreachable"
                ) from failure
            delay = self.backoff_s(failures, self.initial_backoff_s)
            if hint_s is not None:
                delay = max(delay, hint_s)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover - the loop only returns

    def follow(self, message_id: str, *, last_event_id: str | None = None) -> MessageStream:
        """The stream of an existing message, from after ``last_event_id``."""
        return MessageStream(self, message_id, last_event_id)

    def backoff_s(self, failures: int, base_s: float) -> float:
        """Exponential backoff with full jitter, never below the server's hint."""
        jittered = ExponentialWithJitterBackoff(cap=self.max_backoff_s, base=base_s)
        return max(base_s, jittered.compute(failures - 1))

    def on_reconnect(self, stream: MessageStream, reason: BaseException) -> None:
        self.reconnect_log.append(
            f"resumed {stream.message_id} after {stream.last_event_id}: {reason!r}"
        )
