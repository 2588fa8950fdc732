"""The Starlette application: routes, JSON errors, a lifespan that owns every client and task."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator, Callable
from importlib import resources
from types import FrameType

from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import gc_policy, openai_api
from gateway.direct import Gateway
from gateway.errors import (
    ApiError,
    RetryLater,
    handle_api_error,
    handle_http_exception,
    handle_redis_error,
)
from gateway.hub import Hub
from gateway.routes import ROUTES, STREAM_ROUTES, WARM_ROUTES, demo_page, handle_retry_later
from gateway.state import GatewayState
from shared.live import LiveChannels
from shared.redis_client import RedisConnector
from shared.settings import Settings

_log = logging.getLogger(__name__)
#: CLIENT SETNAME of a gateway's subscribed connection.
LIVE_CONNECTION_NAME = "tokenrelay-gateway-live"


def create_app(
    settings: Settings, connector: Callable[[], RedisConnector], *, demo: bool = False
) -> Starlette:
    """The gateway app. ``connector`` is called in the lifespan to create this process's clients."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        redis_connector = connector()
        redis = redis_connector.client()
        hub: Hub
        live = LiveChannels(
            lambda: redis_connector.dedicated_connection(LIVE_CONNECTION_NAME),
            lambda channel, payload: hub.on_message(channel, payload),
            lambda: hub.on_resubscribed(),
            ping_interval_s=min(settings.heartbeat_s, 5.0),
        )
        hub = Hub(
            redis,
            live,
            backlog=settings.subscriber_backlog,
            heartbeat_s=settings.heartbeat_s,
            # Never more than Redis retains: every gateway answers a cursor the same way.
            replay=min(settings.live_replay, settings.stream_maxlen),
            presence_interval_s=settings.cancel_grace_s / 3,
        )
        app.state.gateway = GatewayState(settings, redis, hub)
        tasks = [asyncio.create_task(live.run()), asyncio.create_task(hub.run_housekeeping())]
        restore = _drain_on_sigterm(hub)
        _log.info("gateway using %s", redis_connector.description)
        try:
            yield
        finally:
            restore()
            await live.aclose()
            await hub.aclose()
            for task in tasks:
                task.cancel()
            for result in await asyncio.gather(*tasks, return_exceptions=True):
                # None: it returned on close (LiveChannels does); cancelled: as asked.
                if isinstance(result, BaseException) and not isinstance(
                    result, asyncio.CancelledError
                ):
                    _log.error("gateway task failed", exc_info=result)
            await redis_connector.aclose()

    routes = [*ROUTES, *openai_api.ROUTES]
    middleware = [Middleware(ServedBy)]
    if demo:
        routes.append(
            demo_page(resources.files("gateway").joinpath("static/demo.html").read_bytes())
        )
    return Gateway(
        routes=routes,
        stream_routes=[*STREAM_ROUTES, *openai_api.STREAM_ROUTES],
        middleware=middleware,
        warm_routes=[*WARM_ROUTES, *openai_api.WARM_ROUTES],
        # What the middleware adds to each response, for those the gateway protocol writes.
        warm_headers=lambda: [served_by()],
        lifespan=lifespan,
        exception_handlers={
            ApiError: handle_api_error,
            HTTPException: handle_http_exception,
            RedisError: handle_redis_error,
            RetryLater: handle_retry_later,
        },
    )


class ServedBy:
    """Names the gateway process in an ``X-Served-By`` header (which one a load balancer chose
    is otherwise hard to tell when a stream misbehaves)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = served_by()

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await self.app(scope, receive, send_with_header)


_served_by: dict[int, tuple[bytes, bytes]] = {}


def served_by() -> tuple[bytes, bytes]:
    """This process's ``X-Served-By`` header (per pid: each forked process has its own)."""
    pid = os.getpid()
    header = _served_by.get(pid)
    if header is None:
        header = _served_by[pid] = (b"x-served-by", f"{socket.gethostname()}:{pid}".encode())
    return header


def _drain_on_sigterm(hub: Hub) -> Callable[[], None]:
    """On SIGTERM, end every stream (with a retry hint) first, then let the server stop.

    uvicorn waits for open connections before it runs the lifespan's shutdown, and event streams
    never close by themselves: without this, a stopping gateway would hold its clients until the
    graceful-shutdown timeout, then cut them. The server's own handler (installed when it
    started, just before this lifespan) still runs after ours.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signals belong to the main thread (an embedding host's business)
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        return lambda: None  # no server handler to hand over to: leave SIGTERM alone

    def handle(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(hub.drain)
        previous(signum, frame)

    signal.signal(signal.SIGTERM, handle)

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is handle:
            signal.signal(signal.SIGTERM, previous)

    return restore


def app_from_env() -> Starlette:
    """uvicorn factory for multi-process gateways: each process reads the environment once."""
    settings = Settings.from_env(os.environ)
    app = create_app(settings, lambda: RedisConnector(settings))
    gc_policy.settle()
    return app
