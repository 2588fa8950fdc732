"""``tokenrelay dev``: a gateway and a worker in one process, for trying tokenrelay out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, cast

import fakeredis
import uvicorn
from starlette.applications import Starlette

from gateway.app import create_app
from gateway.server import served, uvicorn_options
from shared.redis_client import RedisConnector
from shared.settings import Settings
from worker import service

_log = logging.getLogger("tokenrelay.dev")


def build_app(settings: Settings) -> Starlette:
    """The gateway app (with the demo page) whose lifespan also runs a worker.

    The worker lives in the lifespan, not beside ``server.serve()``: uvicorn re-raises SIGTERM
    once it has served, which would kill the process before a worker stopped after it.
    """
    server = fakeredis.FakeServer() if settings.redis_url is None else None
    if server is not None:
        _log.info(
            "REDIS_URL is not set: using an embedded fakeredis (data lives in this process only)"
        )
    app = create_app(settings, lambda: RedisConnector(settings, embedded=server), demo=True)
    gateway_lifespan = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[Mapping[str, Any]]:
        async with cast(
            AbstractAsyncContextManager[Mapping[str, Any]], gateway_lifespan(app)
        ) as state:
            stop = asyncio.Event()
            worker = asyncio.create_task(
                service.serve(settings, RedisConnector(settings, embedded=server), stop)
            )
            try:
                yield state
            finally:
                stop.set()
                await worker

    app.router.lifespan_context = lifespan
    return app


async def run(settings: Settings, *, host: str, port: int) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM)."""
    config = uvicorn.Config(served(build_app(settings)), **uvicorn_options(settings, host, port))
    _log.info("demo page: http://%s:%d/", host, port)
    await uvicorn.Server(config).serve()
