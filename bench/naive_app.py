"""The naive baseline: sse-starlette with one XREAD BLOCK per client, as a first version is
often written. It serves the seed wire format from the same streams tokenrelay's workers write.

    REDIS_URL=redis://127.0.0.1:6379 uvicorn --factory bench.naive_app:create_app
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from redis.asyncio import BlockingConnectionPool, Redis
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from shared import keys


def create_app() -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # One connection per waiting client: the point of this baseline. Its socket timeout
        # must exceed the 15 s block.
        pool = BlockingConnectionPool.from_url(
            os.environ["REDIS_URL"], max_connections=20_000, timeout=None, socket_timeout=30
        )
        app.state.redis = Redis(connection_pool=pool)
        yield
        await app.state.redis.aclose()

    return Starlette(routes=[Route("/naive/{message_id}", follow)], lifespan=lifespan)


async def follow(request: Request) -> EventSourceResponse:
    redis: Redis = request.app.state.redis
    message_id: str = request.path_params["message_id"]
    start = request.headers.get("last-event-id", "0-0")
    return EventSourceResponse(_read(redis, message_id, start))


async def _read(redis: Redis, message_id: str, last: str) -> AsyncIterator[ServerSentEvent]:
    stream = keys.message_stream(message_id)
    prefix = b'{"id":' + orjson.dumps(message_id) + b',"content":'
    while True:
        reply: Any = await redis.xread({stream: last}, block=15_000, count=100)
        if not reply:
            continue
        for entry_id, fields in reply[0][1]:
            last = entry_id.decode()
            if fields[b"k"] == b"done":
                return
            yield ServerSentEvent(data=(prefix + fields[b"d"] + b"}").decode(), id=last)
