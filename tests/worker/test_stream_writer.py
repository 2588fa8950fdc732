"""The append script: fenced by owner, idempotent under retries, never resurrecting a message."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from shared import keys
from shared.events import ZERO_ID, Kind
from shared.messages import Job, submit
from shared.streams import read_after
from worker.script_batch import ScriptBatch
from worker.stream_writer import StreamWriter, WriteRefused

MESSAGE = "M" * 22


async def _writer(redis: Redis, appends: ScriptBatch, owner: str = "attempt-1") -> StreamWriter:
    return StreamWriter(redis, appends, MESSAGE, owner, ttl_ms=60_000, maxlen=100)


async def test_append_writes_announces_and_expires(redis: Redis, appends: ScriptBatch) -> None:
    await submit(redis, Job(MESSAGE, "p", 3), ttl_ms=60_000, model="test")
    writer = await _writer(redis, appends)
    assert await writer.claim() == "ok"
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.message_channel(MESSAGE))
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


async def test_a_retried_append_is_not_written_twice(redis: Redis, appends: ScriptBatch) -> None:
    await submit(redis, Job(MESSAGE, "p", 3), ttl_ms=60_000, model="test")
    writer = await _writer(redis, appends)
    assert await writer.claim() == "ok"
    await writer.append(Kind.CHUNK, b'"once"')
    writer._calls -= 1  # as if the reply had been lost and redis-py sent the same call again
    await writer.append(Kind.CHUNK, b'"once"')
    assert await redis.xlen(keys.message_stream(MESSAGE)) == 1


async def test_after_a_lost_reply_the_next_event_is_still_written(
    redis: Redis, appends: ScriptBatch
) -> None:
    """A call whose reply was lost (retries exhausted) really happened; the next call, say the
    error event, must land after it rather than be taken for a repeat."""
    await submit(redis, Job(MESSAGE, "p", 3), ttl_ms=60_000, model="test")
    writer = await _writer(redis, appends)
    assert await writer.claim() == "ok"
    await writer.append(Kind.CHUNK, b'"written, reply lost"')
    writer._written -= 1  # the writer never learnt of it
    await writer.append(Kind.ERROR, b'{"type":"x","message":"y"}')
    events = await read_after(redis, keys.message_stream(MESSAGE), ZERO_ID, count=10)
    assert [(e.n, e.kind) for e in events] == [(0, Kind.CHUNK), (1, Kind.ERROR)]
    assert await redis.hget(keys.message_meta(MESSAGE), "status") == b"error"


async def test_a_retried_claim_succeeds(redis: Redis, appends: ScriptBatch) -> None:
    await submit(redis, Job(MESSAGE, "p", 3), ttl_ms=60_000, model="test")
    writer = await _writer(redis, appends)
    assert await writer.claim() == "ok"
    assert await writer.claim() == "ok"  # the same attempt again, as after a lost reply


async def test_another_attempt_cannot_write(redis: Redis, appends: ScriptBatch) -> None:
    await submit(redis, Job(MESSAGE, "p", 3), ttl_ms=60_000, model="test")
    owner = await _writer(redis, appends, "attempt-1")
    assert await owner.claim()
    intruder = await _writer(redis, appends, "attempt-2")
    assert await intruder.claim() == "owned"
    with pytest.raises(WriteRefused, match="fenced"):
        await intruder.append(Kind.CHUNK, b'"mine"')
    assert await redis.xlen(keys.message_stream(MESSAGE)) == 0


async def test_an_expired_message_is_never_resurrected(redis: Redis, appends: ScriptBatch) -> None:
    await submit(redis, Job(MESSAGE, "p", 3), ttl_ms=60_000, model="test")
    writer = await _writer(redis, appends)
    assert await writer.claim() == "ok"
    await redis.delete(keys.message_meta(MESSAGE))
    with pytest.raises(WriteRefused, match="gone"):
        await writer.append(Kind.CHUNK, b'"late"')
    assert not await redis.exists(keys.message_stream(MESSAGE))
    assert await writer.claim() == "gone"


async def test_nothing_is_appended_after_the_end(redis: Redis, appends: ScriptBatch) -> None:
    await submit(redis, Job(MESSAGE, "p", 3), ttl_ms=60_000, model="test")
    writer = await _writer(redis, appends)
    assert await writer.claim() == "ok"
    await writer.append(Kind.DONE, b"")
    with pytest.raises(WriteRefused, match="finished"):
        await writer.append(Kind.ERROR, b'{"type":"late","message":"too late"}')
    assert await writer.claim() == "finished"
