"""Every endpoint of the gateway, declared once.

The application's routes are made from this table, and the server adapter (gateway.server)
answers the stream GETs in it (:data:`STREAM_GETS`) from memory, with the same bytes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.chat_routes import cancel_message, demo_page, post_chat
from gateway.frames import openai_renderer, seed_renderer
from gateway.openai_routes import post_completions
from gateway.ops_routes import healthz, metrics_endpoint, readyz
from gateway.responses import StreamGet
from gateway.responses_routes import cancel_response, create_response, retrieve_response
from gateway.ui_routes import post_chat_turn, resume_chat, stop_chat

Endpoint = Callable[[Request], Awaitable[Response]]

#: The GETs that follow a message as an event stream.
STREAM_GETS = (
    StreamGet("/chat/stream/", "", seed_renderer, retry_hint=True),
    StreamGet("/v1/chat/completions/", "/stream", openai_renderer, retry_hint=False),
)
_SEED, _OPENAI = STREAM_GETS

#: (method, path, endpoint) of every route.
TABLE: list[tuple[str, str, Endpoint]] = [
    ("POST", "/chat/stream", post_chat),
    ("GET", _SEED.path, _SEED.endpoint),
    ("POST", "/chat/stream/{message_id}/cancel", cancel_message),
    ("POST", "/v1/chat/completions", post_completions),
    ("GET", _OPENAI.path, _OPENAI.endpoint),
    ("POST", "/v1/chat/completions/{message_id}/cancel", cancel_message),
    ("POST", "/v1/responses", create_response),
    ("GET", "/v1/responses/{response_id}", retrieve_response),
    ("POST", "/v1/responses/{response_id}/cancel", cancel_response),
    ("POST", "/api/chat", post_chat_turn),
    ("GET", "/api/chat/{chat_id}/stream", resume_chat),
    ("POST", "/api/chat/{chat_id}/stop", stop_chat),
    ("GET", "/healthz", healthz),
    ("GET", "/readyz", readyz),
    ("GET", "/metrics", metrics_endpoint),
]


def routes(*, demo_html: bytes | None = None) -> list[Route]:
    """The application's routes (with the demo page at ``/`` when its HTML is given)."""
    table = [Route(path, endpoint, methods=[method]) for method, path, endpoint in TABLE]
    if demo_html is not None:

        async def demo(request: Request) -> Response:
            del request
            return demo_page(demo_html)

        table.append(Route("/", demo, methods=["GET"]))
    return table
