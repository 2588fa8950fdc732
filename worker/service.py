"""Runs a worker process's lifecycle: clients created here, closed here."""

from __future__ import annotations

import asyncio
import logging

from shared.redis_client import RedisConnector
from shared.settings import Settings
from worker.backends import create_backend
from worker.runner import Worker, consumer_name
from worker.stream_writer import append_batch

_log = logging.getLogger(__name__)


async def serve(settings: Settings, connector: RedisConnector, stop: asyncio.Event) -> None:
    """Take and generate jobs until ``stop`` is set; then finish (bounded) and close the clients."""
    redis = connector.client()
    try:
        backend = create_backend(settings)
        try:
            # Every generation's appends share round trips (see worker.script_batch). Past the
            # shutdown grace, appends Redis has not answered are given up with the rest.
            async with append_batch(redis, close_within_s=settings.shutdown_grace_s) as appends:
                worker = Worker(
                    settings,
                    redis,
                    appends,
                    backend,
                    consumer=consumer_name(),
                    connect=lambda: connector.dedicated_connection("tokenrelay-worker-cancels"),
                    embedded=connector.embedded,
                )
                _log.info("worker using %s, %s backend", connector.description, settings.backend)
                await worker.run(stop)
        finally:
            await backend.aclose()
    finally:
        await connector.aclose()
    _log.info("worker stopped")
