"""How much work waits in the jobs partitions: the gateways' admission check and the metrics
read it."""

from __future__ import annotations

import time
from dataclasses import dataclass

from redis.exceptions import ResponseError

from shared import keys
from shared.redis_client import RedisClient


@dataclass(frozen=True, slots=True)
class QueueDepth:
    #: Jobs in the partition streams: queued, or being generated (acknowledged jobs are gone).
    jobs: int
    #: Age of the oldest of them, in seconds (0 when there is none).
    oldest_s: float


async def queue_depth(redis: RedisClient, partitions: int) -> QueueDepth:
    """One pipelined XINFO STREAM of every partition: its length and its first entry."""
    async with redis.pipeline(transaction=False) as pipe:
        for partition in range(partitions):
            pipe.xinfo_stream(keys.jobs_stream(partition, partitions))
        replies = await pipe.execute(raise_on_error=False)
    jobs, oldest_ms = 0, None
    for reply in replies:
        if isinstance(reply, ResponseError):
            continue  # no such stream: nothing was ever queued there
        if isinstance(reply, Exception):
            raise reply
        jobs += int(reply["length"])
        first = reply.get("first-entry")
        if first:
            ms = int(first[0].split(b"-")[0])
            oldest_ms = ms if oldest_ms is None else min(oldest_ms, ms)
    age = 0.0 if oldest_ms is None else max(0.0, time.time() - oldest_ms / 1000)
    return QueueDepth(jobs, age)
