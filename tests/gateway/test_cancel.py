"""Cancellation: prompt, visible to every subscriber, separate from disconnecting."""

from __future__ import annotations

import asyncio
import dataclasses

import orjson
import pytest

from shared import keys
from shared.redis_client import RedisClient
from shared.settings import Settings
from tests.support import ON_BOTH, Stack, parse_sse, post_and_hang_up, read_stream, start_stack
from tests.worker.test_openai_upstream import _relay_settings, scripted_upstream


async def _wait_for_status(
    redis: RedisClient, message_id: str, status: bytes, timeout_s: float = 10
) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if await redis.hget(keys.message_meta(message_id), "status") == status:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"status never became {status!r}")


async def _start(
    stack: Stack, path: str, body: dict[str, object]
) -> tuple[str, asyncio.Task[tuple[object, bytes]]]:
    client = stack.client()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def read() -> tuple[object, bytes]:
        async with client, client.stream("POST", path, json=body) as response:
            ready.set_result(response.headers["x-message-id"])
            return response, await response.aread()

    task = asyncio.create_task(read())
    return await ready, task


@ON_BOTH
@pytest.mark.usefixtures("redis")
async def test_cancel_stops_generation_within_a_chunk_and_every_subscriber_sees_it(
    settings: Settings, redis: RedisClient
) -> None:
    paced = dataclasses.replace(settings, mock_token_delay_ms=50.0)
    async with start_stack(paced) as stack, stack.client() as client:
        message_id, poster = await _start(
            stack, "/chat/stream", {"prompt": "long", "max_tokens": 500}
        )
        watcher = asyncio.create_task(read_stream(client, "GET", f"/chat/stream/{message_id}"))
        for _ in range(500):
            if await redis.xlen(keys.message_stream(message_id)) >= 5:
                break
            await asyncio.sleep(0.02)
        response = await client.post(f"/chat/stream/{message_id}/cancel")
        entries_at_cancel = await redis.xlen(keys.message_stream(message_id))
        assert response.status_code == 202
        assert response.json() == {"id": message_id, "status": "cancelling"}
        _, posted = await poster
        _, watched = await watcher
        again = await client.post(f"/chat/stream/{message_id}/cancel")
        missing = await client.post("/chat/stream/AAAAAAAAAAAAAAAAAAAAAA/cancel")
        last = parse_sse(posted).events[-1]
        after = await client.get(
            f"/chat/stream/{message_id}", headers={"Last-Event-ID": last.id or ""}
        )
    for raw in (posted, watched):
        final = parse_sse(raw).events[-1]
        assert final.event == "cancelled"
        assert orjson.loads(final.data) == {"id": message_id, "reason": "requested"}
    assert parse_sse(posted).events == parse_sse(watched).events
    chunks = await redis.xlen(keys.message_stream(message_id)) - 1  # all but the cancelled event
    assert chunks <= entries_at_cancel + 1  # at most the chunk that was on its way
    assert chunks < 500
    assert await redis.hget(keys.message_meta(message_id), "status") == b"cancelled"
    assert after.status_code == 204
    assert again.status_code == 409
    assert again.json()["error"]["type"] == "conflict"
    assert missing.status_code == 404


@ON_BOTH
@pytest.mark.usefixtures("redis")
async def test_cancel_in_the_openai_format_and_of_a_queued_message(
    settings: Settings, redis: RedisClient
) -> None:
    async with start_stack(settings, worker=False) as stack, stack.client() as client:
        message_id, poster = await _start(
            stack,
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "q"}],
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
        response = await client.post(f"/v1/chat/completions/{message_id}/cancel")
        assert response.status_code == 202
        from tests.support import run_worker

        async with run_worker(settings):  # the worker finds the job already cancelled
            _, raw = await poster
    *_, usage, error, done = parse_sse(raw).events
    # Usage before [DONE] whatever the ending; an error no client takes for a whole answer;
    # one id for the block, on [DONE].
    assert orjson.loads(usage.data)["usage"]["completion_tokens"] == 0
    assert orjson.loads(error.data)["error"]["code"] == "cancelled"
    assert done.data == "[DONE]"
    assert (usage.id, error.id) == (None, None)
    assert done.id
    assert await redis.hget(keys.message_meta(message_id), "status") == b"cancelled"
    assert await redis.xlen(keys.message_stream(message_id)) == 1  # nothing was generated


@ON_BOTH
@pytest.mark.usefixtures("redis")
async def test_cancel_closes_the_upstream_request_at_once(settings: Settings) -> None:
    async with (
        scripted_upstream() as (url, _),
        start_stack(_relay_settings(settings, url)) as stack,
        stack.client() as client,
    ):
        message_id, poster = await _start(
            stack,
            "/v1/chat/completions",
            {"model": "slow", "messages": [{"role": "user", "content": "q"}], "stream": True},
        )
        await asyncio.sleep(0.3)
        assert (await client.post(f"/v1/chat/completions/{message_id}/cancel")).status_code == 202
        _, raw = await poster
    events = parse_sse(raw).events
    assert orjson.loads(events[-2].data)["error"]["code"] == "cancelled"
    assert len(events) < 100  # the slow upstream had 200 chunks to send


@pytest.mark.usefixtures("redis")
async def test_disconnect_does_not_cancel_unless_asked(
    settings: Settings, redis: RedisClient
) -> None:
    quick = dataclasses.replace(settings, mock_token_delay_ms=20.0, cancel_grace_s=1.0)
    async with start_stack(quick, linger_s=0.0) as stack:
        ids = {
            opted: await post_and_hang_up(
                stack, {"prompt": "bye", "max_tokens": 200, "cancel_on_disconnect": opted}
            )
            for opted in (False, True)
        }
        await _wait_for_status(redis, ids[True], b"cancelled")
        await _wait_for_status(redis, ids[False], b"done")
        async with stack.client() as client:
            _, raw = await read_stream(client, "GET", f"/chat/stream/{ids[True]}")
    final = parse_sse(raw).events[-1]
    assert final.event == "cancelled"
    assert orjson.loads(final.data)["reason"] == "disconnected"


@pytest.mark.usefixtures("redis")
async def test_a_watched_message_is_not_cancelled_past_the_grace_period(settings: Settings) -> None:
    quick = dataclasses.replace(settings, mock_token_delay_ms=20.0, cancel_grace_s=1.0)
    async with start_stack(quick) as stack, stack.client() as client:
        # 150 tokens at 20 ms outlast the 1 s grace: presence renewals keep it alive.
        _, raw = await read_stream(
            client,
            "POST",
            "/chat/stream",
            json={"prompt": "stay", "max_tokens": 150, "cancel_on_disconnect": True},
        )
    assert parse_sse(raw).events[-1].data == "[DONE]"


@pytest.mark.usefixtures("redis")
async def test_a_queued_message_is_cancelled_at_once_without_a_worker(
    settings: Settings, redis: RedisClient
) -> None:
    async with start_stack(settings, worker=False) as stack, stack.client() as client:
        message_id, poster = await _start(stack, "/chat/stream", {"prompt": "q"})
        assert (await client.post(f"/chat/stream/{message_id}/cancel")).status_code == 202
        _, raw = await asyncio.wait_for(poster, 5)
    assert parse_sse(raw).events[-1].event == "cancelled"
    assert await redis.hget(keys.message_meta(message_id), "status") == b"cancelled"


@pytest.mark.usefixtures("redis")
async def test_cancel_on_disconnect_stops_a_silent_model(
    settings: Settings, redis: RedisClient
) -> None:
    # The model pauses 5 s between tokens; nobody watches after the first: cancelled meanwhile.
    silent = dataclasses.replace(settings, mock_token_delay_ms=5000.0, cancel_grace_s=1.0)
    async with start_stack(silent, linger_s=0.0) as stack:
        message_id = await post_and_hang_up(
            stack, {"prompt": "slow", "max_tokens": 5, "cancel_on_disconnect": True}
        )
        await _wait_for_status(redis, message_id, b"cancelled", timeout_s=4.5)
    assert await redis.xlen(keys.message_stream(message_id)) == 2  # the first token and the end
