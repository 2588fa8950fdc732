"""Batched script calls: shared round trips, yet each caller's own reply or error."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from shared import keys
from shared.events import ZERO_ID, Kind
from shared.messages import Job, new_message_id, submit
from shared.redis_client import RedisClient
from shared.streams import read_after
from tests.support import PARTITIONS
from tokenrelay.local_redis import free_port
from worker.script_batch import ScriptBatch
from worker.stream_writer import StreamWriter

_ECHO = """
redis.call('INCR', KEYS[1])
if ARGV[1] == 'bad' then return redis.error_reply('ERR bad argument') end
return ARGV[1]
"""


async def test_concurrent_appends_share_round_trips_and_each_lands_once_in_order(
    redis: RedisClient, appends: ScriptBatch
) -> None:
    writers, streams = [], []
    for _ in range(20):
        job = Job(new_message_id(), "batched", 1)
        await submit(redis, job, ttl_ms=60_000, model="test", partitions=PARTITIONS)
        writer = StreamWriter(redis, appends, job.message_id, "w", ttl_ms=60_000, maxlen=100)
        assert await writer.claim() == "ok"
        writers.append(writer)
        streams.append(keys.message_stream(job.message_id))

    async def write(writer: StreamWriter) -> None:
        for i in range(10):
            await writer.append(Kind.CHUNK, orjson.dumps(f"{i}"))
        await writer.append(Kind.DONE, b"")

    calls, round_trips = appends.calls, appends.round_trips
    await asyncio.gather(*(write(w) for w in writers))
    assert appends.calls - calls == 20 * 11
    assert appends.round_trips - round_trips <= 11 * 2  # about one per step, not one per call
    for stream in streams:
        events = await read_after(redis, stream, ZERO_ID, count=100)
        assert [e.n for e in events] == list(range(11))
        assert [e.kind for e in events] == [Kind.CHUNK] * 10 + [Kind.DONE]


async def test_an_error_reply_reaches_its_own_caller_only(redis: RedisClient) -> None:
    async with ScriptBatch(redis, _ECHO) as echo:
        results: list[object] = await asyncio.gather(
            echo(["n"], ["fine"]), echo(["n"], ["bad"]), return_exceptions=True
        )
        with pytest.raises(ResponseError, match="bad argument"):
            await echo(["n"], ["bad"])  # a lone call takes a path of its own
    good, bad = results
    assert good == b"fine"
    assert isinstance(bad, ResponseError)
    assert "bad argument" in str(bad)
    assert await redis.get("n") == b"3"


async def test_calls_survive_redis_forgetting_its_scripts(redis: RedisClient) -> None:
    async with ScriptBatch(redis, _ECHO) as echo:
        assert await echo(["n"], ["one"]) == b"one"
        await redis.script_flush()  # as after a restart or a failover
        replies = await asyncio.gather(*(echo(["n"], [str(i)]) for i in range(5)))
        await redis.script_flush()
        assert await echo(["n"], ["alone"]) == b"alone"
    assert replies == [str(i).encode() for i in range(5)]
    assert await redis.get("n") == b"7"  # every call ran once


async def test_a_call_cancelled_before_its_batch_leaves_is_not_sent(redis: RedisClient) -> None:
    async with ScriptBatch(redis, _ECHO) as echo:
        task = asyncio.ensure_future(echo(["n"], ["never"]))
        await asyncio.sleep(0)  # queued, but the sender has not taken it yet
        task.cancel()
        assert await echo(["n"], ["after"]) == b"after"
        with pytest.raises(asyncio.CancelledError):
            await task
    assert await redis.get("n") == b"1"


async def test_every_caller_of_a_failed_round_trip_gets_the_error() -> None:
    unreachable = Redis(port=free_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 1))
    try:
        async with ScriptBatch(unreachable, _ECHO) as echo:
            results = await asyncio.gather(
                echo(["n"], ["a"]), echo(["n"], ["b"]), return_exceptions=True
            )
    finally:
        await unreachable.aclose()
    assert all(isinstance(r, RedisConnectionError) for r in results)


async def test_a_call_outside_its_block_is_refused(redis: RedisClient) -> None:
    echo = ScriptBatch(redis, _ECHO)
    with pytest.raises(RuntimeError, match="not running"):
        await echo(["n"], ["early"])
    async with echo:
        pass
    with pytest.raises(RuntimeError, match="not running"):
        await echo(["n"], ["late"])


_SLOW_OR_FAST = """
if ARGV[1] == 'slow' then
  local i = 0
  while i < 3000000 do i = i + 1 end
end
redis.call('INCR', KEYS[1])
return ARGV[1]
"""


async def test_a_call_made_while_closing_is_still_sent_and_the_close_ends(
    redis: RedisClient,
) -> None:
    """A generation the worker stopped may append its last event after the close began."""
    batch = ScriptBatch(redis, _SLOW_OR_FAST)
    await batch.__aenter__()
    slow = asyncio.ensure_future(batch(["n"], ["slow"]))
    await asyncio.sleep(0.01)  # its round trip is out
    closing = asyncio.ensure_future(batch.__aexit__(None, None, None))
    await asyncio.sleep(0)
    last = asyncio.ensure_future(batch(["n"], ["last"]))
    await asyncio.wait_for(closing, 10)
    assert (await slow, await last) == (b"slow", b"last")
    assert await redis.get("n") == b"2"


async def test_a_close_gives_up_on_calls_redis_never_answers() -> None:
    """Leaving the block waits at most close_within_s; the unanswered calls fail, not hang."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(1 << 16):
            pass  # takes every command, answers none
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    mute = Redis(port=port, socket_timeout=60)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with ScriptBatch(mute, _ECHO, close_within_s=0.3) as echo:
            call = asyncio.ensure_future(echo(["n"], ["unanswered"]))
            await asyncio.sleep(0.05)
        assert loop.time() - started < 5
        with pytest.raises(RuntimeError, match="stopped"):
            await call
    finally:
        await mute.aclose()
        server.close()
        await server.wait_closed()
