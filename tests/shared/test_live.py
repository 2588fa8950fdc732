"""The subscribed-connection listener: delivery, reconnection, liveness, and clean cancellation."""

from __future__ import annotations

import asyncio
import random

from redis.asyncio import Connection

from shared.live import LiveChannels
from shared.redis_client import RedisClient, RedisConnector
from shared.settings import Settings
from tests.support import eventually


def _listener(
    settings: Settings, received: list[bytes], resubscribed: list[int], ping_s: float
) -> LiveChannels:
    connector = RedisConnector(settings)

    def connect() -> Connection:
        return connector.channel_connection("redis", "test-live")

    return LiveChannels(
        connect,
        lambda _channel, payload: received.append(payload),
        lambda: resubscribed.append(1),
        ping_interval_s=ping_s,
    )


async def test_delivers_and_resubscribes_after_the_connection_is_killed(
    settings: Settings, redis: RedisClient
) -> None:
    received: list[bytes] = []
    resubscribed: list[int] = []
    live = _listener(settings, received, resubscribed, ping_s=5.0)
    task = asyncio.create_task(live.run())
    await live.subscribe(b"ch")
    await redis.spublish("ch", b"one")
    await eventually(lambda: received == [b"one"])
    await redis.client_kill_filter(_type="pubsub")
    await eventually(lambda: resubscribed == [1])
    await redis.spublish("ch", b"two")
    await eventually(lambda: received == [b"one", b"two"])
    await live.aclose()
    await asyncio.wait_for(task, 2)


async def test_a_silent_server_is_detected_and_the_connection_replaced(
    settings: Settings, redis: RedisClient
) -> None:
    received: list[bytes] = []
    resubscribed: list[int] = []
    live = _listener(settings, received, resubscribed, ping_s=0.2)
    task = asyncio.create_task(live.run())
    await live.subscribe(b"ch")
    await redis.client_pause(1500)  # Redis answers nobody for 1.5 s
    await eventually(lambda: live.reconnects >= 1, timeout_s=5)
    await eventually(lambda: resubscribed != [], timeout_s=5)
    await redis.spublish("ch", b"after")
    await eventually(lambda: received == [b"after"])
    await live.aclose()
    await asyncio.wait_for(task, 2)


async def test_closing_always_ends_it(settings: Settings, redis: RedisClient) -> None:
    """Whatever it is doing (connecting, subscribing, reading, pinging), aclose() ends run().
    Cancelling alone did not always: Python 3.11 can lose a cancellation inside a timeout."""
    assert await redis.ping()
    rng = random.Random(7)
    for _ in range(100):
        live = _listener(settings, [], [], ping_s=0.004)
        task = asyncio.create_task(live.run())
        live.follow(b"ch")
        await asyncio.sleep(rng.uniform(0, 0.02))
        await live.aclose()
        done, _ = await asyncio.wait({task}, timeout=2)
        assert done, "LiveChannels.run() went on after aclose()"
