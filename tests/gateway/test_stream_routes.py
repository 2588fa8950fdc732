"""Stream routes: served past Starlette's middleware stack, with the same handlers and headers."""

from __future__ import annotations

import httpx
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.direct import Gateway
from gateway.errors import ApiError, handle_api_error
from gateway.routes import STREAM_ROUTES
from tests.support import Stack


class _Tagged:
    """A middleware that marks the responses it saw."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def tagged(message: dict[str, object]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-tagged", b"1")]  # type: ignore[misc]
            await send(message)

        await self.app(scope, receive, tagged)  # type: ignore[arg-type]


async def _stream(request: Request) -> Response:
    if request.path_params["name"] == "bad":
        raise ApiError(404, "no such stream")
    if request.path_params["name"] == "boom":
        raise RuntimeError("a bug")
    # Starlette's router and exception middleware leave these in the scope; this path has none.
    return JSONResponse({"router": "router" in request.scope, "name": request.path_params["name"]})


async def _other(request: Request) -> Response:
    return JSONResponse({"router": "router" in request.scope})


def _app() -> Gateway:
    stream = Route("/s/{name}", _stream, methods=["GET"])
    return Gateway(
        routes=[stream, Route("/other", _other, methods=["GET"])],
        stream_routes=[stream],
        middleware=[Middleware(_Tagged)],
        exception_handlers={ApiError: handle_api_error},
    )


def _client(app: Gateway) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://gateway")


async def test_a_stream_route_skips_the_stack_but_keeps_middleware_and_handlers() -> None:
    async with _client(_app()) as client:
        served = await client.get("/s/one")
        assert served.json() == {"router": False, "name": "one"}
        assert served.headers["x-tagged"] == "1"
        # An ApiError before the response starts gets the application's handler: JSON.
        missing = await client.get("/s/bad")
        assert missing.status_code == 404
        assert missing.json()["error"]["message"] == "no such stream"
        assert missing.headers["x-tagged"] == "1"
        # Anything else is the server's 500, as from Starlette's ServerErrorMiddleware.
        assert (await client.get("/s/boom")).status_code == 500
        # Other routes, and methods a stream route does not take, go through Starlette.
        assert (await client.get("/other")).json() == {"router": True}
        wrong = await client.post("/s/one")
        assert wrong.status_code == 405
        assert set(wrong.headers["allow"].split(", ")) == {"GET", "HEAD"}


async def test_the_gateway_serves_its_event_streams_this_way(stack: Stack) -> None:
    assert [route.path for route in STREAM_ROUTES] == ["/chat/stream/{message_id}"]
    async with stack.client() as client:
        missing = await client.get("/chat/stream/m_" + "0" * 32)
        assert missing.status_code == 404
        assert missing.json()["error"]["type"] == "not_found"
        assert missing.headers["x-served-by"]
        wrong = await client.post("/chat/stream/m_" + "0" * 32)
        assert wrong.status_code == 405
        assert set(wrong.headers["allow"].split(", ")) == {"GET", "HEAD"}
