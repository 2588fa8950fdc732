"""The Starlette application: its routes, its middleware, JSON errors, and a lifespan that owns
every client and task of the process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable
from importlib import resources
from types import FrameType

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.access import Access
from gateway.admission import Admission
from gateway.errors import ApiError, RetryLater, in_openai_terms
from gateway.http_wire import common_headers, log_access
from gateway.hub import Hub
from gateway.idempotency import Idempotency
from gateway.metrics import GatewayMetrics
from gateway.responses import RetryLaterResponse, error_response, is_openai_path
from gateway.routes import routes
from gateway.state import STATE, GatewayState
from shared import metrics as shared_metrics
from shared.api_keys import read_key_file
from shared.live import ShardedChannels
from shared.redis_client import RedisConnector, is_closed_transport
from shared.settings import Settings

_log = logging.getLogger(__name__)
#: Response headers a page on an allowed origin may read.
_EXPOSED_HEADERS = [
    "x-message-id",
    "x-message-token",
    "x-message-read-token",
    "x-served-by",
    "retry-after",
    "idempotent-replayed",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
]
#: CLIENT SETNAME of a gateway's subscribed connection.
LIVE_CONNECTION_NAME = "tokenrelay-gateway-live"


def create_app(
    settings: Settings, connector: Callable[[], RedisConnector], *, demo: bool = False
) -> Starlette:
    """The gateway app. ``connector`` is called in the lifespan to create this process's clients.

    The lifespan leaves the :class:`GatewayState` on ``app.state`` for the endpoints, and in
    the lifespan state (under :data:`gateway.state.STATE`) for the server adapter.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, GatewayState]]:
        settings.check_gateway()  # ConfigError naming what access control lacks
        file_keys = read_key_file(settings.api_keys_file) if settings.api_keys_file else {}
        redis_connector = connector()
        redis = redis_connector.client()
        # Durable mode: streams read, and announcements followed, where a replica has them.
        durable = settings.read_from_replicas
        reads = redis_connector.client(replicas=True) if durable else redis
        try:
            await redis_connector.ready()
        except BaseException:
            await redis_connector.aclose()
            raise
        hub: Hub
        live = ShardedChannels(
            redis_connector.nodes(reads, replicas=durable),
            lambda node: redis_connector.channel_connection(
                node, LIVE_CONNECTION_NAME, replica=durable
            ),
            lambda channel, payload: hub.on_message(channel, payload),
            lambda: hub.on_resubscribed(),
            ping_interval_s=min(settings.heartbeat_s, 5.0),
        )
        hub = Hub(
            redis,
            live,
            reads,
            backlog=settings.subscriber_backlog,
            heartbeat_s=settings.heartbeat_s,
            # Never more than Redis retains: every gateway answers a cursor the same way.
            replay=min(settings.live_replay, settings.stream_maxlen),
            replay_bytes=settings.live_replay_bytes,
            ttl_ms=settings.stream_ttl_s * 1000,
            presence_interval_s=settings.cancel_grace_s / 3,
            announcements_are_hints=durable,
            max_reads=settings.redis_max_connections,
            # A join waits out a failover, not a shard that stays down.
            start_timeout_s=3 * settings.redis_timeout_s,
        )
        admission = Admission(
            redis, partitions=settings.job_partitions, max_queued=settings.max_queued_jobs
        )
        gateway_metrics = GatewayMetrics(hub, admission)
        access = Access(settings, redis, file_keys)
        state = app.state.gateway = GatewayState(
            settings,
            redis,
            hub,
            admission,
            gateway_metrics,
            access,
            Idempotency(redis, ttl_s=settings.stream_ttl_s),
        )
        tasks = [
            asyncio.create_task(live.run()),
            asyncio.create_task(hub.run_housekeeping()),
            asyncio.create_task(admission.run()),
            asyncio.create_task(_update_metrics(gateway_metrics)),
        ]
        if durable:
            tasks.append(asyncio.create_task(redis_connector.follow_topology(reads, 5.0)))
        restore = _drain_on_sigterm(hub)
        _log.info("gateway using %s", redis_connector.description)
        if not access.required:
            _log.warning("access control is off (TOKENRELAY_AUTH=off)")
        try:
            yield {STATE: state}
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
            shared_metrics.process_gone(os.getpid())

    demo_html = (
        resources.files("gateway").joinpath("static/demo.html").read_bytes() if demo else None
    )
    middleware = [Middleware(CommonHeaders)]
    if settings.cors_origin_list:
        # Starlette's own CORS handling: preflights, Vary: Origin, and credentials for the
        # listed origins only (never a wildcard).
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origin_list,
                allow_methods=["GET", "POST", "HEAD"],
                allow_headers=["authorization", "content-type", "last-event-id", "idempotency-key"],
                expose_headers=_EXPOSED_HEADERS,
                allow_credentials=True,
                max_age=600,
            )
        )
    return Starlette(
        routes=routes(demo_html=demo_html),
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_exception,
            RedisError: _redis_error,
            RuntimeError: _runtime_error,
            RetryLater: _retry_later,
        },
    )


async def _update_metrics(gateway_metrics: GatewayMetrics) -> None:
    while True:
        await asyncio.sleep(1.0)
        gateway_metrics.update()


class CommonHeaders:
    """Adds the headers every response carries (``date``, ``X-Served-By``) and logs each
    request's access line, as the server adapter does for the answers it writes itself."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *common_headers()]
                target = scope.get("raw_path") or scope["path"].encode()
                if scope.get("query_string"):
                    target += b"?" + scope["query_string"]
                log_access(
                    scope.get("client"),
                    scope["method"],
                    target,
                    scope["http_version"],
                    message["status"],
                )
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _answer(request: Request, error: ApiError) -> Response:
    """``error`` answered, in OpenAI's terms on the OpenAI routes."""
    return error_response(in_openai_terms(error) if is_openai_path(request.url.path) else error)


async def _api_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, ApiError):  # pragma: no cover - registered for ApiError only
        raise TypeError(exc)
    return _answer(request, exc)


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 and friends, in our JSON shape."""
    if not isinstance(exc, HTTPException):  # pragma: no cover - registered for it only
        raise TypeError(exc)
    message = (
        exc.detail
        if exc.status_code != 404
        else f"no route for {request.method} {request.url.path}"
    )
    return _answer(request, ApiError(exc.status_code, message, headers=dict(exc.headers or {})))


async def _redis_error(request: Request, exc: Exception) -> Response:
    """Redis unreachable: 503, retry later. Any other Redis error is a bug of ours: 500."""
    if isinstance(exc, RedisConnectionError | RedisTimeoutError):
        _log.warning("%s %s: redis unavailable: %s", request.method, request.url.path, exc)
        return _answer(request, ApiError(503, "storage unavailable, retry later"))
    _log.error("%s %s: redis error", request.method, request.url.path, exc_info=exc)
    return _answer(request, ApiError(500, "internal error"))


async def _runtime_error(request: Request, exc: Exception) -> Response:
    """uvloop's closed-transport error reaches here from redis-py's cluster client (whose
    connection class cannot be chosen): Redis went away, as for a ConnectionError. Any other
    RuntimeError is a bug: 500."""
    if is_closed_transport(exc):
        return await _redis_error(request, RedisConnectionError(str(exc)))
    _log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return _answer(request, ApiError(500, "internal error"))


async def _retry_later(request: Request, exc: Exception) -> Response:
    """A stream asked for while Redis is unreachable: come back later (RetryLaterResponse)."""
    del exc
    return RetryLaterResponse(
        GatewayState.of(request).settings.retry_ms, "storage unavailable, retry later"
    )


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
