"""The server adapter (gateway.server): stream GETs answered without the application, the same
bytes; connections shared with uvicorn's protocol; live events written to the socket."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import pathlib
import re
import resource
import socket
import struct
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

import h11
import httpx
import orjson
import pytest
import uvicorn
from starlette.responses import Response
from uvicorn.server import ServerState

from gateway import fast_path, request_heads, routes
from gateway.frames import Renderer
from gateway.positions import MessageInfo
from gateway.server import GatewayConnection, served, uvicorn_options
from shared import keys
from shared.events import ZERO_ID, Kind
from shared.messages import Job, new_message_id, submit
from shared.redis_client import RedisClient
from shared.settings import Settings
from shared.streams import read_after
from tests.support import PARTITIONS, Stack, content_of, eventually, parse_sse, start_stack
from tokenrelay.local_redis import free_port
from worker.backends.mock import mock_text
from worker.script_batch import ScriptBatch
from worker.stream_writer import StreamWriter

_DATE = re.compile(rb"\r\ndate: [^\r]*\r\n")
#: The end of the chunk that carries the token "t2 " (seed format).
_T2 = b't2 "}\n\n\r\n'


@dataclass
class _Message:
    message_id: str
    writer: StreamWriter
    redis: RedisClient

    async def tokens(self, count: int) -> list[str]:
        """Append ``count`` chunks as a worker does; every entry id of the stream so far."""
        for i in range(count):
            await self.writer.append(Kind.CHUNK, orjson.dumps(f"t{i} "))
        stream = keys.message_stream(self.message_id)
        events = await read_after(self.redis, stream, ZERO_ID, count=10_000)
        return [str(event.id) for event in events]


async def _message(redis: RedisClient, appends: ScriptBatch) -> _Message:
    """A message claimed as a worker claims one, with nothing written yet."""
    message_id = new_message_id()
    job = Job(message_id=message_id, prompt="server", max_tokens=1)
    await submit(redis, job, ttl_ms=60_000, model="m-test", partitions=PARTITIONS)
    writer = StreamWriter(redis, appends, message_id, "test", ttl_ms=60_000, maxlen=1_000)
    assert await writer.claim() == "ok"
    return _Message(message_id, writer, redis)


async def _connect(stack: Stack) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    port = int(stack.url.rsplit(":", 1)[1])
    return await asyncio.open_connection("127.0.0.1", port)


async def _resume(
    stack: Stack, path: str, cursor: str, *headers: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A new connection that sent a GET of ``path`` with ``Last-Event-ID: cursor``."""
    reader, writer = await _connect(stack)
    writer.write(_get(path, f"Last-Event-ID: {cursor}", *headers))
    return reader, writer


def _get(path: str, *headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: test", *(h for h in headers if h)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _read_until(reader: asyncio.StreamReader, ending: bytes) -> bytes:
    raw = b""
    async with asyncio.timeout(10):
        while not raw.endswith(ending):
            piece = await reader.read(65536)
            assert piece, f"connection closed after {raw!r}"
            raw += piece
    return raw


@contextlib.asynccontextmanager
async def _following(stack: Stack, message: _Message) -> AsyncIterator[None]:
    """A client that follows ``message`` from the start, so that its tail is warm here (and
    holds what is written from now on)."""
    _, writer = await _connect(stack)
    writer.write(_get(f"/chat/stream/{message.message_id}"))
    await eventually(lambda: stack.hub.warm_tail(message.message_id) is not None)
    try:
        yield
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def _warm(
    settings: Settings, redis: RedisClient, appends: ScriptBatch, tokens: int = 3
) -> AsyncIterator[tuple[Stack, _Message, list[str]]]:
    """A gateway following a new message that then gets ``tokens`` chunks, all of them in the
    gateway's memory; yields it, the message and the stream's entry ids."""
    message = await _message(redis, appends)
    async with start_stack(settings, worker=False) as stack, _following(stack, message):
        yield stack, message, await message.tokens(tokens)


def _heard(stack: Stack, message_id: str) -> str | None:
    """The last entry id the gateway's tail of ``message_id`` holds, if it is warm."""
    tail = stack.hub.warm_tail(message_id)
    return None if tail is None else str(tail.last_id)


def _answered_here(stack: Stack) -> int:
    return stack.hub.counters.fast_path_answers


_HEADER = "Last-Event-ID: {cursor}"


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/chat/stream/{id}", (_HEADER,)),
        ("/chat/stream/{id}", (_HEADER, "Connection: close")),
        ("/chat/stream/{id}?last_event_id=0-1", (_HEADER,)),  # the header wins
        ("/chat/stream/{id}?last_event_id=0-1&last_event_id={cursor}", ()),  # the last one
        ("/chat/stream/{id}?last_event_id=+{cursor}+", ()),  # blanks around it
        ("/v1/chat/completions/{id}/stream", (_HEADER,)),
    ],
)
async def test_a_resume_from_memory_gets_the_bytes_the_application_sends(
    settings: Settings,
    redis: RedisClient,
    appends: ScriptBatch,
    path: str,
    headers: tuple[str, ...],
) -> None:
    message = await _message(redis, appends)
    answers = []
    closing = "Connection: close" in headers
    plain = dataclasses.replace(settings, fast_path=False)
    async with (
        start_stack(settings, worker=False) as ours,
        start_stack(plain, worker=False) as uvicorns,
        _following(ours, message),
        _following(uvicorns, message),
    ):
        ids = await message.tokens(6)
        await message.writer.append(Kind.DONE, b"")
        # Both answer once the end is in their memory: before, the one would write it with the
        # catch-up and the other after it, in a chunk of its own.
        end = (await message.tokens(0))[-1]
        await eventually(lambda: _heard(ours, message.message_id) == end)
        await eventually(lambda: _heard(uvicorns, message.message_id) == end)
        target = path.format(id=message.message_id, cursor=ids[2])
        lines = [header.format(cursor=ids[2]) for header in headers]
        for stack in (ours, uvicorns):
            reader, writer = await _connect(stack)
            writer.write(_get(target, *lines))
            answers.append(_DATE.sub(b"\r\ndate: -\r\n", await _read_until(reader, b"0\r\n\r\n")))
            if closing:
                assert await reader.read() == b""  # closed, as asked
            writer.close()
        assert _answered_here(ours) == 1  # this resume (the follower's join was cold)
        assert _answered_here(uvicorns) == 0
    assert answers[0] == answers[1]
    assert answers[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert (b"connection: close" in answers[0]) == closing
    body = answers[0].split(b"\r\n\r\n", 1)[1]
    assert b"t2 " not in body
    assert all(f"t{i} ".encode() in body for i in range(3, 6))


async def test_a_cold_join_written_directly_gets_the_bytes_of_plain_asgi(
    settings: Settings, redis: RedisClient, appends: ScriptBatch
) -> None:
    message = await _message(redis, appends)
    ids = await message.tokens(4)
    await message.writer.append(Kind.DONE, b"")
    answers = []
    plain = dataclasses.replace(settings, fast_path=False)
    async with (
        start_stack(settings, worker=False) as ours,
        start_stack(plain, worker=False) as uvicorns,
    ):
        for stack in (ours, uvicorns):
            # Nothing of the message is in memory: the application answers, its head held.
            assert stack.hub.warm_tail(message.message_id) is None
            reader, writer = await _resume(stack, f"/chat/stream/{message.message_id}", ids[0])
            answers.append(_DATE.sub(b"\r\ndate: -\r\n", await _read_until(reader, b"0\r\n\r\n")))
            writer.close()
        assert (ours.hub.counters.direct_streams, ours.hub.counters.asgi_streams) == (1, 0)
        assert (uvicorns.hub.counters.direct_streams, uvicorns.hub.counters.asgi_streams) == (0, 1)
    assert answers[0] == answers[1]
    assert answers[0].count(b"data:") == 4


async def test_what_it_does_not_answer_goes_to_the_application(
    settings: Settings, redis: RedisClient, appends: ScriptBatch
) -> None:
    message = await _message(redis, appends)
    early = await message.tokens(2)
    small = dataclasses.replace(settings, live_replay=1)
    async with start_stack(small, worker=False) as stack, stack.client() as client:
        path = f"/chat/stream/{message.message_id}"
        async with _following(stack, message):
            # Written before this gateway followed the message: only Redis has it.
            reader, writer = await _resume(stack, path, early[0])
            assert (await _read_until(reader, b't1 "}\n\n\r\n')).startswith(b"HTTP/1.1 200")
            writer.close()
            assert _answered_here(stack) == 0
            bad = await client.get(path, headers={"Last-Event-ID": "soon"})
            assert bad.status_code == 400
            assert "not an event id" in bad.json()["error"]["message"]
            foreign = await client.get(path, headers={"Last-Event-ID": "1-1"})
            assert foreign.status_code == 400
            unknown = await client.get(f"/chat/stream/{new_message_id()}")
            assert unknown.status_code == 404
            assert unknown.json()["error"]["type"] == "not_found"
            await message.writer.append(Kind.DONE, b"")
            final = (await message.tokens(0))[-1]
            finished = await client.get(path, headers={"Last-Event-ID": final})
            assert finished.status_code == 204  # the final event: nothing more, ever
            head = await client.head(path)
            assert head.status_code == 200
            assert head.headers["content-type"].startswith("text/event-stream")
            health = await client.get("/healthz")
            assert health.json() == {"status": "ok"}
        assert _answered_here(stack) == 0


async def test_a_request_sent_during_a_stream_is_answered_after_it(
    settings: Settings, redis: RedisClient, appends: ScriptBatch
) -> None:
    async with _warm(settings, redis, appends) as (stack, message, ids):
        reader, writer = await _resume(stack, f"/chat/stream/{message.message_id}", ids[0])
        first = await _read_until(reader, _T2)
        assert _answered_here(stack) == 1
        writer.write(_get("/healthz"))
        await asyncio.sleep(0.1)
        await message.writer.append(Kind.DONE, b"")
        raw = first + await _read_until(reader, b'{"status":"ok"}')
        writer.close()
    stream, health = raw.split(b"\r\n0\r\n\r\n", 1)
    assert stream.endswith(b"data: [DONE]\n\n")
    assert health.startswith(b"HTTP/1.1 200 OK\r\n")


async def test_a_connection_uvicorn_served_stays_with_it_and_is_still_written_directly(
    settings: Settings, redis: RedisClient, appends: ScriptBatch
) -> None:
    async with _warm(settings, redis, appends) as (stack, message, ids):
        path = f"/chat/stream/{message.message_id}"
        for first in (_get("/healthz"), _get("/healthz")[:5]):
            reader, writer = await _connect(stack)
            writer.write(first)  # uvicorn's, or the start of a request behind a stream
            if first == _get("/healthz"):
                await _read_until(reader, b'{"status":"ok"}')
            else:
                writer.write(_get("/healthz")[5:])
                await _read_until(reader, b'{"status":"ok"}')
            writer.write(_get(path, f"Last-Event-ID: {ids[0]}"))
            await _read_until(reader, _T2)
            writer.close()
        assert _answered_here(stack) == 0
        assert stack.hub.counters.direct_streams == 3  # the follower's, and both of these
        # A body still arriving when the answer is complete (a 404 reads none): the same.
        reader, writer = await _connect(stack)
        writer.write(b"POST /nowhere HTTP/1.1\r\nHost: test\r\nContent-Length: 10\r\n\r\n12345")
        await _read_until(reader, b'"code":null}}')
        writer.write(b"67890" + _get("/healthz"))
        await _read_until(reader, b'{"status":"ok"}')
        writer.close()


async def test_a_client_that_leaves_is_forgotten_and_one_that_stays_idle_is_closed(
    settings: Settings, redis: RedisClient, appends: ScriptBatch
) -> None:
    async with _warm(settings, redis, appends) as (stack, message, ids):
        path = f"/chat/stream/{message.message_id}"
        reader, writer = await _resume(stack, path, ids[1])
        await _read_until(reader, _T2)
        assert stack.hub.subscriber_count == 2
        writer.close()
        await eventually(lambda: stack.hub.subscriber_count == 1)
        # A stream that ended leaves a kept-alive connection, closed after uvicorn's timeout.
        reader, writer = await _resume(stack, path, ids[1])
        await _read_until(reader, _T2)
        await message.writer.append(Kind.DONE, b"")
        await _read_until(reader, b"0\r\n\r\n")
        async with asyncio.timeout(10):
            assert await reader.read() == b""
        writer.close()
        assert _answered_here(stack) == 2


async def test_a_draining_gateway_ends_the_streams_it_answered_with_a_retry_hint(
    settings: Settings, redis: RedisClient, appends: ScriptBatch
) -> None:
    async with _warm(settings, redis, appends) as (stack, message, ids):
        reader, writer = await _resume(stack, f"/chat/stream/{message.message_id}", ids[1])
        await _read_until(reader, _T2)
        stack.hub.drain()
        raw = await _read_until(reader, b"0\r\n\r\n")
        assert await reader.read() == b""  # and closes: the client goes elsewhere
        writer.close()
    assert raw.endswith(b"retry: 2000\n: this gateway is shutting down; reconnect\n\r\n0\r\n\r\n")


async def test_the_access_line_is_the_same_whoever_answers(
    settings: Settings, redis: RedisClient, appends: ScriptBatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tokenrelay.access")
    async with _warm(settings, redis, appends) as (stack, message, ids):
        path = f"/chat/stream/{message.message_id}?from=log"
        # The second is uvicorn's to answer (a body length): the line to match.
        for extra in ("", "Content-Length: 0"):
            reader, writer = await _resume(stack, path, ids[1], extra)
            await _read_until(reader, _T2)
            writer.close()
        assert _answered_here(stack) == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "tokenrelay.access"]
    ports = re.compile(r":\d+ ")
    assert len(lines) == 3  # the follower, then both resumes
    assert ports.sub(": ", lines[1]) == ports.sub(": ", lines[2])
    # The query is left out of the line (it may carry a credential).
    logged = path.split("?")[0] + "?…"
    assert re.fullmatch(rf'127\.0\.0\.1:\d+ - "GET {re.escape(logged)} HTTP/1\.1" 200', lines[1])


@pytest.mark.parametrize(
    "head",
    [
        b"POST /chat/stream/{id} HTTP/1.1\r\nHost: a",
        b"GET /chat/stream/{id} HTTP/1.0\r\nHost: a",
        b"GET /chat/stream/%41{id} HTTP/1.1\r\nHost: a",
        b"GET /chat/stream/{id} HTTP/1.1\r\nHost: a\r\n folded",
        b"GET /chat/stream/{id} HTTP/1.1\r\nHost: a\x01",
        b"GET /chat/stream/{id} HTTP/1.1\r\nContent-Length: 0",
        b"GET /chat/stream/{id} HTTP/1.1\r\nTransfer-Encoding: chunked",
        b"GET /chat/stream/{id} HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket",
        b"GET /chat/stream/{id} HTTP/1.1\r\nBad Name: 1",
        b"GET /chat/stream/{id} HTTP/1.1\r\nLast-Event-ID: 1-1\r\nLast-Event-ID: 1-2",
    ],
)
async def test_a_request_it_does_not_fully_understand_is_left_to_uvicorn(
    settings: Settings, redis: RedisClient, appends: ScriptBatch, head: bytes
) -> None:
    async with _warm(settings, redis, appends) as (stack, message, _):
        reader, writer = await _connect(stack)
        writer.write(head.replace(b"{id}", message.message_id.encode()) + b"\r\n\r\n")
        async with asyncio.timeout(10):
            answer = await reader.read(65536)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 ")
        assert _answered_here(stack) == 0  # the follower joined through uvicorn


async def test_a_failure_while_answering_leaves_the_request_to_the_application(
    settings: Settings,
    redis: RedisClient,
    appends: ScriptBatch,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(message_id: str, info: MessageInfo, retry_ms: int | None) -> Renderer:
        del info, retry_ms
        raise RuntimeError(f"renderer of {message_id} broke")

    async with _warm(settings, redis, appends, 2) as (stack, message, ids):
        seed, *others = routes.STREAM_GETS
        monkeypatch.setattr(
            fast_path, "STREAM_GETS", (dataclasses.replace(seed, renderer=broken), *others)
        )
        reader, writer = await _resume(stack, f"/chat/stream/{message.message_id}", ids[0])
        answer = await _read_until(reader, b't1 "}\n\n\r\n')
        writer.close()
        await eventually(lambda: stack.hub.subscriber_count == 1)
        assert _answered_here(stack) == 0
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")  # the application's own
    assert f"renderer of {message.message_id} broke" in caplog.text


async def test_a_head_it_cannot_answer_is_handed_over_before_it_is_complete(stack: Stack) -> None:
    reader, writer = await _connect(stack)
    writer.write(b"GET /healthz HTTP/1.1\n\n")  # bare line feeds: uvicorn refuses them
    async with asyncio.timeout(10):
        answer = await reader.read(65536)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 ")


async def test_a_connection_handed_over_while_its_writes_wait_keeps_waiting() -> None:
    class Transport:
        def __init__(self) -> None:
            self.written = b""

        def get_extra_info(self, name: str, default: object = None) -> object:
            return ("127.0.0.1", 8000) if name in ("sockname", "peername") else default

        def is_closing(self) -> bool:
            return False

        def pause_reading(self) -> None: ...

        def resume_reading(self) -> None: ...

        def write(self, data: bytes) -> None:
            self.written += data

        def close(self) -> None: ...

        def get_write_buffer_size(self) -> int:
            return 0

    settings = Settings()
    options = uvicorn_options(settings, "127.0.0.1", 8000) | {"log_level": "warning"}
    config = uvicorn.Config(served(Response(status_code=204)), **options)
    config.load()
    ours = GatewayConnection(config, ServerState(), {})
    transport = Transport()
    ours.connection_made(cast(Any, transport))
    ours.pause_writing()  # the client stopped reading a stream's catch-up
    ours.data_received(b"POST /x HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    await asyncio.sleep(0.05)
    assert transport.written == b""  # uvicorn's answer waits for the client to read
    ours.resume_writing()
    await eventually(lambda: transport.written.startswith(b"HTTP/1.1 204"))
    ours.connection_lost(None)


# Live events written to the socket


async def test_live_subscribers_are_written_directly(stack: Stack) -> None:
    async with (
        stack.client() as client,
        client.stream("POST", "/chat/stream", json={"prompt": "direct", "max_tokens": 40}) as r,
    ):
        raw = b""
        async for piece in r.aiter_bytes():
            raw += piece
    assert content_of(parse_sse(raw)) == mock_text("direct", 40)
    assert stack.hub.counters.direct_streams == 1
    assert stack.hub.counters.asgi_streams == 0


@pytest.mark.parametrize("level", ["trace", "debug", "info", "warning"])
async def test_the_fast_path_engages_at_every_log_level(
    settings: Settings, redis: RedisClient, appends: ScriptBatch, level: str
) -> None:
    """Fails loudly if a change of the server (or of how it is configured) loses the socket
    or the answers from memory, whatever the log level."""
    message = await _message(redis, appends)
    async with (
        start_stack(settings, worker=False, log_level=level) as stack,
        stack.client() as client,
    ):
        # uvicorn's answer (a POST) writes its live events to the socket too.
        async with client.stream("POST", "/chat/stream", json={"prompt": "x", "max_tokens": 2}):
            pass
        async with _following(stack, message):
            ids = await message.tokens(3)
            await eventually(lambda: _heard(stack, message.message_id) == ids[-1])
            reader, writer = await _resume(stack, f"/chat/stream/{message.message_id}", ids[0])
            await _read_until(reader, _T2)
            writer.close()
        counters = stack.hub.counters
        assert (counters.fast_path_answers, counters.direct_streams) == (1, 3)
        assert counters.asgi_streams == 0


@pytest.mark.usefixtures("redis")
async def test_without_the_fast_path_everything_goes_through_asgi(settings: Settings) -> None:
    plain = dataclasses.replace(settings, fast_path=False)
    async with start_stack(plain) as stack, stack.client() as client:
        async with client.stream(
            "POST", "/chat/stream", json={"prompt": "asgi", "max_tokens": 20}
        ) as response:
            raw = await response.aread()
        message_id = response.headers["x-message-id"]
        replay = await client.get(f"/chat/stream/{message_id}")
        counters = stack.hub.counters
        assert (counters.fast_path_answers, counters.direct_streams, counters.asgi_streams) == (
            0,
            0,
            2,
        )
    assert content_of(parse_sse(raw)) == content_of(parse_sse(replay.content))
    assert content_of(parse_sse(raw)) == mock_text("asgi", 20)


@pytest.mark.timeout(60)
async def test_a_client_that_stops_reading_catches_up_from_redis_and_loses_nothing(
    settings: Settings, redis: RedisClient, appends: ScriptBatch
) -> None:
    async with start_stack(settings, worker=False) as stack:
        # Events written as a worker writes them, large enough to fill every socket buffer.
        message = await _message(redis, appends)
        port = int(stack.url.rsplit(":", 1)[1])
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await asyncio.to_thread(sock.connect, ("127.0.0.1", port))
        sock.sendall(_get(f"/chat/stream/{message.message_id}"))
        await eventually(lambda: _heard(stack, message.message_id) is not None)
        await eventually(lambda: stack.hub.subscriber_count == 1)
        pieces = [f"{i:04d}" + "x" * 32_000 for i in range(300)]  # about 10 MB
        for piece in pieces:
            await message.writer.append(Kind.CHUNK, orjson.dumps(piece))
            if stack.hub.counters.fell_behind:
                break  # the client (which reads nothing) fell behind: the point is made
            await asyncio.sleep(0.002)  # live, not a backlog: each event reaches the tail first
        assert stack.hub.counters.fell_behind == 1
        sent = pieces[: pieces.index(piece) + 1]
        await message.writer.append(Kind.DONE, b"")
        raw = await asyncio.to_thread(_read_response_body, sock)
    assert content_of(parse_sse(raw)) == "".join(sent)


def _read_response_body(sock: socket.socket) -> bytes:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "test")]))  # state only
    conn.send(h11.EndOfMessage())
    body = b""
    with sock:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return body


async def test_a_resume_sends_head_and_missed_events_in_one_write(
    settings: Settings, redis: RedisClient, appends: ScriptBatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[bytes] = []
    made = GatewayConnection.connection_made

    class Recording:
        def __init__(self, transport: asyncio.BaseTransport) -> None:
            self._transport = transport

        def __getattr__(self, name: str) -> Any:
            return getattr(self._transport, name)

        def write(self, data: bytes) -> None:
            writes.append(data)
            cast(asyncio.Transport, self._transport).write(data)

    def recording(self: GatewayConnection, transport: asyncio.BaseTransport) -> None:
        made(self, cast(asyncio.Transport, Recording(transport)))

    monkeypatch.setattr(GatewayConnection, "connection_made", recording)
    async with _warm(settings, redis, appends, 5) as (stack, message, ids):
        await eventually(lambda: _heard(stack, message.message_id) == ids[-1])
        for fast_path in (True, False):
            writes.clear()
            # Answered here; or by uvicorn (a Content-Length), its head held for the events.
            extra = "" if fast_path else "Content-Length: 0"
            reader, writer = await _resume(
                stack, f"/chat/stream/{message.message_id}", ids[1], extra
            )
            raw = await _read_until(reader, b't4 "}\n\n\r\n')
            writer.close()
            assert [e.id for e in parse_sse(raw.split(b"\r\n\r\n", 1)[1]).events] == ids[2:]
            first = writes[0]
            assert first.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"retry: " in first
            assert all(i.encode() in first for i in ids[2:])


def test_the_graceful_shutdown_is_bounded_by_the_grace_setting() -> None:
    options = uvicorn_options(Settings(shutdown_grace_s=2.5), "0.0.0.0", 8000)
    assert options["timeout_graceful_shutdown"] == 3
    assert (options["host"], options["port"], options["log_level"]) == ("0.0.0.0", 8000, "info")
    assert options["http"] is GatewayConnection
    # Without the fast path too: the connection class still keeps the timeouts.
    assert uvicorn_options(Settings(fast_path=False), "h", 1)["http"] is GatewayConnection


async def test_a_client_gone_before_its_stream_started_is_let_go(
    settings: Settings, redis: RedisClient, appends: ScriptBatch
) -> None:
    """The request and the hang-up arrive together: the connection is lost before the stream's
    task runs. Its subscriber must go, not follow the message to its end."""
    async with _warm(settings, redis, appends) as (stack, message, ids):
        port = int(stack.url.rsplit(":", 1)[1])
        request = _get(f"/chat/stream/{message.message_id}", f"Last-Event-ID: {ids[0]}")
        for _ in range(30):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await asyncio.to_thread(sock.connect, ("127.0.0.1", port))
            sock.sendall(request)
            sock.close()  # a reset, right behind the request
        # A last client, served after the others: by then they were all read (and let go).
        reader, writer = await _resume(stack, f"/chat/stream/{message.message_id}", ids[0])
        await _read_until(reader, _T2)
        assert _answered_here(stack) > 1  # (a request its reset overtook is never read)
        await eventually(lambda: stack.hub.subscriber_count == 2)  # the follower and this one
        writer.close()


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Whether the server ends the connection within ``seconds`` (reading what it sends)."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "asgi"])
async def test_a_client_that_reads_nothing_is_disconnected_after_the_send_timeout(
    settings: Settings, redis: RedisClient, appends: ScriptBatch, fast_path: bool
) -> None:
    """A frozen client (its socket never drained) is cut after TOKENRELAY_SEND_TIMEOUT_S,
    and its stream's memory with it; one that reads is not."""
    quick = dataclasses.replace(settings, send_timeout_s=1.0, fast_path=fast_path)
    message = await _message(redis, appends)
    async with start_stack(quick, worker=False) as stack:
        port = int(stack.url.rsplit(":", 1)[1])
        frozen = socket.create_connection(("127.0.0.1", port))
        reading = socket.create_connection(("127.0.0.1", port))
        with frozen, reading:
            await _frozen_and_reading(stack, message, frozen, reading)


async def _frozen_and_reading(
    stack: Stack, message: _Message, frozen: socket.socket, reading: socket.socket
) -> None:
    frozen.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    frozen.sendall(_get(f"/chat/stream/{message.message_id}"))
    # The client that reads, in a thread of its own: however busy this event loop gets,
    # it keeps reading.
    reading.sendall(_get(f"/chat/stream/{message.message_id}"))
    received = [0]

    def read_all() -> None:
        with contextlib.suppress(OSError):
            while piece := reading.recv(1 << 20):
                received[0] += len(piece)

    reader_thread = threading.Thread(target=read_all, daemon=True)
    reader_thread.start()
    big = orjson.dumps("x" * 60_000)
    for _ in range(150):  # 9 MB: past every buffer between the gateway and the client
        await message.writer.append(Kind.CHUNK, big)
    await eventually(lambda: stack.hub.counters.send_timeouts == 1, timeout_s=15)
    await eventually(lambda: received[0] > 9_000_000, timeout_s=15)
    assert stack.hub.counters.send_timeouts == 1
    # The frozen client's subscriber goes once its stream's task has seen the cut.
    await eventually(lambda: stack.hub.subscriber_count == 1)  # the reading client's
    reading.shutdown(socket.SHUT_RDWR)
    reader_thread.join(5)


async def test_a_request_head_that_never_completes_is_closed(settings: Settings) -> None:
    quick = dataclasses.replace(settings, header_timeout_s=0.5)
    async with start_stack(quick, worker=False) as stack:
        reader, writer = await _connect(stack)
        writer.write(b"GET /chat/stream/abc HTTP/1.1\r\nHost: te")  # and nothing more
        assert await _closed_within(reader, 5)
        idle_reader, idle_writer = await _connect(stack)  # says nothing at all
        assert await _closed_within(idle_reader, 5)
        assert stack.hub.counters.header_timeouts == 2
        polite_reader, polite_writer = await _connect(stack)
        polite_writer.write(_get("/healthz"))
        assert (await _read_until(polite_reader, b'{"status":"ok"}')).startswith(b"HTTP/1.1 200")
        for w in (writer, idle_writer, polite_writer):
            w.close()


async def test_head_on_a_live_stream_answers_at_once(
    settings: Settings, redis: RedisClient, appends: ScriptBatch
) -> None:
    async with _warm(settings, redis, appends) as (stack, message, _), stack.client() as client:
        head = await asyncio.wait_for(client.head(f"/chat/stream/{message.message_id}"), 5)
        assert head.status_code == 200
        assert head.content == b""


async def test_a_gateway_started_with_a_low_open_file_limit_raises_it(settings: Settings) -> None:
    """Each client holds a socket: a gateway given the usual soft limit of 1,024 (or less)
    raises it to the hard limit at start, whichever way it was started."""
    low = 256
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard > low, "the hard limit of this machine is too low to test raising to it"

    def lowered() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))

    port = free_port()
    env = {**os.environ, "REDIS_URL": settings.effective_redis_url, "TOKENRELAY_AUTH": "off"}
    gateway = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "tokenrelay", "gateway", "--port", str(port)),
        env=env,
        preexec_fn=lowered,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:

            async def healthy() -> bool:
                try:
                    return (await client.get("/healthz")).status_code == 200
                except httpx.TransportError:
                    return False

            for _ in range(400):
                if await healthy():
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the gateway did not start")
        limits = await asyncio.to_thread(pathlib.Path(f"/proc/{gateway.pid}/limits").read_text)
        (line,) = [line for line in limits.splitlines() if line.startswith("Max open files")]
        assert line.split()[3:5] == [str(hard), str(hard)]
    finally:
        gateway.terminate()
        _, errors = await asyncio.wait_for(gateway.communicate(), timeout=30)
    assert f"open-file limit raised from {low} to {hard}" in errors.decode()


async def _answer_to(stack: Stack, *parts: bytes) -> bytes:
    """Everything the gateway answers on a new connection that sends ``parts`` (and then
    waits): the connection must end."""
    reader, writer = await _connect(stack)
    answer = b""
    try:
        for part in parts:
            writer.write(part)
            await writer.drain()
        async with asyncio.timeout(10):
            while piece := await reader.read(65536):
                answer += piece
    except (ConnectionResetError, BrokenPipeError):
        pass  # refused while it was still sending: what was answered is read
    finally:
        writer.close()
    return answer


async def test_request_heads_larger_than_the_limit_are_refused_with_431(
    settings: Settings,
) -> None:
    """uvicorn's protocol reads a head of any size; the gateway stops at MAX_HEAD, whoever
    would answer the request, and on every request of a connection."""
    big = "x" * (request_heads.MAX_HEAD + 1)
    many = [f"X-{n}: {n}" for n in range(2000)]  # 2,000 small headers: over 16 KB in all
    post = b"POST /chat/stream HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
    async with start_stack(settings, worker=False) as stack:
        refusals = [
            await _answer_to(stack, _get("/healthz", f"X-Big: {big}")),
            await _answer_to(stack, _get("/chat/stream/abc", *many)),
            await _answer_to(stack, _get(f"/chat/stream/abc?pad={big}")),
            await _answer_to(stack, _get(f"/chat/stream/{'A' * 22}", f"X-Big: {big}")),
            # Sent on and on in pieces, never completed: refused as it passes the limit.
            await _answer_to(stack, b"GET / HTTP/1.1\r\nX-Endless: ", *[b"y" * 4096] * 300),
            # The second request of a connection, after one that uvicorn's protocol answered.
            await _answer_to(
                stack,
                post + b"Content-Length: 2\r\n\r\n{}",
                _get("/healthz", f"X-Big: {big}"),
            ),
        ]
        for answer in refusals:
            head, _, body = answer.rpartition(b"HTTP/1.1 431 ")[2].partition(b"\r\n\r\n")
            assert head.startswith(b"Request Header Fields Too Large"), answer[:300]
            error = orjson.loads(body)["error"]
            assert error["type"] == "request_header_fields_too_large"
            assert str(request_heads.MAX_HEAD) in error["message"]
        # Just under the limit is served; a large body is not a large head.
        fits = "x" * (request_heads.MAX_HEAD - 200)
        answer = await _answer_to(stack, _get("/healthz", f"X-Fits: {fits}", "Connection: close"))
        assert answer.startswith(b"HTTP/1.1 200 ")
        body = orjson.dumps({"prompt": "p" * 30_000, "max_tokens": 1_000_000})
        answer = await _answer_to(
            stack, post + b"Content-Length: %d\r\nConnection: close\r\n\r\n%b" % (len(body), body)
        )
        assert answer.startswith(b"HTTP/1.1 422 "), answer[:300]


async def test_a_request_that_is_not_http_gets_a_json_400(settings: Settings) -> None:
    async with start_stack(settings, worker=False) as stack:
        answers = [
            await _answer_to(stack, b"GARBAGE\r\n\r\n"),
            await _answer_to(stack, b"GET /healthz HTTP/1.1\r\nHost x\r\n\r\n"),
            await _answer_to(stack, b"GET /healthz HTTP/1.1\r\nX-Bad: a\x01b\r\n\r\n"),
            await _answer_to(
                stack,
                b"POST /chat/stream HTTP/1.1\r\nContent-Length: 2\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n{}",
            ),
        ]
    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer[:300]
        assert b"content-type: application/json" in head
        assert b"x-served-by: " in head
        error = orjson.loads(body)["error"]
        assert error["type"] == "bad_request"
        assert "not valid HTTP/1.1" in error["message"]


async def test_pipelined_requests_are_each_held_to_the_head_limit_not_all_together(
    settings: Settings,
) -> None:
    """Twenty requests of about 1 KB each, sent in one write: over 16 KB together, each well
    within it. Every one is answered, in order."""
    pad = "X-Pad: " + "p" * 900
    pipelined = _get("/healthz", pad) * 19 + _get("/healthz", pad, "Connection: close")
    assert len(pipelined) > request_heads.MAX_HEAD
    async with start_stack(settings, worker=False) as stack:
        answer = await _answer_to(stack, pipelined)
    assert answer.count(b"HTTP/1.1 200 OK\r\n") == 20, answer[:300]
    assert b" 431 " not in answer


async def test_a_request_body_sent_too_slowly_is_answered_408_and_one_cut_short_is_let_go(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    quick = dataclasses.replace(settings, header_timeout_s=0.5)
    head = (
        b"POST /chat/stream HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n"
    )
    async with start_stack(quick, worker=False) as stack:
        # 5 of 100 bytes, then nothing: held no longer than a head would be.
        answer = await _answer_to(stack, head + b'{"pro')
        status, _, rest = answer.partition(b"\r\n")
        assert status == b"HTTP/1.1 408 Request Timeout", answer[:300]
        error = orjson.loads(rest.partition(b"\r\n\r\n")[2])["error"]
        assert error["type"] == "request_timeout"
        # The same on the OpenAI routes, in OpenAI's terms.
        for path in (b"/v1/chat/completions", b"/v1/responses"):
            answer = await _answer_to(stack, head.replace(b"/chat/stream", path) + b'{"mod')
            status, _, rest = answer.partition(b"\r\n")
            assert status == b"HTTP/1.1 408 Request Timeout", answer[:300]
            error = orjson.loads(rest.partition(b"\r\n\r\n")[2])["error"]
            assert (error["type"], error["code"]) == ("invalid_request_error", "request_timeout")
        # 5 of 100 bytes, then the client leaves: nothing to answer, and no failure logged.
        caplog.set_level(logging.INFO, logger="gateway.bodies")
        _, writer = await _connect(stack)
        writer.write(head + b'{"pro')
        await writer.drain()
        writer.close()
        await eventually(lambda: "the client left" in caplog.text)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
