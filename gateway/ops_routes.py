"""The endpoints operators and load balancers use: liveness, readiness, metrics."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.errors import ApiError
from gateway.state import GatewayState
from shared import metrics

_READY_WITHIN_S = 2.0


async def healthz(request: Request) -> Response:
    """The process is alive (it answers)."""
    del request
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Redis answers: this gateway can serve streams. Within a few seconds, whatever Redis
    does: a probe that waits out the client's retries (tens of seconds when Redis is stopped)
    tells a load balancer nothing in time."""
    try:
        async with asyncio.timeout(_READY_WITHIN_S):
            await GatewayState.of(request).redis.ping()
    except TimeoutError:
        raise ApiError(
            503, f"storage did not answer within {_READY_WITHIN_S:g} s", retry_after_s=1
        ) from None
    return JSONResponse({"status": "ready"})


async def metrics_endpoint(request: Request) -> Response:
    """Prometheus metrics: this process's (or, under ``--workers N``, every process's)."""
    GatewayState.of(request).metrics.update()
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)
