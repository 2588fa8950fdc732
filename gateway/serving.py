"""The application as a gateway process serves it: what its lifespan adds (the open-file limit,
the collector's passes) and, at shutdown, closing the connections the server adapter answered
itself and awaiting their streams before the application's lifespan ends; and the transport
uvicorn's protocol is given, which writes through the connection."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.app import create_app
from shared import gc_policy, log_format, open_files
from shared.redis_client import RedisConnector
from shared.settings import Settings

_log = logging.getLogger(__name__)
SERVED = "tokenrelay.served"  # the key of the process's Served in the lifespan state


class Closable(Protocol):
    def close(self) -> None: ...


class _Connection(Closable, Protocol):
    """What a passthrough needs of the connection it writes through (gateway.server)."""

    def write(self, data: bytes) -> None: ...

    def write_from_uvicorn(self, data: bytes) -> None: ...


class Served:
    """The application, as uvicorn serves it. It runs the process's collector passes (when
    gc_policy took the collector over) and, at shutdown, closes the connections and awaits the
    streams they answered themselves, before the application's lifespan ends."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.connections: set[Closable] = set()
        self.streams: set[asyncio.Task[None]] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            scope.setdefault("state", {})[SERVED] = self
            # Every client holds a socket: the process may hold as many as the system allows.
            limit = open_files.raise_limit()
            if limit.after != limit.before:
                _log.info("open-file limit raised from %d to %d", limit.before, limit.after)

            collecting = asyncio.create_task(gc_policy.collect())

            async def receive_then_close() -> Message:
                message = await receive()
                if message["type"] == "lifespan.shutdown":
                    for connection in list(self.connections):
                        connection.close()
                    for task in (*self.streams, collecting):
                        task.cancel()
                    await asyncio.gather(*self.streams, collecting, return_exceptions=True)
                return message

            try:
                await self.app(scope, receive_then_close, send)
            finally:
                collecting.cancel()
                await asyncio.gather(collecting, return_exceptions=True)
        else:
            await self.app(scope, receive, send)


def app_from_env() -> ASGIApp:
    """uvicorn factory for multi-process gateways: each process reads the environment once."""
    settings = Settings.from_env(os.environ)
    # A process uvicorn started runs none of the command's own set-up: its log is set up here.
    log_format.configure(settings.log_level)
    settings.check_gateway()
    app = Served(create_app(settings, lambda: RedisConnector(settings)))
    gc_policy.settle(settings.gc_full_s)
    return app


class Passthrough:
    """The transport uvicorn's protocol is given: its writes go through the connection (which
    may hold a head); the rest is the real transport's."""

    def __init__(self, connection: _Connection, real: asyncio.Transport) -> None:
        self._connection = connection
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def write(self, data: bytes) -> None:
        self._connection.write_from_uvicorn(data)

    def close(self) -> None:
        self._connection.write(b"")  # what is held goes first
        self._connection.close()
