"""The jobs queue (worker.jobs): which consumers of the group count as gone."""

from __future__ import annotations

import asyncio

from shared import keys
from shared.redis_client import RedisClient
from shared.settings import Settings
from tests.support import ON_BOTH
from worker.jobs import JobQueue


def _queue(settings: Settings, redis: RedisClient, consumer: str) -> JobQueue:
    return JobQueue(settings, redis, consumer=consumer, embedded=False)


@ON_BOTH
async def test_only_consumers_that_no_longer_declare_themselves_alive_are_forgotten(
    settings: Settings, redis: RedisClient
) -> None:
    """A live worker whose reads find nothing looks idle to Redis 7.0 (its idle time grows
    while it blocks), so idle time alone must never remove it: removing a consumer drops what
    is pending for it."""
    this, quiet, gone, busy = (_queue(settings, redis, name) for name in "abcd")
    partition = this.partitions[0]
    await this.read(partition, 1)  # makes the group
    for queue in (this, quiet, gone, busy):
        # A consumer joins the group with its first job; all but busy's are done.
        await redis.xadd(partition.stream, {"job": "1"})
        ((entry_id, _),) = await queue.read(partition, 1)
        if queue is not busy:
            await redis.xack(partition.stream, keys.JOBS_GROUP, entry_id)
    await quiet.declare_alive(60_000)
    await asyncio.sleep(0.05)
    assert await this.forget_gone_consumers(partition, idle_ms=10) == ["c"]
    consumers = await redis.xinfo_consumers(partition.stream, keys.JOBS_GROUP)
    names = {c["name"].decode() if isinstance(c["name"], bytes) else c["name"] for c in consumers}
    assert names == {"a", "b", "d"}
    # Its declaration lapses when it stops making it.
    await redis.delete(keys.worker_alive("b"))
    assert await this.forget_gone_consumers(partition, idle_ms=10) == ["b"]
