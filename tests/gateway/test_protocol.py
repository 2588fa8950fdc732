"""The gateway's own HTTP protocol: resumes from memory without the application, the same bytes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import cast

import orjson
import pytest
import uvicorn
from redis.asyncio import Redis
from starlette.responses import Response
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from gateway.direct import Gateway
from gateway.protocol import GatewayProtocol, parse_head
from gateway.render import Renderer
from shared import keys
from shared.events import ZERO_ID, Kind
from shared.messages import Job, new_message_id, submit
from shared.settings import Settings
from shared.streams import read_after
from tests.support import Stack, eventually, start_stack
from worker.script_batch import ScriptBatch
from worker.stream_writer import StreamWriter

_DATE = re.compile(rb"\r\ndate: [^\r]*\r\n")
#: The end of the chunk that carries the token "t2 " (seed format).
_T2 = b't2 "}\n\n\r\n'


@dataclass
class _Message:
    message_id: str
    writer: StreamWriter
    redis: Redis

    async def tokens(self, count: int) -> list[str]:
        """Append ``count`` chunks as a worker does; every entry id of the stream so far."""
        for i in range(count):
            await self.writer.append(Kind.CHUNK, orjson.dumps(f"t{i} "))
        stream = keys.message_stream(self.message_id)
        events = await read_after(self.redis, stream, ZERO_ID, count=10_000)
        return [str(event.id) for event in events]


async def _message(redis: Redis, appends: ScriptBatch) -> _Message:
    """A message claimed as a worker claims one, with nothing written yet."""
    message_id = new_message_id()
    job = Job(message_id=message_id, prompt="protocol", max_tokens=1)
    await submit(redis, job, ttl_ms=60_000, model="m-test")
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
    settings: Settings, redis: Redis, appends: ScriptBatch, tokens: int = 3
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


def _gateway(stack: Stack) -> Gateway:
    assert isinstance(stack.app, Gateway)
    return stack.app


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
    settings: Settings, redis: Redis, appends: ScriptBatch, path: str, headers: tuple[str, ...]
) -> None:
    message = await _message(redis, appends)
    answers = []
    closing = "Connection: close" in headers
    async with (
        start_stack(settings, worker=False) as ours,
        start_stack(settings, worker=False, http="httptools") as uvicorns,
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
        assert _gateway(ours).warm_answers == 1
        assert _gateway(uvicorns).warm_answers == 0
    assert answers[0] == answers[1]
    assert answers[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert (b"connection: close" in answers[0]) == closing
    body = answers[0].split(b"\r\n\r\n", 1)[1]
    assert b"t2 " not in body
    assert all(f"t{i} ".encode() in body for i in range(3, 6))


async def test_what_memory_cannot_answer_goes_to_the_application(
    settings: Settings, redis: Redis, appends: ScriptBatch
) -> None:
    message = await _message(redis, appends)
    early = await message.tokens(2)
    async with start_stack(settings, worker=False) as stack, stack.client() as client:
        path = f"/chat/stream/{message.message_id}"
        async with _following(stack, message):
            # Written before this gateway followed the message: only Redis has it.
            reader, writer = await _resume(stack, path, early[0])
            assert (await _read_until(reader, b't1 "}\n\n\r\n')).startswith(b"HTTP/1.1 200")
            writer.close()
            bad = await client.get(path, headers={"Last-Event-ID": "soon"})
            assert bad.status_code == 400
            assert "not an event id" in bad.json()["error"]["message"]
            unknown = await client.get(f"/chat/stream/{new_message_id()}")
            assert unknown.status_code == 404
            ids = await message.tokens(1)
            await message.writer.append(Kind.DONE, b"")
            # On the connection uvicorn served the requests above: it came back.
            done = await client.get(path, headers={"Last-Event-ID": ids[-1]})
            assert done.status_code == 200  # in memory: the DONE event alone
            assert done.text.endswith("data: [DONE]\n\n")
            assert _gateway(stack).warm_answers == 1
            final = (await message.tokens(0))[-1]
            finished = await client.get(path, headers={"Last-Event-ID": final})
            assert finished.status_code == 204  # the final event: nothing more, ever
            head = await client.head(path)
            assert head.status_code == 200
            health = await client.get("/healthz")
            assert health.json() == {"status": "ok"}
        assert _gateway(stack).warm_answers == 1


async def test_a_request_sent_during_a_stream_is_answered_after_it(
    settings: Settings, redis: Redis, appends: ScriptBatch
) -> None:
    async with _warm(settings, redis, appends) as (stack, message, ids):
        reader, writer = await _resume(stack, f"/chat/stream/{message.message_id}", ids[0])
        first = await _read_until(reader, _T2)
        assert _gateway(stack).warm_answers == 1
        writer.write(_get("/healthz"))
        await asyncio.sleep(0.1)
        await message.writer.append(Kind.DONE, b"")
        raw = first + await _read_until(reader, b'{"status":"ok"}')
        writer.close()
    stream, health = raw.split(b"\r\n0\r\n\r\n", 1)
    assert stream.endswith(b"data: [DONE]\n\n")
    assert health.startswith(b"HTTP/1.1 200 OK\r\n")


async def test_a_connection_uvicorn_served_comes_back_for_the_next_resume(
    settings: Settings, redis: Redis, appends: ScriptBatch
) -> None:
    async with _warm(settings, redis, appends) as (stack, message, ids):
        path = f"/chat/stream/{message.message_id}"
        reader, writer = await _connect(stack)
        writer.write(_get("/healthz"))  # uvicorn's to answer
        await _read_until(reader, b'{"status":"ok"}')
        writer.write(_get(path, f"Last-Event-ID: {ids[0]}"))
        await _read_until(reader, _T2)
        assert _gateway(stack).warm_answers == 1
        await message.writer.append(Kind.DONE, b"")
        await _read_until(reader, b"0\r\n\r\n")
        # Again, after a stream the gateway protocol served: the same way round.
        writer.write(_get("/healthz"))
        await _read_until(reader, b'{"status":"ok"}')
        writer.write(_get(path, f"Last-Event-ID: {ids[0]}"))
        raw = await _read_until(reader, b"0\r\n\r\n")
        writer.close()
        assert _gateway(stack).warm_answers == 2
    assert raw.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")


async def test_uvicorn_keeps_a_connection_while_another_request_is_under_way(
    settings: Settings, redis: Redis, appends: ScriptBatch
) -> None:
    async with _warm(settings, redis, appends) as (stack, message, ids):
        resume = _get(f"/chat/stream/{message.message_id}", f"Last-Event-ID: {ids[0]}")
        reader, writer = await _connect(stack)
        # The start of a request behind the first: it stays with uvicorn, which answers it.
        writer.write(_get("/healthz") + resume[:5])
        await _read_until(reader, b'{"status":"ok"}')
        await asyncio.sleep(0.1)
        writer.write(resume[5:])
        await _read_until(reader, _T2)
        assert _gateway(stack).warm_answers == 0
        writer.close()
        # A body still arriving when the answer is complete (a 404 reads none): the same.
        reader, writer = await _connect(stack)
        writer.write(b"POST /nowhere HTTP/1.1\r\nHost: test\r\nContent-Length: 10\r\n\r\n12345")
        await _read_until(reader, b'"code":null}}')
        await asyncio.sleep(0.1)
        writer.write(b"67890" + _get("/healthz"))
        await _read_until(reader, b'{"status":"ok"}')
        # Once that is answered too, the connection is back.
        writer.write(resume)
        await _read_until(reader, _T2)
        assert _gateway(stack).warm_answers == 1
        writer.close()


async def test_a_client_that_leaves_is_forgotten_and_one_that_stays_idle_is_closed(
    settings: Settings, redis: Redis, appends: ScriptBatch
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
        assert _gateway(stack).warm_answers == 2


async def test_a_draining_gateway_ends_the_streams_it_answered_with_a_retry_hint(
    settings: Settings, redis: Redis, appends: ScriptBatch
) -> None:
    async with _warm(settings, redis, appends) as (stack, message, ids):
        reader, writer = await _resume(stack, f"/chat/stream/{message.message_id}", ids[1])
        await _read_until(reader, _T2)
        assert _gateway(stack).warm_answers == 1
        stack.hub.drain()
        raw = await _read_until(reader, b"0\r\n\r\n")
        writer.close()
    assert raw.endswith(b"retry: 2000\n: this gateway is shutting down; reconnect\n\n\r\n0\r\n\r\n")


async def test_the_access_log_names_a_request_answered_here_as_uvicorn_does(
    settings: Settings, redis: Redis, appends: ScriptBatch
) -> None:
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    access = logging.getLogger("uvicorn.access")
    handler = Keep()
    async with _warm(settings, redis, appends) as (stack, message, ids):
        path = f"/chat/stream/{message.message_id}?from=log"
        access.addHandler(handler)
        level = access.level
        access.setLevel(logging.INFO)
        try:
            for forwarded in ("", "X-Forwarded-For: 203.0.113.9"):
                # The second is uvicorn's to answer (a body length): the line to match.
                for extra in ("", "Content-Length: 0"):
                    reader, writer = await _resume(stack, path, ids[1], forwarded, extra)
                    await _read_until(reader, _T2)
                    writer.close()
        finally:
            access.removeHandler(handler)
            access.setLevel(level)
        assert _gateway(stack).warm_answers == 2
    ports = re.compile(r":\d+ ")
    assert len(lines) == 4
    assert ports.sub(": ", lines[0]) == ports.sub(": ", lines[1])
    assert lines[0].startswith("127.0.0.1:")
    assert lines[2] == lines[3] == f'203.0.113.9:0 - "GET {path} HTTP/1.1" 200'


@pytest.mark.parametrize(
    "head",
    [
        b"POST /chat/stream/x HTTP/1.1\r\nHost: a",
        b"GET /chat/stream/x HTTP/1.0\r\nHost: a",
        b"GET /chat/stream/x%41 HTTP/1.1\r\nHost: a",
        b"GET /chat/stream/x HTTP/1.1\r\nHost: a\r\nHost: b",
        b"GET /chat/stream/x HTTP/1.1\r\nHost: a\r\n folded",
        b"GET /chat/stream/x HTTP/1.1\r\nHost: a\x01",
        b"GET /chat/stream/x HTTP/1.1\r\nContent-Length: 0",
        b"GET /chat/stream/x HTTP/1.1\r\nTransfer-Encoding: chunked",
        b"GET /chat/stream/x HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket",
        b"GET /chat/stream/x HTTP/1.1\r\nBad Name: 1",
        b"GET  /chat/stream/x HTTP/1.1",
    ],
)
def test_a_request_head_it_does_not_fully_understand_is_left_to_uvicorn(head: bytes) -> None:
    assert parse_head(head) is None


def test_a_request_head_it_answers() -> None:
    request = parse_head(
        b"GET /chat/stream/m?x=1 HTTP/1.1\r\nHost: a\r\nlast-event-id:  1-2 \r\n"
        b"Connection: keep-alive, close\r\nX-Forwarded-For: 10.0.0.1"
    )
    assert request is not None
    assert (request.path, request.query) == (b"/chat/stream/m", b"x=1")
    assert request.last_event_id == b"1-2"
    assert request.forwarded_for == b"10.0.0.1"
    assert not request.keep_alive


async def test_a_failure_while_answering_closes_the_connection_and_frees_the_subscriber(
    settings: Settings, redis: Redis, appends: ScriptBatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(message_id: str, _: object) -> Renderer:
        raise RuntimeError(f"renderer of {message_id} broke")

    async with _warm(settings, redis, appends, 2) as (stack, message, ids):
        gateway = _gateway(stack)
        gateway.warm_routes = [dataclasses.replace(gateway.warm_routes[0], renderer=broken)]
        reader, writer = await _resume(stack, f"/chat/stream/{message.message_id}", ids[0])
        async with asyncio.timeout(10):
            answer = await reader.read()
        writer.close()
        assert stack.hub.subscriber_count == 1
    # What uvicorn answers when an application fails before its response starts.
    assert answer.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    assert answer.endswith(b"connection: close\r\n\r\nInternal Server Error")
    assert f"renderer of {message.message_id} broke" in caplog.text


async def test_a_head_it_cannot_answer_is_handed_over_before_it_is_complete(stack: Stack) -> None:
    reader, writer = await _connect(stack)
    writer.write(b"GET /healthz HTTP/1.1\n\n")  # bare line feeds: never a head of ours
    async with asyncio.timeout(10):
        answer = await reader.read(65536)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 ")


async def test_a_connection_handed_over_while_its_writes_wait_keeps_waiting() -> None:
    class Transport:
        protocol: asyncio.BaseProtocol | None = None

        def get_extra_info(self, name: str) -> object:
            return ("127.0.0.1", 8000) if name in ("sockname", "peername") else None

        def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
            self.protocol = protocol

        def is_closing(self) -> bool:
            return False

        def pause_reading(self) -> None: ...

        def resume_reading(self) -> None: ...

        def write(self, data: bytes) -> None: ...

        def close(self) -> None: ...

    config = uvicorn.Config(Response(status_code=204), http=GatewayProtocol, log_level="warning")
    config.load()
    ours = GatewayProtocol(config, ServerState(), {})
    transport = Transport()
    ours.connection_made(cast(asyncio.Transport, transport))
    ours.pause_writing()  # the client stopped reading a stream's catch-up
    ours.data_received(b"POST /x HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    uvicorns = transport.protocol
    assert isinstance(uvicorns, HttpToolsProtocol)
    assert uvicorns.flow.write_paused
    await asyncio.sleep(0.05)
    assert not uvicorns.cycle.response_complete  # its answer waits for the client to read
    uvicorns.resume_writing()
    await asyncio.sleep(0.05)
    assert uvicorns.cycle.response_complete
    uvicorns.connection_lost(None)
