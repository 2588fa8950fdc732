"""Typed reads of a message stream (redis-py's own reply types are loose unions)."""

from __future__ import annotations

from typing import cast

from shared.events import EntryId, Event
from shared.redis_client import RedisClient

_Entries = list[tuple[bytes, dict[bytes, bytes]]]


async def read_after(redis: RedisClient, stream: str, after: EntryId, *, count: int) -> list[Event]:
    """Up to ``count`` events strictly after ``after``, oldest first."""
    entries = cast(_Entries, await redis.xrange(stream, min=f"({after}", max="+", count=count))
    return [Event.from_entry(raw_id, fields) for raw_id, fields in entries]


async def read_newest(redis: RedisClient, stream: str) -> Event | None:
    """The stream's newest event, or None when it has none (yet)."""
    entries = cast(_Entries, await redis.xrevrange(stream, max="+", min="-", count=1))
    return Event.from_entry(*entries[0]) if entries else None
