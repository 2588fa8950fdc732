"""``tokenrelay dev``: a gateway and a worker in one process, for trying tokenrelay out."""

from __future__ import annotations

import asyncio
import logging
import math

import fakeredis
import uvicorn

from gateway.app import create_app
from shared.redis_client import RedisConnector
from shared.settings import Settings
from worker import service

_log = logging.getLogger("tokenrelay.dev")


def connector_factory(settings: Settings) -> tuple[RedisConnector, RedisConnector]:
    """Connectors for the gateway and the worker: one shared fakeredis unless REDIS_URL is set."""
    server = fakeredis.FakeServer() if settings.redis_url is None else None
    return RedisConnector(settings, embedded=server), RedisConnector(settings, embedded=server)


async def run(settings: Settings, *, host: str, port: int) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM), then stop the worker too."""
    gateway_connector, worker_connector = connector_factory(settings)
    if gateway_connector.embedded:
        _log.info(
            "REDIS_URL is not set: using an embedded fakeredis (data lives in this process only)"
        )
    else:
        _log.info("using Redis at %s", settings.effective_redis_url)
    app = create_app(settings, lambda: gateway_connector, demo=True)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),
    )
    server = uvicorn.Server(config)
    stop = asyncio.Event()
    worker = asyncio.create_task(service.serve(settings, worker_connector, stop))
    _log.info("demo page: http://%s:%d/", host, port)
    try:
        await server.serve()
    finally:
        stop.set()
        await worker
