"""The jobs queue as one worker sees it: ``TOKENRELAY_JOB_PARTITIONS`` streams, each with the
consumer group ``workers`` (each stream in a cluster slot of its own, spread evenly over the
slots), read, acknowledged, leased and reclaimed one partition at a time.

A job is acknowledged (and deleted, so the streams stay small) only once its message has a
terminal event, or when it can never be generated. Leases: while a worker generates, it renews
its job's lease (resets the job's idle time in the group) every third of ``job_lease_s``; every
worker reclaims jobs idle longer than that (XAUTOCLAIM), since their worker is gone.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, cast

from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import keys
from shared.redis_client import RedisClient
from shared.settings import Settings

_log = logging.getLogger(__name__)
# The embedded fakeredis answers XREADGROUP ... BLOCK wrongly (it returns at once); there a
# reader waits on a plain XREAD of new entries for at most this long between group reads.
_EMBEDDED_WAIT_MS = 100

Entry = tuple[bytes, dict[bytes, bytes]]

# Renew a job's lease only while it is still ours: a plain XCLAIM would take back a job that
# was already taken over from us. JUSTID leaves the delivery count alone.
_RENEW = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if pending[1] and pending[1][2] == ARGV[3] then
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
  return 1
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Partition:
    """One of the jobs streams."""

    index: int
    stream: str
    dead: str


class JobQueue:
    """The partitions of the jobs queue, for one worker (``consumer`` in the group)."""

    def __init__(
        self, settings: Settings, redis: RedisClient, *, consumer: str, embedded: bool
    ) -> None:
        count = settings.job_partitions
        self.partitions = [
            Partition(p, keys.jobs_stream(p, count), keys.jobs_dead_stream(p, count))
            for p in range(count)
        ]
        self._redis = redis
        self._consumer = consumer
        self._embedded = embedded
        self._block_ms = settings.job_block_ms
        self._renew: AsyncScript = redis.register_script(_RENEW)
        self._groups: set[str] = set()  # streams whose group this worker made sure of
        self._reclaim_from: dict[str, bytes | str] = {}

    async def read(self, partition: Partition, count: int) -> list[Entry]:
        """Up to ``count`` new jobs of ``partition``, waiting up to ``job_block_ms`` for one."""
        stream = partition.stream
        block = None if self._embedded else self._block_ms
        try:
            reply = await self._redis.xreadgroup(
                keys.JOBS_GROUP, self._consumer, {stream: ">"}, count=count, block=block
            )
        except ResponseError:
            # NOGROUP (worded differently by Redis and fakeredis): the first start, or Redis
            # lost its data; another worker may be creating the group right now. The same
            # error right after the group was made sure of is a real one.
            if stream in self._groups:
                raise
            await self._ensure_group(stream)
            self._groups.add(stream)
            return []
        except (RedisConnectionError, RedisTimeoutError):
            self._groups.discard(stream)  # Redis may come back without its data
            raise
        self._groups.discard(stream)
        if not reply and self._embedded:
            await self._redis.xread({stream: "$"}, block=_EMBEDDED_WAIT_MS)
            return []
        streams = cast(list[tuple[bytes, list[Entry]]], reply)
        return [entry for _, batch in streams for entry in batch]

    async def _ensure_group(self, stream: str) -> None:
        """Create the consumer group (and the stream) unless it exists."""
        try:
            await self._redis.xgroup_create(stream, keys.JOBS_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            return
        _log.info("created consumer group %s on %s", keys.JOBS_GROUP, stream)

    async def ack(self, partition: Partition, entry_id: bytes) -> None:
        """The job is done with: acknowledged and deleted."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(partition.stream, keys.JOBS_GROUP, entry_id)
            pipe.xdel(partition.stream, entry_id)
            await pipe.execute()

    async def renew(self, partition: Partition, entry_id: bytes) -> bool:
        """Renew the lease of a job this worker generates; False once it is no longer ours."""
        args: list[str | bytes] = [keys.JOBS_GROUP, entry_id, self._consumer]
        return bool(await self._renew(keys=[partition.stream], args=args))

    async def reclaim(
        self, partition: Partition, lease_ms: int, count: int
    ) -> list[tuple[bytes, dict[bytes, bytes], int]]:
        """Jobs of ``partition`` idle longer than a lease, taken over by this worker, each with
        how many times it has been delivered."""
        stream = partition.stream
        # Resume the scan where the last round stopped: XAUTOCLAIM looks at a bounded slice of
        # the pending entries per call, and stale ones may lie past the first slice.
        try:
            reply = await self._redis.xautoclaim(
                stream,
                keys.JOBS_GROUP,
                self._consumer,
                lease_ms,
                self._reclaim_from.get(stream, "0-0"),
                count=count,
            )
        except ResponseError as exc:
            if "NOGROUP" in str(exc) or "No such key" in str(exc):
                return []  # nothing was ever queued here
            raise
        self._reclaim_from[stream] = reply[0]
        taken = []
        for entry_id, fields in cast(list[tuple[bytes, dict[bytes, bytes] | None]], reply[1]):
            if fields is None:
                continue  # deleted meanwhile
            pending = await self._redis.xpending_range(
                stream, keys.JOBS_GROUP, entry_id, entry_id, 1
            )
            deliveries = int(pending[0]["times_delivered"]) if pending else 1
            taken.append((entry_id, fields, deliveries))
        return taken

    async def declare_alive(self, ttl_ms: int) -> None:
        """Say that this worker lives, for ``ttl_ms`` (see :meth:`forget_gone_consumers`)."""
        await self._redis.set(keys.worker_alive(self._consumer), b"1", px=ttl_ms)

    async def forget_gone_consumers(self, partition: Partition, idle_ms: int) -> list[str]:
        """Remove from the group the consumers of ``partition`` with nothing pending that have
        been idle for ``idle_ms`` and no longer declare themselves alive (workers that are
        gone). The consumers removed.

        Removing a consumer drops what is pending for it, so a live one must never be: a job
        delivered to it between the check and the removal would be lost. A gone worker reads
        nothing, so nothing new becomes pending for it.
        """
        try:
            consumers = await self._redis.xinfo_consumers(partition.stream, keys.JOBS_GROUP)
        except ResponseError as exc:
            if "NOGROUP" in str(exc) or "no such key" in str(exc).lower():
                return []
            raise
        quiet = [
            name
            for consumer in consumers
            if int(consumer["pending"]) == 0
            and int(consumer["idle"]) >= idle_ms
            and (name := _text(consumer["name"])) != self._consumer
        ]
        gone = [name for name in quiet if not await self._redis.exists(keys.worker_alive(name))]
        for name in gone:
            await self._redis.xgroup_delconsumer(partition.stream, keys.JOBS_GROUP, name)
        return gone

    async def bury(
        self, partition: Partition, entry_id: bytes, fields: dict[bytes, bytes], deliveries: int
    ) -> None:
        """Park a job in its partition's dead letters."""
        dead: dict[Any, Any] = {
            **fields,
            b"job_id": entry_id,
            b"deliveries": str(deliveries).encode(),
        }
        await self._redis.xadd(partition.dead, dead, maxlen=10_000)

    async def queued(self) -> int:
        """Jobs waiting in every partition (read or not)."""
        lengths = await asyncio.gather(*(self._redis.xlen(p.stream) for p in self.partitions))
        return sum(lengths)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
