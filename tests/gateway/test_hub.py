"""The fan-out hub on a real Redis: read cost, slow subscribers, the seam, lost announcements."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest

from gateway.app import LIVE_CONNECTION_NAME
from gateway.batches import Batch
from gateway.hub import Hub
from gateway.positions import Gap, Item
from gateway.subscriber import Subscriber
from shared import keys
from shared.events import EntryId, Event, Kind
from shared.messages import Job, new_message_id, submit
from shared.redis_client import RedisClient
from shared.settings import Settings
from tests.support import (
    ON_BOTH,
    PARTITIONS,
    SseEvent,
    Stack,
    eventually,
    parse_sse,
    post_and_hang_up,
    post_stream,
    read_stream,
    run_worker,
    start_stack,
)
from worker.script_batch import ScriptBatch
from worker.stream_writer import StreamWriter


async def _redis_reads(redis: RedisClient) -> int:
    """Stream reads Redis has served since the last CONFIG RESETSTAT (any client)."""
    stats = await redis.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
        for name in ("xrange", "xrevrange", "xread")
    )


async def _submit(stack: Stack, prompt: str, max_tokens: int) -> str:
    async with (
        stack.client() as client,
        client.stream(
            "POST",
            "/chat/stream",
            json={"prompt": prompt, "max_tokens": max_tokens},
            headers={"Accept": "text/event-stream"},
        ) as response,
    ):
        return response.headers["x-message-id"]


async def _subscribe(hub: Hub, message_id: str) -> Subscriber:
    """A subscriber of ``message_id`` from its start, located as a GET locates it."""
    start = await hub.locate(message_id, None)
    assert start is not None
    return hub.subscribe(message_id, start)


async def _attached_and_writer(
    stack: Stack, redis: RedisClient, appends: ScriptBatch, prompt: str
) -> tuple[str, asyncio.Task[list[Item]], StreamWriter]:
    """A message with one subscriber attached to its tail, and a writer that owns it (no worker)."""
    message_id = await _submit(stack, prompt, 3)
    subscriber = await _subscribe(stack.hub, message_id)
    task = asyncio.create_task(_drain(subscriber))
    await eventually(lambda: subscriber.live)
    writer = StreamWriter(redis, appends, message_id, "test-owner", ttl_ms=60_000, maxlen=100)
    assert await writer.claim() == "ok"
    return message_id, task, writer


async def _drain(subscriber: Subscriber) -> list[Item]:
    items: list[Item] = []
    try:
        while (batch := await subscriber.next_batch()) is not None:
            items.extend(batch)
    finally:
        subscriber.close()
    return items


async def _fan_out_reads(
    settings: Settings, redis: RedisClient, subscribers: int, tokens: int
) -> tuple[int, int]:
    """(reads while subscribers joined, reads while `tokens` tokens were generated)."""
    async with start_stack(settings, worker=False) as stack:
        message_id = await _submit(stack, "fan out", tokens)
        await redis.config_resetstat()
        readers = [await _subscribe(stack.hub, message_id) for _ in range(subscribers)]
        tasks = [asyncio.create_task(_drain(r)) for r in readers]
        await eventually(lambda: stack.hub.tail_count > 0 and all(r.live for r in readers))
        joined = await _redis_reads(redis)
        await redis.config_resetstat()
        async with run_worker(settings):
            results = await asyncio.gather(*tasks)
        during = await _redis_reads(redis)
    # every token, the finish reason, usage and the end
    assert all(len(items) == tokens + 3 for items in results)
    assert all(items == results[0] for items in results)
    return joined, during


async def test_redis_reads_do_not_grow_with_subscribers_or_tokens(
    settings: Settings, redis: RedisClient
) -> None:
    one_join, one_live = await _fan_out_reads(settings, redis, subscribers=1, tokens=100)
    fifty_join, fifty_live = await _fan_out_reads(settings, redis, subscribers=50, tokens=100)
    _, fifty_long_live = await _fan_out_reads(settings, redis, subscribers=50, tokens=400)
    # Live tokens cost no read at all: the one subscribed connection carries them.
    assert one_live == fifty_live == fifty_long_live == 0
    # Joining costs a bounded number of reads per subscriber (its catch-up), never per token.
    assert one_join <= 3
    assert fifty_join <= 3 * 50


@ON_BOTH
async def test_subscribers_of_one_message_see_identical_sequences(stack: Stack) -> None:
    async with stack.client() as client:
        message_id = await _submit(stack, "many eyes", 60)
        results = await asyncio.gather(
            *(read_stream(client, "GET", f"/chat/stream/{message_id}") for _ in range(20))
        )
        _, full, _ = await post_stream(client, "many eyes", 60)
    bodies = [parse_sse(raw).events for _, raw in results]
    assert all(body == bodies[0] for body in bodies)
    texts = [e.data for e in bodies[0]]
    assert len(texts) == 61
    assert [e.data.split('"content":')[-1] for e in bodies[0][:-1]] == [
        e.data.split('"content":')[-1] for e in full.events[:-1]
    ]


@ON_BOTH
@pytest.mark.usefixtures("redis")
async def test_slow_subscriber_loses_nothing_and_does_not_hold_up_a_fast_one(
    settings: Settings,
) -> None:
    small_backlog = dataclasses.replace(settings, subscriber_backlog=4)
    async with start_stack(small_backlog, worker=False) as stack:
        message_id = await _submit(stack, "slow and fast", 200)
        fast = await _subscribe(stack.hub, message_id)
        slow = await _subscribe(stack.hub, message_id)
        fast_task = asyncio.create_task(_drain(fast))
        # Attach the slow one (its first read finds nothing); after that it reads nothing until
        # the fast one has everything.
        slow_first = asyncio.create_task(slow.next_batch())
        await eventually(lambda: fast.live and slow.live)
        async with run_worker(small_backlog):
            fast_items = await fast_task  # completes while the slow one has read one batch
            first_batch = await slow_first
            assert first_batch is not None
            assert len(slow._pending) <= small_backlog.subscriber_backlog
            assert not slow.live  # it was detached, not buffered without bound
            slow_items = first_batch + await _drain(slow)
    assert len(fast_items) == 203
    assert _ids(slow_items) == _ids(fast_items)
    assert not any(isinstance(item, Gap) for item in slow_items)


async def test_disconnect_releases_the_subscriber_and_generation_goes_on(
    settings: Settings, redis: RedisClient
) -> None:
    slow_model = dataclasses.replace(settings, mock_token_delay_ms=10.0)
    async with start_stack(slow_model, linger_s=0.0) as stack, stack.client() as client:
        message_id = await post_and_hang_up(stack, {"prompt": "walk away", "max_tokens": 50})
        await eventually(lambda: stack.hub.subscriber_count == 0)
        # The tail goes once nobody has watched it for linger_s (and its channel is unsubscribed).
        await eventually(lambda: stack.hub.tail_count == 0)
        assert await redis.pubsub_channels("tr:{*") == []
        # The generation was not cancelled: the whole answer is there to replay.
        for _ in range(500):
            if await redis.hget(keys.message_meta(message_id), "status") == b"done":
                break
            await asyncio.sleep(0.02)
        _, raw = await read_stream(client, "GET", f"/chat/stream/{message_id}")
    assert len(parse_sse(raw).events) == 51


async def test_lost_live_connection_loses_no_event(settings: Settings, redis: RedisClient) -> None:
    """Kill the gateway's subscribed connection mid-stream: the tail re-reads what it missed."""
    paced = dataclasses.replace(settings, mock_token_delay_ms=5.0)
    async with start_stack(paced) as stack, stack.client() as client:
        async with client.stream(
            "POST",
            "/chat/stream",
            json={"prompt": "cut the wire", "max_tokens": 120},
            headers={"Accept": "text/event-stream"},
        ) as response:
            message_id = response.headers["x-message-id"]
            raw = b""
            killed = 0
            async for chunk in response.aiter_bytes():
                raw += chunk
                if killed < 3 and raw.count(b"\n\n") > 20 * (killed + 1):
                    killed += await _kill_live_connection(redis)
        assert killed == 3
        _, replay = await read_stream(client, "GET", f"/chat/stream/{message_id}")
    live_events = parse_sse(raw).events
    assert live_events == parse_sse(replay).events
    assert len(live_events) == 121
    assert "".join(e.data for e in live_events).count("[DONE]") == 1


async def test_gap_in_announcements_triggers_a_re_read(
    settings: Settings, redis: RedisClient, appends: ScriptBatch
) -> None:
    """An announcement that never arrives is noticed from the next one's sequence number."""
    async with start_stack(settings, worker=False) as stack:
        message_id, task, writer = await _attached_and_writer(stack, redis, appends, "gap")
        # Event 0 is written the way the append script writes it, minus its announcement.
        await redis.xadd(keys.message_stream(message_id), {"n": "0", "k": "chunk", "d": '"lost "'})
        await redis.hset(keys.message_meta(message_id), "seq", "1")
        assert await writer.claim() == "ok"  # the same attempt again: it writes event 1 next
        reads = stack.hub.counters.reads
        await writer.append(Kind.CHUNK, b'"found"')
        await writer.append(Kind.DONE, b"")
        items = await task
    assert [(e.n, e.data) for e in items if isinstance(e, Event)] == [
        (0, b'"lost "'),
        (1, b'"found"'),
        (2, b""),
    ]
    assert not any(isinstance(item, Gap) for item in items)
    assert stack.hub.counters.reads > reads  # the tail re-read the stream to find event 0


async def _kill_live_connection(redis: RedisClient) -> int:
    clients = await redis.client_list()
    ids = [c["id"] for c in clients if c.get("name") == LIVE_CONNECTION_NAME]
    for client_id in ids:
        await redis.client_kill_filter(_id=client_id)
    return len(ids)


def _ids(items: list[Item]) -> list[str]:
    return [str(item.id) for item in items if isinstance(item, Event)]


@pytest.mark.usefixtures("redis")
async def test_a_lost_final_announcement_is_found_by_the_quiet_check(
    settings: Settings, redis: RedisClient, appends: ScriptBatch
) -> None:
    quick = dataclasses.replace(settings, heartbeat_s=0.2)
    async with start_stack(quick, worker=False) as stack:
        message_id, task, writer = await _attached_and_writer(stack, redis, appends, "lost end")
        await writer.append(Kind.CHUNK, b'"only"')
        # The end is written, but its announcement never arrives (as if the connection dropped).
        end_id = await redis.xadd(keys.message_stream(message_id), {"n": "1", "k": "done", "d": ""})
        await redis.hset(
            keys.message_meta(message_id), mapping={"seq": "2", "status": "done", "end": end_id}
        )
        items = await asyncio.wait_for(task, 5)
    assert [e.kind for e in items if isinstance(e, Event)] == [Kind.CHUNK, Kind.DONE]


@pytest.mark.usefixtures("redis")
async def test_a_message_that_expires_under_its_clients_ends_their_streams(
    settings: Settings, redis: RedisClient
) -> None:
    quick = dataclasses.replace(settings, heartbeat_s=0.2)
    async with start_stack(quick, worker=False) as stack, stack.client() as client:
        message_id = await _submit(stack, "vanish", 3)
        async with client.stream("GET", f"/chat/stream/{message_id}") as response:
            assert response.status_code == 200
            await eventually(lambda: stack.hub.subscriber_count == 1)
            await redis.delete(keys.message_meta(message_id), keys.message_stream(message_id))
            raw = await asyncio.wait_for(response.aread(), 5)  # it ends: the client reconnects
        (lost,) = parse_sse(raw).events  # an in-band error, no resume position
        assert lost.event == "error"
        assert lost.id is None
        assert orjson.loads(lost.data)["error"]["type"] == "message_lost"
        assert (await client.get(f"/chat/stream/{message_id}")).status_code == 404


async def test_an_announcement_it_cannot_read_does_not_stop_the_others(
    stack: Stack, redis: RedisClient
) -> None:
    async with stack.client() as client:
        message_id = await _submit(stack, "poison", 40)
        await redis.spublish(keys.message_channel(message_id), b"1-1 0 kind-from-the-future {}")
        _, raw = await read_stream(client, "GET", f"/chat/stream/{message_id}")
        message_id_2, events, _ = await post_stream(client, "after poison", 10)
    assert parse_sse(raw).events[-1].data == "[DONE]"
    assert events.events[-1].data == "[DONE]"
    assert message_id_2 != message_id


async def test_reconnects_near_the_live_end_are_answered_from_memory(
    settings: Settings, redis: RedisClient
) -> None:
    paced = dataclasses.replace(settings, mock_token_delay_ms=20.0, coalesce_ms=0)
    async with start_stack(paced) as stack, stack.client() as client:
        # This follower keeps the message's tail warm.
        async with _following(client, "warm", 60) as (url, seen):
            ids = [e.id or "" for e in seen]
            # The first resume reads the message's meta from Redis and leaves it with the tail.
            await read_stream(client, "GET", url, headers={"Last-Event-ID": ids[3]})
            await redis.config_resetstat()
            reads = stack.hub.counters.reads
            _, resumed = await read_stream(client, "GET", url, headers={"Last-Event-ID": ids[5]})
            assert await _redis_reads(redis) == 0  # neither locating nor catching up read Redis
            assert stack.hub.counters.reads == reads
        _, whole = await read_stream(client, "GET", url)
    assert parse_sse(resumed).events == parse_sse(whole).events[6:]


async def test_a_join_that_starts_the_tail_leaves_it_what_later_joins_need(
    settings: Settings, redis: RedisClient
) -> None:
    paced = dataclasses.replace(settings, mock_token_delay_ms=20.0, coalesce_ms=0)
    message_id = new_message_id()
    async with start_stack(paced) as stack, stack.client() as client:
        # Submitted behind the gateway's back: the first GET is the first this gateway hears of
        # the message, and its subscriber starts the tail.
        job = Job(message_id=message_id, prompt="cold", max_tokens=60, model="mock")
        await submit(redis, job, ttl_ms=60_000, model="mock", partitions=PARTITIONS)
        url = f"/chat/stream/{message_id}"
        async with client.stream("GET", url) as response:
            raw = b""
            async for piece in response.aiter_bytes():
                raw += piece
                if raw.count(b"data:") >= 10:
                    break
            ids = [e.id or "" for e in parse_sse(raw).events]
            await redis.config_resetstat()
            _, resumed = await read_stream(client, "GET", url, headers={"Last-Event-ID": ids[5]})
            assert await _redis_reads(redis) == 0
        _, whole = await read_stream(client, "GET", url)
    assert parse_sse(resumed).events == parse_sse(whole).events[6:]


async def test_a_cursor_older_than_the_memory_is_read_from_redis(
    settings: Settings, redis: RedisClient
) -> None:
    small = dataclasses.replace(settings, mock_token_delay_ms=20.0, coalesce_ms=0, live_replay=3)
    async with start_stack(small) as stack, stack.client() as client:
        async with _following(client, "cold", 40) as (url, seen):
            first_id = seen[0].id or ""
            await redis.config_resetstat()
            _, resumed = await read_stream(client, "GET", url, headers={"Last-Event-ID": first_id})
            assert await _redis_reads(redis) > 0
        _, whole = await read_stream(client, "GET", url)
    assert parse_sse(resumed).events == parse_sse(whole).events[1:]


@contextlib.asynccontextmanager
async def _following(
    client: httpx.AsyncClient, prompt: str, max_tokens: int
) -> AsyncIterator[tuple[str, list[SseEvent]]]:
    """POST a streamed answer and read its first 10 events; the stream stays open inside.

    Yields the message's GET path and those events.
    """
    async with client.stream(
        "POST", "/chat/stream", json={"prompt": prompt, "max_tokens": max_tokens}
    ) as response:
        raw = b""
        async for piece in response.aiter_bytes():
            raw += piece
            if raw.count(b"data:") >= 10:
                break
        yield f"/chat/stream/{response.headers['x-message-id']}", parse_sse(raw).events


class _RecordingSink:
    """A live client that keeps up and records each batch it is offered."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def offer(self, batch: Batch) -> bool:
        self.batches.append([e.raw_id.decode() for e in batch.events])
        return True


@pytest.mark.usefixtures("redis")
async def test_announcements_read_together_reach_a_live_client_in_one_batch(
    settings: Settings, redis: RedisClient
) -> None:
    async with start_stack(settings, worker=False) as stack:
        message_id = await _submit(stack, "together", 5)
        subscriber = await _subscribe(stack.hub, message_id)
        sink = subscriber.sink = _RecordingSink()
        task = asyncio.create_task(_drain(subscriber))
        await eventually(lambda: subscriber.live)
        ids = await _announce_together(stack, redis, message_id, 4)
        assert sink.batches == []  # handed on once the read's announcements are all in
        await eventually(lambda: bool(sink.batches))
        assert sink.batches == [ids]
        assert subscriber.position == ids[-1]
        subscriber.close()
        assert await task == []


async def _announce_together(
    stack: Stack, redis: RedisClient, message_id: str, count: int
) -> list[str]:
    """Write ``count`` chunks to the message's stream and announce them to the hub the way the
    subscribed connection's reader hands on the replies of one socket read: one after another,
    without yielding in between. Returns their ids."""
    stream = keys.message_stream(message_id)
    ids = []
    for n in range(count):
        raw = await redis.xadd(stream, {"n": str(n), "k": "chunk", "d": f'"t{n}"'})
        ids.append(str(EntryId.parse(raw)))
    channel = keys.message_channel(message_id).encode()
    for n, entry_id in enumerate(ids):
        stack.hub.on_message(channel, f'{entry_id} {n} chunk "t{n}"'.encode())
    return ids


class _BrokenSink:
    """A live client whose writes fail."""

    def offer(self, batch: Batch) -> bool:
        raise RuntimeError("this client's write failed")


@pytest.mark.usefixtures("redis")
async def test_a_client_whose_live_delivery_fails_does_not_hold_up_the_others(
    settings: Settings, redis: RedisClient, caplog: pytest.LogCaptureFixture
) -> None:
    async with start_stack(settings, worker=False) as stack:
        first, second = await _submit(stack, "one", 5), await _submit(stack, "two", 5)
        broken, fine = await _subscribe(stack.hub, first), await _subscribe(stack.hub, first)
        other = await _subscribe(stack.hub, second)
        broken.sink = _BrokenSink()
        fine_sink = fine.sink = _RecordingSink()
        other_sink = other.sink = _RecordingSink()
        tasks = [asyncio.create_task(_drain(s)) for s in (fine, other)]
        broken_batch = asyncio.create_task(broken.next_batch())
        await eventually(lambda: all(s.live for s in (broken, fine, other)))
        # The broken client's tail is flushed first, in the same flush as the other message's.
        first_ids = await _announce_together(stack, redis, first, 3)
        second_ids = await _announce_together(stack, redis, second, 2)
        await eventually(lambda: bool(fine_sink.batches and other_sink.batches))
        assert fine_sink.batches == [first_ids]
        assert other_sink.batches == [second_ids]
        # The broken one left the tail and reads the events again by itself (here: memory).
        items = await asyncio.wait_for(broken_batch, 2)
        assert items is not None
        assert [e.raw_id.decode() for e in items if isinstance(e, Event)] == first_ids
        assert "live delivery to a client of" in caplog.text
        for subscriber in (broken, fine, other):
            subscriber.close()
        await asyncio.gather(*tasks)


@pytest.mark.usefixtures("redis")
async def test_more_events_at_once_than_the_backlog_are_read_from_the_stream_at_once(
    settings: Settings, redis: RedisClient
) -> None:
    small_backlog = dataclasses.replace(settings, subscriber_backlog=4, heartbeat_s=30.0)
    async with start_stack(small_backlog, worker=False) as stack:
        message_id = await _submit(stack, "a burst", 10)
        subscriber = await _subscribe(stack.hub, message_id)  # no sink: its events queue
        waiting = asyncio.create_task(subscriber.next_batch())
        await eventually(lambda: subscriber.live)
        ids = await _announce_together(stack, redis, message_id, 6)
        # Six events do not fit a backlog of 4: the subscriber reads them from the stream
        # (and is woken to do it, not left asleep until a heartbeat).
        items = await asyncio.wait_for(waiting, 2)
        assert items is not None
        assert [e.raw_id.decode() for e in items if isinstance(e, Event)] == ids
        subscriber.close()


@pytest.mark.parametrize("events", [30, 700])
async def test_concurrent_cold_joins_of_a_message_share_its_reads(
    settings: Settings, redis: RedisClient, appends: ScriptBatch, events: int
) -> None:
    """40 clients join a message this gateway does not follow yet, all at once: one read
    starts its tail for all of them, and those reading from further back share their reads."""
    message_id = new_message_id()
    await submit(
        redis, Job(message_id, "cold joins", 1), ttl_ms=60_000, model="m", partitions=PARTITIONS
    )
    writer = StreamWriter(redis, appends, message_id, "test", ttl_ms=60_000, maxlen=10_000)
    assert await writer.claim() == "ok"
    for i in range(events):
        await writer.append(Kind.CHUNK, orjson.dumps(f"t{i} "))
    await writer.append(Kind.DONE, b"")
    async with start_stack(settings, worker=False) as stack, stack.client() as client:
        await redis.config_resetstat()
        url = f"/chat/stream/{message_id}"
        answers = await asyncio.gather(*(read_stream(client, "GET", url) for _ in range(40)))
        reads = await _redis_reads(redis)
    assert all(parse_sse(raw).events == parse_sse(answers[0][1]).events for _, raw in answers)
    assert len(parse_sse(answers[0][1]).events) == events + 1
    # The tail's start (meta and newest 512 events); for a message longer than that, one
    # read of 512 from its start too, shared by all 40, after which memory covers the rest.
    assert reads == (1 if events < 512 else 2)


async def test_a_tails_memory_is_bounded_by_bytes_and_joins_still_get_everything(
    settings: Settings, redis: RedisClient, appends: ScriptBatch
) -> None:
    """Big events: the tail keeps at most TOKENRELAY_LIVE_REPLAY_BYTES of them (not 512);
    a client joining from the start reads the rest from Redis, in order."""
    small = dataclasses.replace(settings, live_replay_bytes=4096)
    async with start_stack(small, worker=False) as stack:
        message_id, task, writer = await _attached_and_writer(stack, redis, appends, "big")
        texts = [orjson.dumps(f"{i:02d}" + "x" * 1000) for i in range(20)]
        for text in texts:
            await writer.append(Kind.CHUNK, text)
        await writer.append(Kind.DONE, b"")
        live = await task
        tail = stack.hub.warm_tail(message_id)
        assert tail is not None
        assert 0 < tail.held_bytes <= 4096
        joined = await _drain(await _subscribe(stack.hub, message_id))
    for items in (live, joined):
        assert [e.data for e in items if isinstance(e, Event)] == [*texts, b""]
