"""Runs a worker process's lifecycle: clients created here, closed here."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import prometheus_client

from shared import gc_policy
from shared.redis_client import RedisConnector
from shared.settings import Settings
from worker.backends import create_backend
from worker.runner import Worker, consumer_name
from worker.stream_writer import append_batch

_log = logging.getLogger(__name__)


async def serve(settings: Settings, connector: RedisConnector, stop: asyncio.Event) -> None:
    """Take and generate jobs until ``stop`` is set; then finish (bounded) and close the clients.

    When the process handed the garbage collector to :mod:`shared.gc_policy`, its passes run
    here meanwhile."""
    redis = connector.client()
    collecting = asyncio.create_task(gc_policy.collect())
    exporter = None
    if settings.worker_metrics:
        host, port = settings.worker_metrics_address()
        exporter, _ = prometheus_client.start_http_server(port, host)
        _log.info("worker metrics on http://%s:%d/metrics", host, port)
    try:
        await connector.ready()
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
                    nodes=connector.nodes(redis),
                    connect=lambda node: connector.channel_connection(
                        node, "tokenrelay-worker-cancels"
                    ),
                    embedded=connector.embedded,
                )
                _log.info("worker using %s, %s backend", connector.description, settings.backend)
                await worker.run(stop)
        finally:
            await backend.aclose()
    finally:
        if exporter is not None:
            exporter.shutdown()
            exporter.server_close()
        collecting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await collecting
        await connector.aclose()
    _log.info("worker stopped")
