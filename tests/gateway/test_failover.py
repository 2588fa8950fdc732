"""Redis Cluster and Sentinel under a gateway and a worker: a slot migrated under live clients,
a primary killed mid-stream (with and without durable mode), a Sentinel failover."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
import signal
from collections.abc import AsyncIterator, Iterator

import httpx
import orjson
import pytest

from shared import keys
from shared.settings import Settings
from tests.support import SseEvent, eventually, parse_sse, start_stack
from tokenrelay.local_redis import (
    LocalCluster,
    LocalSentinel,
    ask,
    migrate_slot,
    owner_of,
    slot_of,
)
from worker.backends.mock import mock_text

ON_CLUSTER = pytest.mark.parametrize("redis_kind", ["cluster"], indirect=True)
PROMPT = "a long answer through a storm"


async def _start(client: httpx.AsyncClient, max_tokens: int) -> str:
    """POST an answer; its message id (the POST's own stream is left at once)."""
    async with client.stream(
        "POST", "/chat/stream", json={"prompt": PROMPT, "max_tokens": max_tokens}
    ) as response:
        assert response.status_code == 200
        return response.headers["x-message-id"]


async def _follow(client: httpx.AsyncClient, message_id: str, seen: list[SseEvent]) -> None:
    """Follow the message to its end, resuming after the last id (as EventSource does) when a
    stream ends early; every answer must be a 200."""
    last: str | None = None
    for _ in range(100):
        headers = {"Last-Event-ID": last} if last else {}
        async with client.stream("GET", f"/chat/stream/{message_id}", headers=headers) as response:
            assert response.status_code == 200, (response.status_code, await response.aread())
            raw = b""
            async for piece in response.aiter_bytes():
                raw += piece
                if b"\n\n" not in raw:
                    continue
                cut = raw.rindex(b"\n\n") + 2
                events, raw = parse_sse(raw[:cut]).events, raw[cut:]
                seen.extend(events)
                last = next((e.id for e in reversed(events) if e.id), last)
                if seen and seen[-1].data == "[DONE]":
                    return
        await asyncio.sleep(0.05)
    raise AssertionError("the answer never ended")


def _after_last_reset(seen: list[SseEvent]) -> list[SseEvent]:
    resets = [i for i, e in enumerate(seen) if e.event == "reset"]
    return seen[resets[-1] + 1 :] if resets else seen


def _answer(seen: list[SseEvent]) -> str:
    """The text a client keeps: what came after the last reset."""
    return "".join(
        orjson.loads(e.data)["content"] for e in _after_last_reset(seen) if e.data != "[DONE]"
    )


def _no_duplicate(seen: list[SseEvent]) -> bool:
    ids = [e.id for e in _after_last_reset(seen) if e.id]
    return len(ids) == len(set(ids))


@contextlib.contextmanager
def _restored(cluster: LocalCluster) -> Iterator[None]:
    """Whatever a test does to the cluster's nodes, they are all back (the killed ones as
    replicas) afterwards."""
    try:
        yield
    finally:
        for port in cluster.ports:
            if port not in cluster.processes:
                cluster.start_node(port)
        cluster.wait_healthy(60)


@ON_CLUSTER
@pytest.mark.usefixtures("redis")
async def test_a_slot_moved_under_live_clients_loses_nothing(
    settings: Settings, redis_cluster: LocalCluster
) -> None:
    paced = dataclasses.replace(settings, mock_token_delay_ms=20.0)
    async with start_stack(paced) as stack, stack.client() as client:
        message_id = await _start(client, 150)
        seen: list[list[SseEvent]] = [[] for _ in range(4)]
        followers = [asyncio.create_task(_follow(client, message_id, s)) for s in seen]
        await eventually(lambda: all(len(s) > 20 for s in seen))
        slot = slot_of(keys.message_stream(message_id))
        source = owner_of(redis_cluster, slot)
        target = next(p for p in redis_cluster.primaries() if p != source)
        await asyncio.to_thread(migrate_slot, redis_cluster, slot, target)
        assert owner_of(redis_cluster, slot) == target
        await asyncio.wait_for(asyncio.gather(*followers), 60)
    for events in seen:
        assert not any(e.event == "reset" for e in events)  # a move loses nothing
        assert _answer(events) == mock_text(PROMPT, 150)
        assert _no_duplicate(events)


async def _kill_primary_of(
    cluster: LocalCluster, message_id: str, *, lose_replication: bool
) -> None:
    """Kill the primary serving the message. With ``lose_replication``, its replica is paused
    first, so that the last events reach only the primary, and are lost with it."""
    slot = slot_of(keys.message_stream(message_id))
    primary = owner_of(cluster, slot)
    (replica,) = cluster.replicas_of(primary)
    replica_pid = cluster.processes[replica].pid
    if lose_replication:
        # The replica stopped, its link cut (what the primary sent before is still delivered
        # from the socket's buffers on SIGCONT, nothing after): the next tokens reach the
        # primary only.
        os.kill(replica_pid, signal.SIGSTOP)
        ask(primary, "CLIENT", "KILL", "TYPE", "replica")
        await asyncio.sleep(0.4)
    cluster.kill(primary)
    if lose_replication:
        os.kill(replica_pid, signal.SIGCONT)
    await asyncio.to_thread(cluster.wait_healthy, 60)  # the replica took over


@ON_CLUSTER
@pytest.mark.usefixtures("redis")
@pytest.mark.parametrize("durable", [True, False], ids=["durable", "not-durable"])
@pytest.mark.timeout(150)
async def test_a_primary_killed_mid_stream(
    settings: Settings, redis_cluster: LocalCluster, durable: bool
) -> None:
    """A primary dies with events its replica never got. Durable mode (clients are sent only
    what a replica holds): no gap, no duplicate, no 400, not even a reset. Without it: what
    clients were sent may be lost, and they are told so with a reset, then get the whole
    answer; never a gap, a duplicate or a 400."""
    paced = dataclasses.replace(
        settings, mock_token_delay_ms=20.0, read_from_replicas=durable, redis_timeout_s=5.0
    )
    with _restored(redis_cluster):
        async with start_stack(paced) as stack, stack.client() as client:
            message_id = await _start(client, 300)
            seen: list[list[SseEvent]] = [[] for _ in range(3)]
            followers = [asyncio.create_task(_follow(client, message_id, s)) for s in seen]
            await eventually(lambda: all(len(s) > 20 for s in seen))
            await _kill_primary_of(redis_cluster, message_id, lose_replication=True)
            await asyncio.wait_for(asyncio.gather(*followers), 90)
            rewinds = stack.hub.counters.rewinds
    for events in seen:
        assert _answer(events) == mock_text(PROMPT, 300)
        assert _no_duplicate(events)
        resets = [e for e in events if e.event == "reset"]
        if durable:
            assert resets == []
        else:
            assert all(orjson.loads(e.data)["reason"] == "events_lost" for e in resets)
            assert all(e.id is None for e in resets)  # no resume position
    assert (rewinds == 0) is durable


@contextlib.asynccontextmanager
async def _on_sentinel(setup: LocalSentinel) -> AsyncIterator[Settings]:
    yield Settings(
        redis_url=setup.url,
        mock_token_delay_ms=20.0,
        coalesce_ms=0,
        heartbeat_s=2,
        redis_timeout_s=5.0,
        auth="off",
    )


@pytest.mark.timeout(120)
# redis-py's Sentinel pool loses track of some connections to a primary that died (a pool's
# in-use set holds them weakly), so they are closed by the collector, not by the pool: collected
# here, while their test runs, instead of in whichever test the collector happens to run next.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
async def test_a_sentinel_failover_is_followed_by_gateways_and_workers(
    redis_sentinel: LocalSentinel,
) -> None:
    try:
        await _sentinel_failover(redis_sentinel)
    finally:
        gc.collect()


async def _sentinel_failover(redis_sentinel: LocalSentinel) -> None:
    async with (
        _on_sentinel(redis_sentinel) as settings,
        start_stack(settings) as stack,
        stack.client() as client,
    ):
        message_id = await _start(client, 200)
        seen: list[SseEvent] = []
        following = asyncio.create_task(_follow(client, message_id, seen))
        await eventually(lambda: len(seen) > 20)
        old = redis_sentinel.primary()
        redis_sentinel.kill(old)
        await eventually(lambda: redis_sentinel.primary() != old, timeout_s=30)
        await asyncio.wait_for(following, 60)
        # New answers, by the same processes, on the new primary.
        fresh = await _start(client, 10)
        later: list[SseEvent] = []
        await asyncio.wait_for(_follow(client, fresh, later), 30)
    assert _answer(seen) == mock_text(PROMPT, 200)
    assert _no_duplicate(seen)
    assert _answer(later) == mock_text(PROMPT, 10)
