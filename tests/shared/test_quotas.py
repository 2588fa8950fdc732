"""Quotas counted in Redis: concurrency with a safety expiry, tokens per minute."""

from __future__ import annotations

import asyncio

from shared import api_keys, keys, quotas
from shared.api_keys import Limits
from shared.redis_client import RedisClient


async def test_concurrency_is_released_by_the_end_or_by_the_hold(redis: RedisClient) -> None:
    _, key = api_keys.new_key("acme", Limits(max_concurrent=1))
    assert (await quotas.admit(redis, key, "m1", 5, hold_ms=60_000)).ok
    refused = await quotas.admit(redis, key, "m2", 5, hold_ms=60_000)
    assert (refused.outcome, refused.active) == ("concurrency", 1)
    await quotas.release(redis, key.key_id, "m1")
    assert (await quotas.admit(redis, key, "m2", 5, hold_ms=50)).ok
    # m2's end is never reported: it stops counting once its hold has passed.
    for _ in range(500):
        if (await quotas.admit(redis, key, "m3", 5, hold_ms=60_000)).ok:
            break
        await asyncio.sleep(0.01)
    assert await redis.zrange(keys.quota_active(key.key_id), 0, -1) == [b"m3"]


async def test_tokens_per_minute_count_what_was_admitted(redis: RedisClient) -> None:
    _, key = api_keys.new_key("acme", Limits(tokens_per_minute=10))
    first = await quotas.admit(redis, key, "m1", 6, hold_ms=60_000)
    assert (first.ok, first.tokens_used) == (True, 6)
    assert 0 < first.window_reset_ms <= 60_000
    refused = await quotas.admit(redis, key, "m2", 5, hold_ms=60_000)
    assert (refused.outcome, refused.tokens_used) == ("tokens", 6)
    assert (await quotas.admit(redis, key, "m3", 4, hold_ms=60_000)).ok


async def test_a_key_without_limits_costs_no_redis_call(redis: RedisClient) -> None:
    _, key = api_keys.new_key("acme", Limits())
    assert (await quotas.admit(redis, key, "m1", 5, hold_ms=60_000)).ok
    assert await redis.exists(keys.quota_active(key.key_id)) == 0
