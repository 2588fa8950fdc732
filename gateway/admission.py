"""Whether a gateway takes new work: the jobs queued (or generating) against
``TOKENRELAY_MAX_QUEUED_JOBS``, sampled once a second."""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import RedisError

from gateway.errors import ApiError
from shared import metrics
from shared.queue_depth import QueueDepth, queue_depth
from shared.redis_client import RedisClient

_log = logging.getLogger(__name__)

SAMPLE_EVERY_S = 1.0


class Admission:
    """The cap on queued work. Between samples, the jobs this gateway queued count too, so a
    burst is refused without waiting for the next sample (other gateways' bursts are seen
    at the next one)."""

    def __init__(self, redis: RedisClient, *, partitions: int, max_queued: int) -> None:
        self._redis = redis
        self._partitions = partitions
        self.max_queued = max_queued
        #: The latest sample (None before the first).
        self.depth: QueueDepth | None = None
        self._queued_since = 0

    def admit(self, retry_after_s: int) -> None:
        """Count one job about to be queued, or refuse it: 503 ``unavailable`` with a
        Retry-After of ``retry_after_s``."""
        jobs = (self.depth.jobs if self.depth is not None else 0) + self._queued_since
        if jobs >= self.max_queued:
            metrics.REFUSED_REQUESTS.labels("queue_full").inc()
            raise ApiError(
                503,
                f"{jobs} requests are waiting (the limit is {self.max_queued}); retry later",
                error_type="unavailable",
                retry_after_s=retry_after_s,
            )
        self._queued_since += 1

    async def sample(self) -> QueueDepth:
        before = self._queued_since
        depth = await queue_depth(self._redis, self._partitions)
        # Jobs admitted while the sample was read may be missing from it: they still count
        # (at worst twice, until the next sample), or a burst during a sample passes the cap.
        self.depth, self._queued_since = depth, self._queued_since - before
        return depth

    async def run(self) -> None:
        """Sample until cancelled; a failed sample keeps the last one."""
        failing = False
        while True:
            try:
                await self.sample()
                failing = False
            except RedisError as exc:
                if not failing:  # once per outage
                    _log.warning("sampling the jobs queue failed: %s", exc)
                failing = True
            await asyncio.sleep(SAMPLE_EVERY_S)
