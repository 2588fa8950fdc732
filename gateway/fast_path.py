"""Which requests the server adapter may answer itself, from memory, decided exactly as the
application decides: the route, message id, cursor and credential of a stream GET."""

from __future__ import annotations

from urllib.parse import parse_qsl

import httptools

from gateway.access import bearer, check_grant
from gateway.errors import ApiError
from gateway.message_tokens import PREFIX as TOKEN_PREFIX
from gateway.message_tokens import READ
from gateway.request_heads import RequestHead
from gateway.requests import resume_cursor
from gateway.responses import StreamGet
from gateway.routes import STREAM_GETS
from gateway.state import GatewayState
from shared.events import EntryId


def granted(
    state: GatewayState, route: StreamGet, message_id: str, token: str | None, head: RequestHead
) -> bool:
    """Whether a per-message token (in the query, else the Authorization header) lets this
    request read the message, as the application would decide."""
    if token is None and head.authorization is not None:
        token = bearer(head.authorization.decode("latin-1"))
    if token is None or not token.startswith(TOKEN_PREFIX):
        return False  # no credential, or an API key: looked up in Redis by the application
    try:
        grant = state.access.grant(token, openai=route.openai)
        check_grant(grant, message_id, READ, openai=route.openai)
    except ApiError:
        return False
    return True


def wanted(head: RequestHead) -> tuple[StreamGet, str, EntryId | None, str | None] | None:
    """The route, message id, cursor and ``token`` parameter of a request, read as the
    application reads them (the ``Last-Event-ID`` header, else the last ``last_event_id``
    parameter); None when the application is to answer (another path, a malformed cursor)."""
    try:
        url = httptools.parse_url(head.url)
    except httptools.HttpParserInvalidURLError:
        return None
    path = url.path.decode("latin-1")
    for route in STREAM_GETS:
        message_id = route.message_id(path)
        if message_id is not None:
            break
    else:
        return None
    header = None if head.last_event_id is None else head.last_event_id.decode("latin-1")
    # As Starlette reads a query string: the last of repeated parameters wins.
    query = (
        dict(parse_qsl(url.query.decode("latin-1"), keep_blank_values=True)) if url.query else {}
    )
    if "after_chunk" in query:
        return None  # a position by count: the application finds it in Redis
    try:
        cursor = resume_cursor(header, query.get("last_event_id"))
        return route, message_id, cursor, query.get("token")
    except ApiError:
        return None  # the application answers 400
