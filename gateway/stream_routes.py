"""The event-stream GETs, served without Starlette's middleware stack.

A GET that follows or resumes a message holds its request for as long as the message streams,
and every coroutine of the stack it came through stays alive with it. Starlette's middleware,
router and exception wrappers were 6.5 KB of the 19.6 KB an idle following client cost
(tracemalloc, 1,000 clients), and a good part of the CPU of each reconnect. So these routes
are matched first and their endpoints called directly. What the stack does for them is done
here the same way: the application's exception handlers (looked up by exception class; the
gateway registers no status-code handlers) turn ApiError, RetryLater and RedisError raised
before the response starts into their responses, and the middleware (X-Served-By) wraps this
path too. Anything else reaches the server, which answers 500 as Starlette's
ServerErrorMiddleware would, and closes the connection. The scope has no ``router`` or
``route`` key (nothing here reads them). Every other request, and a method these routes do
not take, goes through Starlette as before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from starlette.requests import Request
from starlette.routing import Match, Route
from starlette.types import ASGIApp, ExceptionHandler, Receive, Scope, Send


class StreamRoutes:
    """Dispatches requests for ``routes`` (each a :class:`Route` to an ``async`` endpoint)."""

    def __init__(
        self,
        routes: Sequence[Route],
        exception_handlers: Mapping[Any, ExceptionHandler],
        middleware: Callable[[ASGIApp], ASGIApp],
    ) -> None:
        self._routes = list(routes)
        self._handlers = exception_handlers
        #: The ASGI app that serves a request :meth:`match` matched: the middleware, then the
        #: route's endpoint.
        self.app = middleware(self._serve)

    def match(self, scope: Scope) -> Route | None:
        """The route that takes this request whole (path and method), if any."""
        for route in self._routes:
            matched, child = route.matches(scope)
            if matched is Match.FULL:
                scope.update(child)
                return route
        return None

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        endpoint = scope["endpoint"]
        try:
            response = await endpoint(request)
        except Exception as exc:
            handler = self._handler_for(exc)
            if handler is None:
                raise
            response = await handler(request, exc)
        await response(scope, receive, send)

    def _handler_for(self, exc: Exception) -> Any:
        for cls in type(exc).__mro__:
            handler = self._handlers.get(cls)
            if handler is not None:
                return handler
        return None
