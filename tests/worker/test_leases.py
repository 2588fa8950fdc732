"""Leases: a lost worker's job is taken over, a healthy one's never is, a poison job is parked."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
from typing import Any, cast

import orjson
import pytest

from shared import keys
from shared.events import ZERO_ID, Kind
from shared.messages import Job, submit
from shared.redis_client import RedisClient
from shared.settings import Settings
from shared.streams import read_after, read_newest
from tests.support import (
    ON_BOTH,
    PARTITIONS,
    jobs_stream,
    parse_sse,
    queued_jobs,
    read_stream,
    run_worker,
    start_stack,
)
from worker.backends.mock import CRASH_STATUS, mock_text
from worker.script_batch import ScriptBatch


async def _until(predicate_coro: object, timeout_s: float = 10) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if await predicate_coro():  # type: ignore[operator]
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


@ON_BOTH
async def test_a_killed_worker_is_taken_over_and_the_stream_says_reset(
    settings: Settings, redis: RedisClient
) -> None:
    leased = dataclasses.replace(settings, job_lease_s=1.0, mock_token_delay_ms=30.0)
    env = {
        **os.environ,
        "REDIS_URL": leased.effective_redis_url,
        "TOKENRELAY_JOB_LEASE_S": "1",
        "TOKENRELAY_MOCK_TOKEN_DELAY_MS": "30",
        "TOKENRELAY_COALESCE_MS": "0",
        "TOKENRELAY_LOG_LEVEL": "warning",
    }
    doomed = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenrelay", "worker", env=env
    )
    try:
        async with start_stack(leased, worker=False) as stack, stack.client() as client:
            async with client.stream(
                "POST", "/chat/stream", json={"prompt": "survive", "max_tokens": 60}
            ) as response:
                message_id = response.headers["x-message-id"]
                stream = keys.message_stream(message_id)
                await _until(lambda: _at_least(redis, stream, 5))
                doomed.send_signal(signal.SIGKILL)  # mid-answer, no goodbye
                async with run_worker(leased):  # takes the job over once its lease lapses
                    raw = await asyncio.wait_for(response.aread(), 20)
            _, replay = await read_stream(client, "GET", f"/chat/stream/{message_id}")
    finally:
        if doomed.returncode is None:
            doomed.kill()
        await doomed.wait()
    events = parse_sse(raw).events
    resets = [i for i, e in enumerate(events) if e.event == "reset"]
    assert len(resets) == 1
    assert orjson.loads(events[resets[0]].data) == {"id": message_id, "reason": "worker_lost"}
    after = events[resets[0] + 1 :]
    assert "".join(orjson.loads(e.data)["content"] for e in after[:-1]) == mock_text("survive", 60)
    assert after[-1].data == "[DONE]"
    assert parse_sse(replay).events == events  # the live stream and its replay agree
    assert await queued_jobs(redis) == 0


def _dead_letters(message_id: str) -> str:
    """The dead-letter stream of a message's jobs partition."""
    return keys.jobs_dead_stream(keys.job_partition(message_id, PARTITIONS), PARTITIONS)


async def _at_least(redis: RedisClient, stream: str, count: int) -> bool:
    return int(await redis.xlen(stream)) >= count


async def test_a_healthy_long_generation_is_never_taken_over(
    settings: Settings, redis: RedisClient
) -> None:
    # Three seconds of generation against a half-second lease, with a second worker eager to
    # reclaim: the lease is renewed, so no takeover happens.
    leased = dataclasses.replace(settings, job_lease_s=0.5, mock_token_delay_ms=30.0)
    async with run_worker(leased), run_worker(leased):
        await submit(
            redis, Job("H" * 22, "healthy", 100), ttl_ms=60_000, model="test", partitions=PARTITIONS
        )
        await _until(lambda: _status_is(redis, "H" * 22, b"done"), timeout_s=15)
    events = await read_after(redis, keys.message_stream("H" * 22), ZERO_ID, count=1000)
    assert Kind.RESET not in {e.kind for e in events}
    assert len(events) == 103


async def _status_is(redis: RedisClient, message_id: str, status: bytes) -> bool:
    return bool(await redis.hget(keys.message_meta(message_id), "status") == status)


@ON_BOTH
async def test_a_job_that_keeps_losing_its_workers_goes_to_the_dead_letters(
    settings: Settings, redis: RedisClient
) -> None:
    leased = dataclasses.replace(settings, job_lease_s=0.3, job_max_attempts=2)
    await submit(
        redis, Job("P" * 22, "poison", 5), ttl_ms=60_000, model="test", partitions=PARTITIONS
    )
    # Two workers took it and died (each delivery counts): simulate their reads.
    stream = jobs_stream("P" * 22)
    await redis.xgroup_create(stream, keys.JOBS_GROUP, id="0", mkstream=True)
    await redis.xreadgroup(keys.JOBS_GROUP, "dead-1", {stream: ">"}, count=1)
    pending = await redis.xpending_range(stream, keys.JOBS_GROUP, "-", "+", 1)
    await redis.xclaim(stream, keys.JOBS_GROUP, "dead-2", 0, [pending[0]["message_id"]])
    async with run_worker(leased):  # its third delivery: over the limit
        await _until(lambda: _status_is(redis, "P" * 22, b"error"))
    dead = cast(list[tuple[bytes, dict[bytes, bytes]]], await redis.xrange(_dead_letters("P" * 22)))
    assert len(dead) == 1
    assert dead[0][1][b"deliveries"] == b"3"
    last = await read_newest(redis, keys.message_stream("P" * 22))
    assert last is not None
    assert orjson.loads(last.data)["type"] == "job_failed"
    assert (await redis.xpending(stream, keys.JOBS_GROUP))["pending"] == 0


@pytest.mark.timeout(60)
async def test_a_job_that_crashes_every_worker_process_goes_to_the_dead_letters(
    settings: Settings, redis: RedisClient
) -> None:
    env = {
        **os.environ,
        "REDIS_URL": settings.effective_redis_url,
        "TOKENRELAY_JOB_LEASE_S": "1",
        "TOKENRELAY_JOB_MAX_ATTEMPTS": "2",
        "TOKENRELAY_COALESCE_MS": "0",
        "TOKENRELAY_LOG_LEVEL": "warning",
        "TOKENRELAY_FAULT_INJECTION": "1",
    }
    message_id = "C" * 22
    await submit(
        redis,
        Job(message_id, "poison [[crash_after=3]]", 20),
        ttl_ms=60_000,
        model="m",
        partitions=PARTITIONS,
    )
    # A supervisor restarts each worker the job takes down; the next takes it over.
    for _ in range(2):
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tokenrelay", "worker", env=env
        )
        assert await asyncio.wait_for(worker.wait(), 20) == CRASH_STATUS
    survivor = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenrelay", "worker", env=env
    )
    try:
        await _until(lambda: _status_is(redis, message_id, b"error"))  # its third delivery
    finally:
        survivor.terminate()
        await survivor.wait()
    assert survivor.returncode == 0
    dead = cast(
        list[tuple[bytes, dict[bytes, bytes]]], await redis.xrange(_dead_letters(message_id))
    )
    assert [fields[b"deliveries"] for _, fields in dead] == [b"3"]
    events = await read_after(redis, keys.message_stream(message_id), ZERO_ID, count=100)
    assert orjson.loads(events[-1].data)["type"] == "job_failed"
    assert [e.kind for e in events].count(Kind.RESET) == 1  # the second attempt said so


async def test_a_worker_taking_over_its_own_job_fences_its_earlier_attempt(
    settings: Settings, redis: RedisClient, appends: ScriptBatch
) -> None:
    """If a worker's own renewals fail for a whole lease, it may reclaim its own job: the two
    attempts must still be told apart, or both would write into one answer."""
    from shared.redis_client import RedisConnector
    from worker.backends.mock import MockBackend
    from worker.runner import Worker
    from worker.stream_writer import WriteRefused

    job = Job("O" * 22, "own", 5)
    await submit(redis, job, ttl_ms=60_000, model="test", partitions=PARTITIONS)
    connector = RedisConnector(settings)
    worker = Worker(
        settings,
        redis,
        appends,
        MockBackend(token_delay_s=0, fault_injection=True),
        consumer="same",
        nodes=connector.nodes(redis),
        connect=lambda node: connector.channel_connection(node, "t"),
    )
    first, second = worker._writer(job, b"1-0"), worker._writer(job, b"1-0")
    assert await first.claim() == "ok"
    await first.append(Kind.CHUNK, b'"from the first"')
    assert await second.claim(takeover=True) == "ok"
    with pytest.raises(WriteRefused, match="fenced"):
        await first.append(Kind.CHUNK, b'"late"')
    await connector.aclose()


async def test_a_worker_whose_lease_was_taken_stops_without_ending_the_message(
    settings: Settings, redis: RedisClient
) -> None:
    """A stall outlasted the lease and another worker's reclaim took the job, but its reply
    was lost (it never took the message over). The worker that generated stops writing and
    leaves the message alone; a later reclaim finishes it: the answer completes after one
    reset, never ends cut off."""
    leased = dataclasses.replace(settings, job_lease_s=0.9, mock_token_delay_ms=20.0)
    async with (
        start_stack(leased) as stack,
        stack.client() as client,
        client.stream(
            "POST", "/chat/stream", json={"prompt": "stalled", "max_tokens": 80}
        ) as response,
    ):
        message_id = response.headers["x-message-id"]
        await _until(lambda: _at_least(redis, keys.message_stream(message_id), 5))
        # The reclaim of a worker that then lost its reply: the job is pending under
        # another consumer's name, nobody generates it.
        stream = jobs_stream(message_id)
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]], await redis.xrange(stream))
        await redis.xclaim(stream, keys.JOBS_GROUP, "ghost", 0, [entries[0][0]])
        raw = await asyncio.wait_for(response.aread(), 30)
    events = parse_sse(raw).events
    assert not any(e.event == "cancelled" for e in events)
    resets = [i for i, e in enumerate(events) if e.event == "reset"]
    assert len(resets) == 1
    after = events[resets[0] + 1 :]
    assert after[-1].data == "[DONE]"
    assert "".join(orjson.loads(e.data)["content"] for e in after[:-1]) == mock_text("stalled", 80)


async def test_a_worker_started_after_its_peer_died_takes_its_job_over_at_once(
    settings: Settings, redis: RedisClient
) -> None:
    """The job of a worker that died before this one started has been idle past its lease:
    the new worker's first reclaim pass runs at start, not half a lease later."""
    leased = dataclasses.replace(settings, job_lease_s=20.0)
    job = Job("D" * 22, "orphan", 5)
    await submit(redis, job, ttl_ms=60_000, model="test", partitions=PARTITIONS)
    stream = jobs_stream(job.message_id)
    await redis.xgroup_create(stream, keys.JOBS_GROUP, id="0", mkstream=True)
    await redis.xreadgroup(keys.JOBS_GROUP, "dead-worker", {stream: ">"}, count=1)
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], await redis.xrange(stream))
    # Its worker died a lease ago.
    await redis.xclaim(stream, keys.JOBS_GROUP, "dead-worker", 0, [entries[0][0]], idle=21_000)
    async with run_worker(leased):
        await _until(lambda: _done(redis, job.message_id), timeout_s=5)


async def _done(redis: RedisClient, message_id: str) -> bool:
    return await redis.hget(keys.message_meta(message_id), "status") == b"done"


async def test_workers_that_are_gone_leave_the_consumer_group(
    settings: Settings, redis: RedisClient
) -> None:
    quick = dataclasses.replace(settings, job_lease_s=0.5, job_block_ms=100)
    stream = jobs_stream("G" * 22)
    await redis.xgroup_create(stream, keys.JOBS_GROUP, id="0", mkstream=True)
    await redis.xgroup_createconsumer(stream, keys.JOBS_GROUP, "gone-worker")

    async def consumers() -> set[str]:
        infos = await redis.xinfo_consumers(stream, keys.JOBS_GROUP)
        return {
            str(c["name"], "utf-8") if isinstance(c["name"], bytes) else c["name"] for c in infos
        }

    assert await consumers() == {"gone-worker"}
    async with run_worker(quick):
        await _until(lambda: _only_live(consumers), timeout_s=10)


async def _only_live(consumers: Any) -> bool:
    names: set[str] = await consumers()
    return "gone-worker" not in names
