"""The append script: fenced by owner, idempotent under retries, never resurrecting a message."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from redis.exceptions import ClusterError
from redis.exceptions import ConnectionError as RedisConnectionError

from shared import keys
from shared.events import ZERO_ID, Kind
from shared.messages import Job, submit
from shared.redis_client import RedisClient
from shared.streams import read_after
from tests.support import PARTITIONS
from worker.script_batch import ScriptBatch
from worker.stream_writer import EventsLost, StreamWriter, WriteRefused

MESSAGE = "M" * 22


async def _writer(
    redis: RedisClient, appends: ScriptBatch, owner: str = "attempt-1"
) -> StreamWriter:
    return StreamWriter(redis, appends, MESSAGE, owner, ttl_ms=60_000, maxlen=100)


async def test_append_writes_announces_and_expires(
    redis: RedisClient, appends: ScriptBatch
) -> None:
    await submit(redis, Job(MESSAGE, "p", 3), ttl_ms=60_000, model="test", partitions=PARTITIONS)
    writer = await _writer(redis, appends)
    assert await writer.claim() == "ok"
    pubsub = redis.pubsub()
    await pubsub.ssubscribe(keys.message_channel(MESSAGE))
    await writer.append(Kind.CHUNK, b'"hi"')
    await writer.append(Kind.DONE, b"")
    events = await read_after(redis, keys.message_stream(MESSAGE), ZERO_ID, count=10)
    assert [(e.n, e.kind, e.data) for e in events] == [
        (0, Kind.CHUNK, b'"hi"'),
        (1, Kind.DONE, b""),
    ]
    meta = await redis.hgetall(keys.message_meta(MESSAGE))
    assert meta[b"status"] == b"done"
    assert meta[b"end"] == events[-1].raw_id
    assert meta[b"seq"] == b"2"
    assert 0 < await redis.pttl(keys.message_stream(MESSAGE)) <= 60_000
    announced: list[bytes] = []
    while len(announced) < 2:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
        if message:
            announced.append(message["data"])
    assert announced == [events[0].raw_id + b' 0 chunk "hi"', events[1].raw_id + b" 1 done "]
    await pubsub.aclose()  # type: ignore[no-untyped-call]


class _Twice:
    """The append script as redis-py's retry runs it when a reply was lost: the same call
    twice (and the second reply is the one the caller gets)."""

    def __init__(self, appends: ScriptBatch) -> None:
        self._appends = appends

    async def __call__(self, keys: Sequence[str], args: Sequence[str | bytes]) -> Any:
        await self._appends(keys, args)
        return await self._appends(keys, args)


class _ReplyLost:
    """The append script applied, its reply lost for good (redis-py's retries exhausted)."""

    def __init__(self, appends: ScriptBatch) -> None:
        self._appends = appends
        self.lose = True

    async def __call__(self, keys: Sequence[str], args: Sequence[str | bytes]) -> Any:
        reply = await self._appends(keys, args)
        if self.lose:
            raise RedisConnectionError("the reply was lost")
        return reply


async def test_a_retried_append_is_not_written_twice(
    redis: RedisClient, appends: ScriptBatch
) -> None:
    await submit(redis, Job(MESSAGE, "p", 3), ttl_ms=60_000, model="test", partitions=PARTITIONS)
    writer = StreamWriter(redis, _Twice(appends), MESSAGE, "a", ttl_ms=60_000, maxlen=100)
    assert await writer.claim() == "ok"
    await writer.append(Kind.CHUNK, b'"once"')
    await writer.append(Kind.CHUNK, b'"twice"')
    events = await read_after(redis, keys.message_stream(MESSAGE), ZERO_ID, count=10)
    assert [(e.n, e.data) for e in events] == [(0, b'"once"'), (1, b'"twice"')]


async def test_after_a_lost_reply_the_next_event_is_still_written(
    redis: RedisClient, appends: ScriptBatch
) -> None:
    """A call whose reply was lost (retries exhausted) may have happened; the next call, say
    the error event, must land after it rather than be taken for a repeat."""
    await submit(redis, Job(MESSAGE, "p", 3), ttl_ms=60_000, model="test", partitions=PARTITIONS)
    flaky = _ReplyLost(appends)
    writer = StreamWriter(redis, flaky, MESSAGE, "a", ttl_ms=60_000, maxlen=100)
    assert await writer.claim() == "ok"
    with pytest.raises(RedisConnectionError):
        await writer.append(Kind.CHUNK, b'"written, reply lost"')
    flaky.lose = False
    await writer.append(Kind.ERROR, b'{"type":"x","message":"y"}')
    events = await read_after(redis, keys.message_stream(MESSAGE), ZERO_ID, count=10)
    assert [(e.n, e.kind) for e in events] == [(0, Kind.CHUNK), (1, Kind.ERROR)]
    assert await redis.hget(keys.message_meta(MESSAGE), "status") == b"error"


async def test_events_a_failover_lost_are_written_again(
    redis: RedisClient, appends: ScriptBatch
) -> None:
    """Redis failed over to a replica that lacked the last events: the attempt writes them
    again, in order, before the next one, and marks the message as rewound."""
    await submit(redis, Job(MESSAGE, "p", 3), ttl_ms=60_000, model="test", partitions=PARTITIONS)
    writer = await _writer(redis, appends)
    assert await writer.claim() == "ok"
    for i in range(4):
        await writer.append(Kind.CHUNK, orjson.dumps(f"t{i}"))
    stream = keys.message_stream(MESSAGE)
    lost = await read_after(redis, stream, ZERO_ID, count=10)
    # What the replica had: the first two events.
    await redis.xdel(stream, lost[2].raw_id, lost[3].raw_id)
    await redis.hset(keys.message_meta(MESSAGE), "seq", 2)
    await writer.append(Kind.CHUNK, b'"t4"')
    events = await read_after(redis, stream, ZERO_ID, count=10)
    assert [(e.n, e.data) for e in events] == [(i, f'"t{i}"'.encode()) for i in range(5)]
    assert await redis.hget(keys.message_meta(MESSAGE), "rewound") == b"1"


async def test_a_retried_claim_succeeds(redis: RedisClient, appends: ScriptBatch) -> None:
    await submit(redis, Job(MESSAGE, "p", 3), ttl_ms=60_000, model="test", partitions=PARTITIONS)
    writer = await _writer(redis, appends)
    assert await writer.claim() == "ok"
    assert await writer.claim() == "ok"  # the same attempt again, as after a lost reply


async def test_another_attempt_cannot_write(redis: RedisClient, appends: ScriptBatch) -> None:
    await submit(redis, Job(MESSAGE, "p", 3), ttl_ms=60_000, model="test", partitions=PARTITIONS)
    owner = await _writer(redis, appends, "attempt-1")
    assert await owner.claim()
    intruder = await _writer(redis, appends, "attempt-2")
    assert await intruder.claim() == "owned"
    with pytest.raises(WriteRefused, match="fenced"):
        await intruder.append(Kind.CHUNK, b'"mine"')
    assert await redis.xlen(keys.message_stream(MESSAGE)) == 0


async def test_an_expired_message_is_never_resurrected(
    redis: RedisClient, appends: ScriptBatch
) -> None:
    await submit(redis, Job(MESSAGE, "p", 3), ttl_ms=60_000, model="test", partitions=PARTITIONS)
    writer = await _writer(redis, appends)
    assert await writer.claim() == "ok"
    await redis.delete(keys.message_meta(MESSAGE))
    with pytest.raises(WriteRefused, match="gone"):
        await writer.append(Kind.CHUNK, b'"late"')
    assert not await redis.exists(keys.message_stream(MESSAGE))
    assert await writer.claim() == "gone"


async def test_nothing_is_appended_after_the_end(redis: RedisClient, appends: ScriptBatch) -> None:
    await submit(redis, Job(MESSAGE, "p", 3), ttl_ms=60_000, model="test", partitions=PARTITIONS)
    writer = await _writer(redis, appends)
    assert await writer.claim() == "ok"
    await writer.append(Kind.DONE, b"")
    with pytest.raises(WriteRefused, match="finished"):
        await writer.append(Kind.ERROR, b'{"type":"late","message":"too late"}')
    assert await writer.claim() == "finished"


class _FailsFirst:
    """The append script failing ``times`` times without an answer (a slot in migration, a
    failover under way), the first of them after Redis applied the call."""

    def __init__(self, appends: ScriptBatch, times: int, *, apply_first: bool = True) -> None:
        self._appends = appends
        self.left = times
        self.calls = 0
        self._apply_first = apply_first

    async def __call__(self, keys: Sequence[str], args: Sequence[str | bytes]) -> Any:
        self.calls += 1
        if self.left:
            if self.calls == 1 and self._apply_first:
                await self._appends(keys, args)
            self.left -= 1
            raise ClusterError("TTL exhausted.")
        return await self._appends(keys, args)


async def test_an_append_that_fails_without_an_answer_is_retried_once_written(
    redis: RedisClient, appends: ScriptBatch
) -> None:
    """Through a migration or a failover the append is retried until Redis answers; the
    event that was applied before the first failure is not written again."""
    await submit(redis, Job(MESSAGE, "p", 3), ttl_ms=60_000, model="test", partitions=PARTITIONS)
    flaky = _FailsFirst(appends, times=3)
    writer = StreamWriter(redis, flaky, MESSAGE, "a", ttl_ms=60_000, maxlen=100, retry_for_s=30)
    assert await writer.claim() == "ok"
    await writer.append(Kind.CHUNK, b'"once"')
    await writer.append(Kind.CHUNK, b'"twice"')
    events = await read_after(redis, keys.message_stream(MESSAGE), ZERO_ID, count=10)
    assert [(e.n, e.data) for e in events] == [(0, b'"once"'), (1, b'"twice"')]
    assert flaky.calls == 4  # three failures (the first one applied), then the second event


async def test_an_append_failing_past_its_retry_time_raises(
    redis: RedisClient, appends: ScriptBatch
) -> None:
    await submit(redis, Job(MESSAGE, "p", 3), ttl_ms=60_000, model="test", partitions=PARTITIONS)
    flaky = _FailsFirst(appends, times=1_000_000, apply_first=False)
    writer = StreamWriter(redis, flaky, MESSAGE, "a", ttl_ms=60_000, maxlen=100, retry_for_s=0.3)
    assert await writer.claim() == "ok"
    with pytest.raises(ClusterError):
        await writer.append(Kind.CHUNK, b'"never answered"')
    assert flaky.calls > 1
    assert await redis.xlen(keys.message_stream(MESSAGE)) == 0


async def test_events_lost_beyond_what_an_attempt_keeps_end_the_answer_after_what_is_held(
    redis: RedisClient, appends: ScriptBatch
) -> None:
    """A failover lost more than the writer keeps: EventsLost, and the error event that
    follows lands right after what Redis holds."""
    await submit(redis, Job(MESSAGE, "p", 3), ttl_ms=60_000, model="test", partitions=PARTITIONS)
    writer = await _writer(redis, appends)
    assert await writer.claim() == "ok"
    for i in range(3):
        await writer.append(Kind.CHUNK, orjson.dumps(f"t{i}"))
    stream = keys.message_stream(MESSAGE)
    written = await read_after(redis, stream, ZERO_ID, count=10)
    await redis.xdel(stream, *(e.raw_id for e in written[1:]))
    await redis.hset(keys.message_meta(MESSAGE), "seq", 1)
    writer._sent.clear()  # as if they had fallen out of what it keeps
    with pytest.raises(EventsLost):
        await writer.append(Kind.CHUNK, b'"t3"')
    await writer.append(Kind.ERROR, b'{"type":"events_lost","message":"m"}')
    events = await read_after(redis, stream, ZERO_ID, count=10)
    assert [(e.n, e.kind) for e in events] == [(0, Kind.CHUNK), (1, Kind.ERROR)]
    assert await redis.hget(keys.message_meta(MESSAGE), "rewound") == b"1"
