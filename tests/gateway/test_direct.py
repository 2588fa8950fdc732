"""Live events written straight to the client's socket (gateway.direct), and its flow control."""

from __future__ import annotations

import asyncio
import socket

import h11
import orjson
import pytest
from redis.asyncio import Redis

from gateway.direct import DirectWriter, Held
from shared.events import Kind
from shared.messages import Job, new_message_id, submit
from shared.settings import Settings
from tests.support import Stack, content_of, eventually, parse_sse, start_stack
from worker.backends.mock import mock_text
from worker.script_batch import ScriptBatch
from worker.stream_writer import StreamWriter


async def test_under_uvicorn_live_subscribers_are_written_directly(stack: Stack) -> None:
    async with (
        stack.client() as client,
        client.stream("POST", "/chat/stream", json={"prompt": "direct", "max_tokens": 40}) as r,
    ):
        raw = b""
        async for piece in r.aiter_bytes():
            if not raw:
                # A server upgrade that hides the transport would silently lose the fast path.
                assert [s.sink is not None for s in stack.hub._subscribers] == [True]
            raw += piece
    assert content_of(parse_sse(raw)) == mock_text("direct", 40)


@pytest.mark.timeout(60)
async def test_a_client_that_stops_reading_catches_up_from_redis_and_loses_nothing(
    settings: Settings, redis: Redis, appends: ScriptBatch
) -> None:
    async with start_stack(settings, worker=False) as stack:
        await _fall_behind_and_catch_up(stack, redis, appends)


async def _fall_behind_and_catch_up(stack: Stack, redis: Redis, appends: ScriptBatch) -> None:
    # Events written as a worker writes them, large enough to fill every socket buffer.
    message_id = new_message_id()
    job = Job(message_id=message_id, prompt="slow reader", max_tokens=1)
    await submit(redis, job, ttl_ms=60_000, model="test")
    writer = StreamWriter(redis, appends, message_id, "test", ttl_ms=60_000, maxlen=10_000)
    assert await writer.claim() == "ok"
    port = int(stack.url.rsplit(":", 1)[1])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await asyncio.to_thread(sock.connect, ("127.0.0.1", port))
    sock.sendall(b"GET /chat/stream/%b HTTP/1.1\r\nHost: test\r\n\r\n" % message_id.encode())
    await eventually(lambda: any(s.sink for s in stack.hub._subscribers))
    pieces = [f"{i:04d}" + "x" * 32_000 for i in range(300)]  # about 10 MB
    for piece in pieces:
        await writer.append(Kind.CHUNK, orjson.dumps(piece))
        if stack.hub.fell_behind:
            break  # the client (which reads nothing) fell behind: the point is made
        await asyncio.sleep(0.002)  # live, not a backlog: each event reaches the tail first
    assert stack.hub.fell_behind == 1
    sent = pieces[: pieces.index(piece) + 1]
    await writer.append(Kind.DONE, b"")
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


async def test_a_resume_from_memory_sends_head_and_missed_events_in_one_write(
    settings: Settings, redis: Redis, appends: ScriptBatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[bytes] = []
    original = DirectWriter.write

    def recording(self: DirectWriter, data: bytes) -> None:
        writes.append(data)
        original(self, data)

    monkeypatch.setattr(DirectWriter, "write", recording)
    async with start_stack(settings, worker=False) as stack:
        message_id = new_message_id()
        job = Job(message_id=message_id, prompt="one write", max_tokens=1)
        await submit(redis, job, ttl_ms=60_000, model="test")
        writer = StreamWriter(redis, appends, message_id, "test", ttl_ms=60_000, maxlen=1_000)
        assert await writer.claim() == "ok"
        await writer.append(Kind.CHUNK, orjson.dumps("t0 "))
        path = f"/chat/stream/{message_id}"
        async with stack.client() as client, client.stream("GET", path) as following:
            # A live follower: the events after it joined stay in this gateway's memory.
            await eventually(lambda: stack.hub.warm_tail(message_id) is not None)
            for i in range(1, 5):
                await writer.append(Kind.CHUNK, orjson.dumps(f"t{i} "))
            received = b""
            async for piece in following.aiter_bytes():
                received += piece
                if len(parse_sse(received).events) == 5:
                    break
            ids = [e.id or "" for e in parse_sse(received).events]
            reads = stack.hub.reads
            writes.clear()
            async with client.stream("GET", path, headers={"Last-Event-ID": ids[1]}) as resumed:
                assert resumed.status_code == 200
                assert resumed.headers["x-message-id"] == message_id
                raw = b""
                async for piece in resumed.aiter_bytes():
                    raw += piece
                    if len(parse_sse(raw).events) == 3:
                        break
            assert [e.id for e in parse_sse(raw).events] == ids[2:]
            assert stack.hub.reads == reads  # answered from memory
            first = writes[0]
            assert first.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"retry: " in first
            assert all(i.encode() in first for i in ids[2:])
            await writer.append(Kind.DONE, b"")


def test_the_held_head_answers_for_the_real_transport() -> None:
    class Transport:
        closing = False

        def is_closing(self) -> bool:
            return self.closing

    transport = Transport()
    held = Held(transport)
    held.write(b"HTTP/1.1 200 OK\r\n")
    held.write(b"\r\n")
    assert held.data == b"HTTP/1.1 200 OK\r\n\r\n"
    assert not held.is_closing()  # uvicorn's receive() asks while the head is held
    transport.closing = True
    assert held.is_closing()
