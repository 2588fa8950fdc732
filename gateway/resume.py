"""Where a reader starts in a message, decided from the client's cursor in one round trip."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from gateway.errors import ApiError
from gateway.hub import Hub, Subscriber
from shared import keys
from shared.events import ZERO_ID, EntryId, Event
from shared.messages import CREATED_MS, END, INCLUDE_USAGE, MODEL, STATUS, WATCH_MS


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """What a renderer and the hub need to know of a message."""

    model: str
    created_s: int
    include_usage: bool
    watch_ms: int | None


@dataclass(frozen=True, slots=True)
class StartPoint:
    """Read every event after ``after``; ``next_n`` is the expected first sequence number
    (None when the cursor points into trimmed history, so a gap is reported first)."""

    after: EntryId
    next_n: int | None
    info: MessageInfo


async def locate(
    redis: Redis,
    message_id: str,
    cursor: EntryId | None,
    *,
    hub: Hub | None = None,
    not_found: str = "not_found",
) -> StartPoint | None:
    """The start point for ``cursor``; None when it is the final event (nothing more, ever).

    404 when the message does not exist (or expired); 400 when the cursor is not an event of it.
    With ``hub``, a cursor among the latest events of a message this gateway follows is
    answered from memory (a reconnect storm then costs Redis nothing).
    """
    if hub is not None:
        start = from_memory(hub, message_id, cursor)
        if not isinstance(start, _NotInMemory):
            return start
    # The subscriber this start point is for leaves the info with the tail.
    return await _locate(redis, message_id, cursor, not_found)


class _NotInMemory:
    """The answer of :func:`from_memory` when only Redis can tell."""

    __slots__ = ()


NOT_IN_MEMORY = _NotInMemory()


def from_memory(
    hub: Hub, message_id: str, cursor: EntryId | None
) -> StartPoint | _NotInMemory | None:
    """What :func:`locate` answers for a message this gateway follows, when the cursor is among
    the latest events it holds (or there is none); :data:`NOT_IN_MEMORY` otherwise."""
    tail = hub.warm_tail(message_id)
    if tail is None or tail.info is None:
        return NOT_IN_MEMORY
    if cursor is None or cursor == ZERO_ID:
        return StartPoint(ZERO_ID, 0, tail.info)
    event = tail.find(cursor)
    if event is None:
        return NOT_IN_MEMORY
    return None if event.kind.terminal else StartPoint(cursor, event.n + 1, tail.info)


async def _locate(
    redis: Redis, message_id: str, cursor: EntryId | None, not_found: str
) -> StartPoint | None:
    stream = keys.message_stream(message_id)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hmget(
            keys.message_meta(message_id), [STATUS, END, MODEL, CREATED_MS, INCLUDE_USAGE, WATCH_MS]
        )
        pipe.xrange(stream, min="-", max="+", count=1)
        if cursor is not None and cursor != ZERO_ID:
            pipe.xrange(stream, min=str(cursor), max=str(cursor), count=1)
        replies = await pipe.execute()
    (status, end, model, created_ms, include_usage, watch_ms), first = replies[0], replies[1]
    if status is None:
        raise ApiError(
            404, f"message {message_id} does not exist or has expired", error_type=not_found
        )
    info = MessageInfo(
        model=(model or b"").decode(),
        created_s=int(created_ms or 0) // 1000,
        include_usage=include_usage == b"1",
        watch_ms=int(watch_ms) if watch_ms else None,
    )
    if cursor is None or cursor == ZERO_ID:
        return StartPoint(ZERO_ID, 0, info)
    if end is not None and EntryId.parse(end) == cursor:
        return None
    if replies[2]:
        return StartPoint(cursor, Event.from_entry(*replies[2][0]).n + 1, info)
    if first:
        oldest = Event.from_entry(*first[0])
        # Below the oldest entry is a real (trimmed) position only if entries were trimmed.
        if cursor < oldest.id and oldest.n > 0:
            return StartPoint(cursor, None, info)
    raise ApiError(400, f"Last-Event-ID {cursor} is not an event of message {message_id}")


def follow(hub: Hub, message_id: str, start: StartPoint) -> Subscriber:
    """A subscriber of ``message_id`` from ``start`` on."""
    return hub.subscribe(
        message_id,
        after=start.after,
        next_n=start.next_n,
        watch_ms=start.info.watch_ms,
        info=start.info,
    )
