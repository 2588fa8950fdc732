"""The cap on queued work: past TOKENRELAY_MAX_QUEUED_JOBS a gateway answers 503 with
Retry-After, in each API's error shape, and writes nothing."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from gateway.admission import Admission
from gateway.errors import ApiError
from shared.redis_client import RedisClient
from shared.settings import Settings
from tests.support import queued_jobs, start_stack


async def test_past_the_cap_requests_are_refused_before_anything_is_written(
    settings: Settings, redis: RedisClient
) -> None:
    capped = dataclasses.replace(settings, max_queued_jobs=3, retry_ms=4000)
    async with start_stack(capped, worker=False) as stack, stack.client() as client:
        for _ in range(3):
            async with client.stream(
                "POST", "/chat/stream", json={"prompt": "wait", "max_tokens": 5}
            ) as response:
                assert response.status_code == 200
        keys_before = sorted(await redis.keys("tr:{*}:meta"))
        seed = await client.post("/chat/stream", json={"prompt": "one more", "max_tokens": 5})
        openai = await client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "one more"}], "stream": True},
        )
        await stack.admission.sample()  # a fresh sample counts the same
        again = await client.post("/chat/stream", json={"prompt": "still", "max_tokens": 5})
    for refused in (seed, openai, again):
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "4"
        assert refused.headers["content-type"] == "application/json"
    assert seed.json()["error"]["type"] == "unavailable"
    assert "3 requests are waiting" in seed.json()["error"]["message"]
    # In OpenAI's terms on its route: a server error, our name as its code.
    assert (openai.json()["error"]["type"], openai.json()["error"]["code"]) == (
        "server_error",
        "unavailable",
    )
    assert sorted(await redis.keys("tr:{*}:meta")) == keys_before
    assert await queued_jobs(redis) == 3


async def test_jobs_admitted_while_a_sample_is_read_still_count(
    settings: Settings, redis: RedisClient
) -> None:
    admission = Admission(redis, partitions=settings.job_partitions, max_queued=3)
    sampling = asyncio.create_task(admission.sample())
    await asyncio.sleep(0)  # the sample is out, waiting for Redis
    for _ in range(3):
        admission.admit(retry_after_s=1)  # a burst meanwhile (queued after what Redis counts)
    await sampling
    with pytest.raises(ApiError) as refused:
        admission.admit(retry_after_s=1)
    assert refused.value.status == 503
