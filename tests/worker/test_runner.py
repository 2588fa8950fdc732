"""The job loop: consumer group, acknowledgement, and jobs that cannot be generated."""

from __future__ import annotations

import asyncio

from shared import keys
from shared.messages import Job, submit
from shared.redis_client import RedisClient
from shared.settings import Settings
from shared.streams import read_newest
from tests.support import PARTITIONS, jobs_stream, queued_jobs, run_worker


async def _wait_for_empty_group(redis: RedisClient) -> None:
    """Until no job is queued or pending in any partition (whose group a worker made)."""
    for _ in range(500):
        pending = 0
        for partition in range(PARTITIONS):
            stream = keys.jobs_stream(partition, PARTITIONS)
            if await redis.exists(stream):
                groups = await redis.xinfo_groups(stream)
                pending += groups[0]["pending"] if groups else 1
        if pending == 0 and await queued_jobs(redis) == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("jobs were not all acknowledged")


async def test_jobs_are_generated_acknowledged_and_deleted(
    settings: Settings, redis: RedisClient
) -> None:
    ids = [f"{i:022d}" for i in range(5)]
    async with run_worker(settings):
        for message_id in ids:
            job = Job(message_id, f"prompt {message_id}", 4)
            await submit(redis, job, ttl_ms=60_000, model="test", partitions=PARTITIONS)
        await _wait_for_empty_group(redis)
    for message_id in ids:
        assert await redis.hget(keys.message_meta(message_id), "status") == b"done"
        assert (
            await redis.xlen(keys.message_stream(message_id)) == 7
        )  # 4 tokens, finish, usage, end


async def test_jobs_queued_before_any_worker_started_are_taken(
    settings: Settings, redis: RedisClient
) -> None:
    await submit(
        redis, Job("E" * 22, "early", 2), ttl_ms=60_000, model="test", partitions=PARTITIONS
    )
    async with run_worker(settings):
        await _wait_for_empty_group(redis)
    assert await redis.hget(keys.message_meta("E" * 22), "status") == b"done"


async def test_malformed_and_expired_jobs_are_dropped_without_output(
    settings: Settings, redis: RedisClient
) -> None:
    await redis.xadd(jobs_stream("G" * 22), {"garbage": "1"})
    await redis.xadd(jobs_stream("X" * 22), Job("X" * 22, "expired", 3).to_fields())  # type: ignore[arg-type]
    async with run_worker(settings):
        await _wait_for_empty_group(redis)
        await submit(
            redis, Job("Y" * 22, "fine", 2), ttl_ms=60_000, model="test", partitions=PARTITIONS
        )
        await _wait_for_empty_group(redis)
    assert not await redis.exists(keys.message_stream("X" * 22))
    assert await redis.hget(keys.message_meta("Y" * 22), "status") == b"done"


async def test_many_generations_run_at_once(settings: Settings, redis: RedisClient) -> None:
    import dataclasses

    paced = dataclasses.replace(settings, mock_token_delay_ms=50.0, worker_concurrency=20)
    async with run_worker(paced):
        for i in range(20):
            await submit(
                redis,
                Job(f"C{i:021d}", "parallel", 10),
                ttl_ms=60_000,
                model="test",
                partitions=PARTITIONS,
            )
        # 20 jobs of 10 tokens at 50 ms: all running together, none still queued.
        for _ in range(300):
            statuses = [
                await redis.hget(keys.message_meta(f"C{i:021d}"), "status") for i in range(20)
            ]
            if all(s == b"running" for s in statuses):
                break
            await asyncio.sleep(0.01)
        assert all(s == b"running" for s in statuses)
        await _wait_for_empty_group(redis)


async def test_a_worker_stopped_mid_answer_ends_the_message(
    settings: Settings, redis: RedisClient
) -> None:
    import dataclasses

    slow = dataclasses.replace(settings, mock_token_delay_ms=100.0, shutdown_grace_s=0.2)
    async with run_worker(slow):
        await submit(
            redis,
            Job("S" * 22, "interrupted", 100),
            ttl_ms=60_000,
            model="test",
            partitions=PARTITIONS,
        )
        for _ in range(300):
            if await redis.xlen(keys.message_stream("S" * 22)) >= 2:
                break
            await asyncio.sleep(0.01)
    meta = await redis.hgetall(keys.message_meta("S" * 22))
    assert meta[b"status"] == b"error"
    last = await read_newest(redis, keys.message_stream("S" * 22))
    assert last is not None
    assert b"worker_shutdown" in last.data
