"""Idempotency-Key: a repeated POST answers the first one's message and generates nothing
more; the project's client retries its POST through cuts at every point of it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable

import pytest

from shared.redis_client import RedisClient
from shared.settings import Settings
from tests.support import Stack, parse_sse, queued_jobs, start_stack
from tokenrelay.client import Reset, TokenrelayClient
from worker.backends.mock import mock_text

PROMPT = "ask me once"


async def _metas(redis: RedisClient) -> int:
    return len([k async for k in redis.scan_iter(match="tr:{*}:meta")])


@pytest.mark.usefixtures("redis")
async def test_a_repeated_post_answers_the_first_ones_message(
    stack: Stack, redis: RedisClient
) -> None:
    body = {"prompt": PROMPT, "max_tokens": 12}
    once = {"Idempotency-Key": "k-1"}
    async with stack.client() as client:
        first = await client.post("/chat/stream", json=body, headers=once)
        again = await client.post("/chat/stream", json=body, headers=once)
        events = parse_sse(first.content).events
        after = await client.post(
            "/chat/stream", json=body, headers={**once, "Last-Event-ID": events[4].id or ""}
        )
        other = await client.post("/chat/stream", json={**body, "max_tokens": 13}, headers=once)
        whole = await client.post("/chat/stream", json={**body, "stream": False}, headers=once)
    assert first.headers["x-message-id"] == again.headers["x-message-id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert parse_sse(again.content).events == events
    assert parse_sse(after.content).events == events[5:]
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert whole.status_code == 422  # another body: "stream" differs
    assert await _metas(redis) == 1


@pytest.mark.usefixtures("redis")
async def test_the_openai_routes_take_the_key_too(stack: Stack, redis: RedisClient) -> None:
    once = {"Idempotency-Key": "k-2"}
    chat = {"model": "m", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8}
    asked = {"model": "m", "input": PROMPT, "max_output_tokens": 8}
    async with stack.client() as client:
        completions = [
            await client.post("/v1/chat/completions", json=chat, headers=once) for _ in range(2)
        ]
        responses = [
            await client.post("/v1/responses", json=asked, headers={"Idempotency-Key": "k-3"})
            for _ in range(2)
        ]
    assert completions[0].json() == completions[1].json()
    assert responses[0].json()["id"] == responses[1].json()["id"]
    assert responses[0].json()["output_text"] == responses[1].json()["output_text"]
    assert await _metas(redis) == 2


@pytest.mark.usefixtures("redis")
async def test_a_refused_first_request_frees_its_key(
    settings: Settings, redis: RedisClient
) -> None:
    capped = dataclasses.replace(settings, max_queued_jobs=1)
    async with start_stack(capped, worker=False) as stack, stack.client() as client:
        await stack.admission.sample()
        fill = {"prompt": "fill the queue", "stream": False}
        filling = asyncio.ensure_future(client.post("/chat/stream", json=fill))
        for _ in range(500):
            if await queued_jobs(redis) >= 1:
                break
            await asyncio.sleep(0.01)
        await stack.admission.sample()
        body = {"prompt": PROMPT, "stream": False}
        refused = await client.post("/chat/stream", json=body, headers={"Idempotency-Key": "k-4"})
        assert refused.status_code == 503
        key_count = len([k async for k in redis.scan_iter(match="tr:idem:*")])
        filling.cancel()
    assert key_count == 0  # a retry with the key is a new request


class _CutOnce:
    """A proxy in front of a gateway whose first connection is cut at one point of the POST:
    before the request reaches the gateway, after it does (before the answer's head), or after
    the head. Later connections pass."""

    def __init__(self, target_port: int, cut: str) -> None:
        self.target_port = target_port
        self.cut = cut
        self.connections = 0
        self.port = 0

    async def __aenter__(self) -> _CutOnce:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        first = self.connections == 1
        if first and self.cut == "before_request":
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, stop: Callable[[bytes], bool]
        ) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
                    if stop(data):
                        return

        seen = bytearray()

        def after_head(data: bytes) -> bool:
            seen.extend(data)
            return first and self.cut == "after_head" and b"\r\n\r\n" in seen

        def after_request(data: bytes) -> bool:
            return first and self.cut == "after_request" and data.endswith(b"}")

        tasks = [
            asyncio.ensure_future(pipe(reader, up_writer, after_request)),
            asyncio.ensure_future(pipe(up_reader, writer, after_head)),
        ]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        writer.close()
        up_writer.close()


@pytest.mark.parametrize("cut", ["before_request", "after_request", "after_head"])
async def test_the_client_retries_its_post_and_one_generation_results(
    settings: Settings, redis: RedisClient, cut: str
) -> None:
    paced = dataclasses.replace(settings, mock_token_delay_ms=5)
    async with start_stack(paced) as stack:
        port = int(stack.url.rsplit(":", 1)[1])
        async with (
            _CutOnce(port, cut) as proxy,
            TokenrelayClient(
                f"http://127.0.0.1:{proxy.port}", initial_backoff_s=0.05, max_backoff_s=0.2
            ) as client,
        ):
            stream = await client.ask(PROMPT, max_tokens=40)
            text = ""
            async for piece in stream:
                text = "" if isinstance(piece, Reset) else text + piece.text
        assert proxy.connections >= 2
    assert text == mock_text(PROMPT, 40)
    assert await _metas(redis) == 1
