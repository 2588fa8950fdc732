"""The fan-out core's reads of a message in Redis: its meta and newest events when a tail starts,
and where a cursor older than a tail's memory stands."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

from gateway.counters import Counters
from gateway.errors import MessageGone, NotAnEvent
from gateway.positions import MessageInfo, StartPoint
from shared import keys, metrics
from shared.events import ZERO_ID, EntryId, Event
from shared.messages import (
    ASKED,
    CANCEL,
    CREATED_MS,
    END,
    INCLUDE_USAGE,
    MODEL,
    REWOUND,
    STATUS,
    TENANT,
    WATCH_MS,
)
from shared.redis_client import RedisClient
from shared.streams import read_after

_Entries = list[tuple[bytes, dict[bytes, bytes]]]
_HEAD_READS = metrics.REDIS_SECONDS.labels("read_head")
_READS = metrics.REDIS_SECONDS.labels("read")
#: Events per stream read.
READ_BATCH = 512
_LOCATES = metrics.REDIS_SECONDS.labels("locate")
# Redis's clock (in event ids) against this process's, at most this far apart.
_CLOCK_SKEW_MS = 5_000


async def read_head(
    redis: RedisClient, message_id: str, count: int
) -> tuple[MessageInfo, list[Event]]:
    """What the message's meta says and its newest ``count`` events, oldest first, in one
    round trip. Raises :class:`MessageGone` when the message does not exist (or expired)."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hmget(keys.message_meta(message_id), _INFO_FIELDS)
        pipe.xrevrange(keys.message_stream(message_id), max="+", min="-", count=count)
        with _HEAD_READS.time():
            meta, entries = await pipe.execute()
    info = _info(message_id, meta)
    events = [Event.from_entry(raw_id, fields) for raw_id, fields in cast(_Entries, entries)]
    events.reverse()
    return info, events


#: The meta fields a MessageInfo is made of, in the order _info reads them.
_INFO_FIELDS = [MODEL, CREATED_MS, INCLUDE_USAGE, WATCH_MS, TENANT, ASKED]


def _info(message_id: str, meta: list[bytes | None]) -> MessageInfo:
    """The MessageInfo of the meta fields read as ``_INFO_FIELDS`` names them; MessageGone
    when the message has no meta (it does not exist, or expired)."""
    model, created_ms, include_usage, watch_ms, tenant, asked = meta[: len(_INFO_FIELDS)]
    if created_ms is None:
        raise MessageGone(f"message {message_id} does not exist or has expired")
    return MessageInfo(
        model=(model or b"").decode(),
        created_s=int(created_ms) // 1000,
        include_usage=include_usage == b"1",
        watch_ms=int(watch_ms) if watch_ms else None,
        tenant=(tenant or b"").decode(),
        asked=asked or b"",
    )


async def locate(
    redis: RedisClient, message_id: str, cursor: EntryId, info: MessageInfo
) -> StartPoint | None:
    """The start point after ``cursor``, an event of the message that is not in this process's
    memory; None when it is the final event (nothing more, ever).

    A cursor the message does not hold, on a message Redis lost events of, or past its
    newest event, was among the lost: the reader starts again (``rewound``). Raises
    :class:`MessageGone` when the message no longer exists, :class:`NotAnEvent` when the
    cursor is not one of its events.
    """
    stream = keys.message_stream(message_id)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hmget(keys.message_meta(message_id), [STATUS, END, REWOUND])
        pipe.xrange(stream, min="-", max="+", count=1)
        pipe.xrange(stream, min=str(cursor), max=str(cursor), count=1)
        pipe.xrevrange(stream, max="+", min="-", count=1)
        with _LOCATES.time():
            (status, end, rewound), first, found, newest = await pipe.execute()
    if status is None:
        raise MessageGone(f"message {message_id} does not exist or has expired")
    if end is not None and EntryId.parse(end) == cursor:
        return None
    if found:
        return StartPoint(cursor, Event.from_entry(*found[0]).n + 1, info)
    if first:
        oldest = Event.from_entry(*first[0])
        # Below the oldest entry is a real (trimmed) position only if entries were trimmed.
        if ZERO_ID < cursor < oldest.id and oldest.n > 0:
            return StartPoint(cursor, None, info)
    newest_id = EntryId.parse(newest[0][0]) if newest else ZERO_ID
    # Past the newest event, yet not in the future: an event a failover lost (the message may
    # not be marked yet: its worker or a tail marks it when it notices).
    lost = newest_id < cursor and cursor.ms <= time.time() * 1000 + _CLOCK_SKEW_MS
    if rewound or lost:
        return StartPoint(ZERO_ID, 0, info, rewound=True)
    raise NotAnEvent(f"Last-Event-ID {cursor} is not an event of message {message_id}")


async def read_whole(
    redis: RedisClient, message_id: str, limit: int
) -> tuple[MessageInfo, bytes, bool, list[Event]]:
    """A message's meta, its status (``queued``, ``running``, ``done``, ...), whether a cancel
    was asked for, and its first ``limit`` events, in one round trip. Raises
    :class:`MessageGone` when the message does not exist."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hmget(keys.message_meta(message_id), [*_INFO_FIELDS, STATUS, CANCEL])
        pipe.xrange(keys.message_stream(message_id), min="-", max="+", count=limit)
        meta, entries = await pipe.execute()
    info = _info(message_id, meta)
    status, cancel = meta[len(_INFO_FIELDS) :]
    events = [Event.from_entry(raw_id, fields) for raw_id, fields in cast(_Entries, entries)]
    return info, status or b"", cancel is not None, events


async def entry_of_event(redis: RedisClient, message_id: str, n: int) -> EntryId | None:
    """The entry id of the message's event numbered ``n`` (None when it has no such event
    yet, or its history was trimmed or rewound: then numbers and positions part ways)."""
    entries = cast(
        _Entries, await redis.xrange(keys.message_stream(message_id), min="-", max="+", count=n + 1)
    )
    if len(entries) != n + 1:
        return None
    last = Event.from_entry(*entries[-1])
    return last.id if last.n == n else None


class StreamReads:
    """Reads of one message's stream, :data:`READ_BATCH` events at a time, each waiting at the
    process's gate; readers after the same position can share one read."""

    __slots__ = ("_counters", "_gate", "_redis", "_running", "_stream")

    def __init__(
        self, redis: RedisClient, stream: str, gate: asyncio.Semaphore, counters: Counters
    ) -> None:
        self._redis = redis
        self._stream = stream
        self._gate = gate
        self._counters = counters
        self._running: dict[EntryId, asyncio.Future[list[Event]]] = {}

    async def shared(self, position: EntryId) -> list[Event]:
        """The events after ``position``, read once for every reader asking at the same time."""
        read = self._running.get(position)
        if read is None:
            read = self._running[position] = asyncio.ensure_future(self.read(position))
            read.add_done_callback(lambda _: self._running.pop(position, None))
            read.add_done_callback(retrieved)
        return await asyncio.shield(read)

    async def read(self, position: EntryId) -> list[Event]:
        """The events after ``position``, read for this caller alone."""
        self._counters.reads += 1
        async with self._gate:
            with _READS.time():
                return await read_after(self._redis, self._stream, position, count=READ_BATCH)

    def running(self) -> list[asyncio.Future[Any]]:
        """The shared reads under way (to cancel them)."""
        return [*self._running.values()]


def retrieved(future: asyncio.Future[Any]) -> None:
    """A done callback for a future whose failure is its waiters' (a shared read, a tail's
    start): nobody may be left to wait for it, and an unretrieved failure would be reported."""
    if not future.cancelled():
        future.exception()
