"""Coalescing: the first token at once, then one entry per window, and no token held past it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest

from shared import keys
from shared.errors import ModelError
from shared.events import ZERO_ID, Kind
from shared.messages import Job, submit
from shared.redis_client import RedisClient
from shared.streams import read_after
from tests.support import PARTITIONS
from worker.backends.base import GenerationRequest
from worker.backends.mock import MockBackend, mock_text
from worker.generation import generate
from worker.script_batch import ScriptBatch
from worker.stream_writer import StreamWriter

MESSAGE = "G" * 22


async def _entries(redis: RedisClient) -> list[tuple[str, str]]:
    events = await read_after(redis, keys.message_stream(MESSAGE), ZERO_ID, count=1000)
    return [
        (e.kind.value, orjson.loads(e.data) if e.kind is Kind.CHUNK else e.data.decode())
        for e in events
    ]


async def _writer(redis: RedisClient, appends: ScriptBatch) -> StreamWriter:
    await submit(redis, Job(MESSAGE, "p", 1), ttl_ms=60_000, model="test", partitions=PARTITIONS)
    writer = StreamWriter(redis, appends, MESSAGE, "owner", ttl_ms=60_000, maxlen=10_000)
    assert await writer.claim()
    return writer


class ScriptedModel:
    """A fake model whose tokens arrive when the test says so."""

    def __init__(self, tokens: list[str]) -> None:
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        for token in tokens:
            self.queue.put_nowait(token)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        while (token := await self.queue.get()) is not None:
            if token == "!fail":
                raise ModelError("scripted failure")
            yield token

    async def aclose(self) -> None:
        """Nothing to release."""


async def test_zero_window_writes_one_entry_per_token(
    redis: RedisClient, appends: ScriptBatch
) -> None:
    writer = await _writer(redis, appends)
    await generate(
        MockBackend(token_delay_s=0), GenerationRequest("per token", 30), writer, coalesce_s=0
    )
    entries = await _entries(redis)
    assert len(entries) == 33  # 30 tokens, the finish reason, usage, the end
    assert "".join(d for k, d in entries if k == "chunk") == mock_text("per token", 30)
    assert [k for k, _ in entries[-3:]] == ["choice", "usage", "done"]


async def test_window_merges_tokens_but_writes_the_first_at_once(
    redis: RedisClient, appends: ScriptBatch
) -> None:
    writer = await _writer(redis, appends)
    model = ScriptedModel(["first", " a", " b", " c"])
    task = asyncio.create_task(generate(model, GenerationRequest("x", 9), writer, coalesce_s=3600))
    # With an hour-long window, only the first token may be written until the model finishes.
    for _ in range(200):
        if await redis.xlen(keys.message_stream(MESSAGE)) >= 1:
            break
        await asyncio.sleep(0.01)
    assert await _entries(redis) == [("chunk", "first")]
    model.queue.put_nowait(None)
    await task
    assert await _entries(redis) == [("chunk", "first"), ("chunk", " a b c"), ("done", "")]


async def test_window_flushes_when_it_closes_even_if_the_model_pauses(
    redis: RedisClient, appends: ScriptBatch
) -> None:
    writer = await _writer(redis, appends)
    model = ScriptedModel(["first", " held"])
    task = asyncio.create_task(generate(model, GenerationRequest("x", 9), writer, coalesce_s=0.05))
    # The model now pauses indefinitely; " held" must still be written when the window closes.
    for _ in range(500):
        if await redis.xlen(keys.message_stream(MESSAGE)) >= 2:
            break
        await asyncio.sleep(0.01)
    assert await _entries(redis) == [("chunk", "first"), ("chunk", " held")]
    model.queue.put_nowait(None)
    await task


async def test_model_failure_keeps_what_was_generated_then_ends_with_an_error(
    redis: RedisClient, appends: ScriptBatch
) -> None:
    writer = await _writer(redis, appends)
    model = ScriptedModel(["first", " second", "!fail"])
    await generate(model, GenerationRequest("x", 9), writer, coalesce_s=3600)
    entries = await _entries(redis)
    assert entries[:2] == [("chunk", "first"), ("chunk", " second")]
    kind, data = entries[2]
    assert kind == "error"
    assert orjson.loads(data) == {"type": "model_error", "message": "scripted failure"}


async def test_unexpected_failure_ends_the_message_and_propagates(
    redis: RedisClient, appends: ScriptBatch
) -> None:
    class Broken:
        async def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
            yield "ok"
            raise RuntimeError("bug")

        async def aclose(self) -> None:
            """Nothing to release."""

    writer = await _writer(redis, appends)
    with pytest.raises(RuntimeError, match="bug"):
        await generate(Broken(), GenerationRequest("x", 9), writer, coalesce_s=0)
    entries = await _entries(redis)
    assert entries[-1][0] == "error"
    assert orjson.loads(entries[-1][1])["type"] == "internal_error"
    assert Kind.ERROR.terminal
